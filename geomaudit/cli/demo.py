"""``geomaudit demo``: the paper's experiment end to end on this machine (SPEC §5)."""

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from .common import Command, app, handle_errors, print_tables, progress_bars, stderr, to_stdout
from .options import OUTPUT, PRECISION, SAMPLING, Debug, Version

TRAINING = "Training"


@app.command(cls=Command)
def demo(
    ctx: typer.Context,
    out: Annotated[str, typer.Option(metavar="DIR", rich_help_panel=OUTPUT,
                                     help="Folder for the runs, reports and plots (must be new or empty).")]
    = "geomaudit-demo",
    steps: Annotated[int, typer.Option(metavar="N", rich_help_panel=TRAINING, help="Training steps of each run.")]
    = 300,
    device: Annotated[str, typer.Option(metavar="DEVICE", rich_help_panel=PRECISION,
                                        help="auto (cuda if available, else cpu), cpu, cuda …")] = "auto",
    seed: Annotated[int, typer.Option(metavar="N", rich_help_panel=TRAINING,
                                      help="Seeds the initialisation, the batch order and the coordinates.")] = 0,
    text: Annotated[str | None, typer.Option(metavar="FILE", rich_help_panel=TRAINING,
                                             help="Train on this text file instead of the Python reference manual "
                                                  "that ships with CPython.")] = None,
    coords: Annotated[int, typer.Option(metavar="N", rich_help_panel=SAMPLING,
                                        help="Coordinates sampled per layer.")] = 30,
    debug: Debug = False,
    version: Version = False,
):
    """Train a small GPT-2 from one initialisation with Adam and with SGD+momentum, then audit and compare."""
    with handle_errors(ctx):
        from ..errors import InputError, UsageError
        from ..runtime import check_seed

        folder = Path(out)
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise UsageError(f"--out {folder} is not a folder: give a new or empty folder")
        if folder.exists() and any(folder.iterdir()):
            raise UsageError(f"--out {folder} is not empty: choose a new folder")
        check_seed(seed)
        if steps < 2:
            raise UsageError(f"--steps must be at least 2, got {steps}")
        if text and not Path(text).is_file():
            raise InputError(f"--text {text} does not exist")
        summary = run_demo(folder, steps, device, seed, text, coords)
        print_tables(summary.pop("tables"))
        to_stdout(lambda stdout: stdout.write("".join(f"{line}\n" for line in summary["lines"])))


def run_demo(folder: Path, steps: int, device: str, seed: int, text: str | None, coords: int) -> dict:
    """Train both runs, audit them, write every report; return the tables and the summary lines."""
    from safetensors.torch import save_file

    from ..demo import DemoConfig, corpus, initial_model, token_blocks, train_run, train_tokenizer
    from ..errors import InputError
    from ..pipeline import AuditConfig, CompareConfig, run_compare, run_rmed
    from ..report.document import write_json
    from ..report.tables import compare_tables
    from ..runtime import resolve_device
    from .svd import run_svd, svd_settings

    config = DemoConfig(steps=steps, save_every=max(1, steps // 10), seed=seed)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    where = resolve_device(device)
    folder.mkdir(parents=True, exist_ok=True)
    stderr.print(f"training a byte-level BPE ({config.vocab} tokens) on {text or 'the Python reference manual'}")
    words = corpus(text)
    tokenizer = train_tokenizer(words, config.vocab)
    blocks = token_blocks(words, tokenizer, config.block)
    if len(blocks) < 2 * config.batch_size:
        raise InputError(f"the text gives only {len(blocks)} blocks of {config.block} tokens: too short to train on")
    audit_ids = blocks[-config.batch_size:]  # the audit batch: the last blocks, which training rarely draws first
    save_file({"input_ids": audit_ids.contiguous()}, folder / "audit-batch.safetensors")
    init = folder / "init"
    initial_model(tokenizer, config).save_pretrained(init)
    tokenizer.save_pretrained(init)
    logs = {}
    for name in ("adam", "sgd"):
        with progress_bars() as progress:
            bar = progress.on_layer
            bar(1, 1, f"training {name} on {where}", config.steps)
            logs[name] = train_run(init, folder / name, name, blocks, tokenizer, config, where,
                                   on_step=lambda step, loss: progress.on_chunk(1))
    reports = {}
    # every checkpoint's loss is cheap, its audit is not: equal steps at a third, two thirds and the end;
    # matched losses over all checkpoints (only the matched ones are audited)
    saved = list(range(config.save_every, config.steps + 1, config.save_every))
    thirds = tuple(sorted({saved[round(f * (len(saved) - 1))] for f in (1 / 3, 2 / 3, 1)}))
    audit = AuditConfig(str(folder / "adam"), str(folder / "audit-batch.safetensors"), coords=coords,
                        batch_size=config.batch_size, seed=seed, device=device, cache_dir=str(folder / "cache"))
    at_thirds = replace(audit, steps=thirds)
    runs = ((str(folder / "adam"),), (str(folder / "sgd"),))
    with progress_bars() as progress:
        reports["compare-steps"] = run_compare(at_thirds, CompareConfig(*runs), progress)
        try:
            reports["compare-loss"] = run_compare(audit, CompareConfig(*runs, match_loss=True), progress)
        except InputError as err:
            stderr.print(f"no same-loss comparison: {err}", markup=False, highlight=False, soft_wrap=True)
        for name in ("adam", "sgd"):
            reports[f"rmed-{name}"] = run_rmed(replace(at_thirds, checkpoint=str(folder / name)), progress)
            reports[f"svd-{name}"] = run_svd(str(folder / name), svd_settings([], None, None, None, None, None),
                                             False, progress)
    for name, document in reports.items():
        write_json(document, folder / f"{name}.json")
    lines = _summary(reports, logs)
    lines += [f"wrote {folder}/: runs adam/ and sgd/ (checkpoint-<step>/), "
              f"{', '.join(f'{n}.json' for n in reports)}"]
    lines += _plots(folder, reports)
    last = reports["compare-steps"] | {"compare": reports["compare-steps"]["compare"]
                                       | {"pairs": reports["compare-steps"]["compare"]["pairs"][-1:]}}
    tables = compare_tables(last) + (compare_tables(reports["compare-loss"]) if "compare-loss" in reports else [])
    return {"tables": tables, "lines": lines}


def _summary(reports: dict, logs: dict) -> list[str]:
    """The comparison in the paper's words, with its uncertainty."""
    lines = [f"final training loss: Adam {logs['adam'][-1]['loss']:.3f}, SGD+M {logs['sgd'][-1]['loss']:.3f}"]
    for name, what in (("compare-steps", "at step"), ("compare-loss", "at matched loss")):
        for pair in reports.get(name, {}).get("compare", {}).get("pairs", []):
            s, where = pair["summary"], pair["label"].split(" ", 1)[1]
            if pair["refused"] or not s or not s["n_layers"]:
                lines.append(f"{what} {where}: not compared ({pair['refused'] or 'no layer'})")
                continue
            smaller = round(s["frac_above_1"] * s["n_layers"])
            lines.append(f"{what} {where}: Adam's R_med is smaller on {smaller} of {s['n_layers']} layers; "
                         f"geometric-mean R_SGDM/R_Adam {s['geo_mean']:.2f} (95% CI {s['ci_low']:.2f}–"
                         f"{s['ci_high']:.2f}), sign test p = {s['sign_p']:.2g}")
    return lines


def _plots(folder: Path, reports: dict) -> list[str]:
    try:
        from ..report.plots import plot_report
    except ImportError:
        return ["plots: pip install 'geomaudit[plot]' (matplotlib), then geomaudit report FILE.json --plot FILE.png"]
    written = []
    for name in ("rmed-adam", "rmed-sgd", "compare-steps", "compare-loss", "svd-adam"):
        if name in reports:
            plot_report(reports[name], folder / f"{name}.png")
            written.append(f"{name}.png")
    return [f"plots: {', '.join(written)}"]
