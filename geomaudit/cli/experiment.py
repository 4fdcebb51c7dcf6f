"""``geomaudit experiment``: the paper's protocol on this machine; ``geomaudit demo``: its preset (SPEC §5)."""

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .common import Command, app, handle_errors, print_tables, progress_bars, to_stdout
from .options import OUTPUT, PRECISION, SAMPLING, Debug, Version

TRAINING = "Training"


class Targets(str, Enum):
    real = "real"
    random = "random"


Out = Annotated[str, typer.Option(metavar="DIR", rich_help_panel=OUTPUT,
                                  help="Folder for the runs, reports and plots (must be new or empty).")]
Steps = Annotated[int, typer.Option(metavar="N", rich_help_panel=TRAINING, help="Training steps of each run.")]
Device = Annotated[str, typer.Option(metavar="DEVICE", rich_help_panel=PRECISION,
                                     help="auto (cuda if available, else cpu), cpu, cuda …")]
Seed = Annotated[int, typer.Option(metavar="N", rich_help_panel=TRAINING,
                                   help="Seeds the initialisation, the batch orders, the random targets and the "
                                        "coordinates.")]
Text = Annotated[str | None, typer.Option(metavar="FILE", rich_help_panel=TRAINING,
                                          help="Train on this text file instead of the Python reference manual that "
                                               "ships with CPython.")]
Coords = Annotated[int, typer.Option(metavar="N", rich_help_panel=SAMPLING, help="Coordinates sampled per layer.")]


@app.command(cls=Command)
def experiment(
    ctx: typer.Context,
    out: Out = "geomaudit-experiment",
    optimizers: Annotated[str, typer.Option(metavar="NAME,NAME,…", rich_help_panel=TRAINING,
                                            help="Comma-separated: one baseline (sgdm or sgd) and the optimizers "
                                                 "compared with it: adam, adamw, amsgrad, rmsprop, adagrad.")]
    = "adam,sgdm",
    repeats: Annotated[int, typer.Option(metavar="N", rich_help_panel=TRAINING,
                                         help="Runs per optimizer from the one initialisation, differing only in "
                                              "the batch order (the paper's repeats).")] = 4,
    steps: Steps = 300,
    targets: Annotated[Targets, typer.Option(rich_help_panel=TRAINING,
                                             help="real: predict the next token; random: a target token per "
                                                  "position drawn once and kept, to be memorised (Sec. 4.2).")]
    = Targets.real,
    switch_at: Annotated[int | None, typer.Option(metavar="STEP", rich_help_panel=TRAINING,
                                                  help="Also train runs of the baseline that switch to the first "
                                                       "other optimizer after this step (App. A.4).")] = None,
    blocks: Annotated[int | None, typer.Option(metavar="N", rich_help_panel=TRAINING,
                                               help="Train on the first N blocks of 64 tokens of the text "
                                                    "(default: all with real targets, 256 with random ones).")]
    = None,
    text: Text = None,
    coords: Coords = 12,
    layers: Annotated[list[str] | None, typer.Option("--layers", "-l", metavar="GLOB", rich_help_panel=SAMPLING,
                                                     help="Glob over parameter names of the layers audited (repeat "
                                                          "for several; default: every layer).")] = None,
    seed: Seed = 0,
    device: Device = "auto",
    debug: Debug = False,
    version: Version = False,
):
    """The paper's protocol: repeats from one initialisation per optimizer, each compared per layer with the
    baseline at equal steps and at matched loss, as mean (std) tables and a verdict with its uncertainty."""
    with handle_errors(ctx):
        from ..experiment import ExperimentConfig

        names = tuple(o.strip() for o in optimizers.split(",") if o.strip())
        _run(Path(out), ExperimentConfig(optimizers=names, repeats=repeats, steps=steps, targets=targets.value,
                                         switch_at=switch_at, blocks=blocks, text=text, coords=coords,
                                         layers=tuple(layers or ()), seed=seed, device=device))


@app.command(cls=Command)
def demo(
    ctx: typer.Context,
    out: Out = "geomaudit-demo",
    steps: Steps = 300,
    device: Device = "auto",
    seed: Seed = 0,
    text: Text = None,
    coords: Coords = 12,
    debug: Debug = False,
    version: Version = False,
):
    """`geomaudit experiment` with its defaults: Adam and SGD+M, 4 repeats of 300 steps each on the Python
    reference manual, compared per layer at equal steps and at matched loss (under 5 minutes on a 2-core CPU)."""
    with handle_errors(ctx):
        from ..experiment import ExperimentConfig

        _run(Path(out), ExperimentConfig(steps=steps, device=device, seed=seed, text=text, coords=coords))


def _run(folder: Path, config) -> None:
    from ..errors import InputError, UsageError
    from ..experiment import run_experiment
    from ..report.tables import compare_tables
    from ..runtime import check_seed

    config.validate()
    check_seed(config.seed)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UsageError(f"--out {folder} is not a folder: give a new or empty folder")
    if folder.exists() and any(folder.iterdir()):
        raise UsageError(f"--out {folder} is not empty: choose a new folder")
    if config.text and not Path(config.text).is_file():
        raise InputError(f"--text {config.text} does not exist")
    with progress_bars() as progress:
        result = run_experiment(folder, config, progress)
    print_tables([grid for document in result["documents"].values() for grid in compare_tables(document)])
    lines = summary_lines(folder, result, config) + _plots(folder, result["documents"])
    to_stdout(lambda stdout: stdout.write("".join(f"{line}\n" for line in lines)))


def summary_lines(folder: Path, result: dict, config) -> list[str]:
    """Final losses, then one verdict per comparison and pairing, then where everything is and how long it took."""
    import numpy as np

    from ..compare import verdict
    from ..experiment import ratio_name

    lines = []
    for family in config.schedules():
        final = np.array([log[-1]["loss"] for run, log in result["logs"].items() if run.rsplit("-", 1)[0] == family])
        spread = f" (std {final.std(ddof=1):.3f} over {len(final)} repeats)" if len(final) > 1 else ""
        lines.append(f"final training loss, {config.tag(family)}: {final.mean():.3f}{spread}")
    summaries = {}
    for a, b, stem in result["comparisons"]:
        for pair in result["documents"][stem]["compare"]["pairs"]:
            where = f"at {pair['label']}" if pair["step"] is not None else f"at matched {pair['label']}"
            said = f"not compared ({pair['refused']})" if pair["refused"] else verdict(pair["summary"],
                                                                                       ratio_name(config, a, b))
            lines.append(f"{where}: {said}")
            if not pair["refused"] and pair["summary"]["n_layers"]:
                summaries.setdefault(ratio_name(config, a, b), []).append(pair["summary"])
    lines += [overall(ratio, found) for ratio, found in summaries.items()]
    seconds = result["seconds"]
    lines.append(f"wrote {folder}/: runs {', '.join(result['logs'])} (checkpoint-<step>/), reports "
                 f"{', '.join(f'{stem}.json' for stem in result['documents'])}")
    lines.append(f"time: training {_duration(seconds['training'])}, audits {_duration(seconds['audit'])}")
    return lines


def overall(ratio: str, summaries: list[dict]) -> str:
    """One line per comparison: at how many of its compared points (equal steps, matched losses) the interval is
    above 1, below 1, or holds 1."""
    n = len(summaries)
    counts = {e: sum(s["effect"] == e for s in summaries) for e in ("above_1", "below_1", "none")}
    repeats = summaries[0]["n_repeats"]
    if repeats == 1:
        return (f"verdict, {ratio}: one run per optimizer, so no interval holds the run-to-run variation: no effect "
                "can be told from it (use --repeats 2 or more)")
    if counts["none"] == n:
        return f"verdict, {ratio}: no effect found: at each of the {n} compared points the interval includes 1"
    parts = [f"{counts[e]} of {n} compared points {what}" for e, what in
             (("above_1", "above 1"), ("below_1", "below 1"), ("none", "with an interval that includes 1")) if counts[e]]
    return f"verdict, {ratio}: " + ", ".join(parts) + f" (95% intervals over {repeats} repeats and the layers)"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def _plots(folder: Path, documents: dict) -> list[str]:
    try:
        from ..report.plots import plot_report
    except ImportError:
        return ["plots: pip install 'geomaudit[plot]' (matplotlib), then geomaudit report FILE.json --plot FILE.png"]
    written = []
    for stem, document in documents.items():
        plot_report(document, folder / f"{stem}.png")
        written.append(f"{stem}.png")
    return [f"plots: {', '.join(written)}"] if written else []
