"""``geomaudit svd``: singular spectrum, low-rank flag, R_u and R_v of every weight matrix (SPEC §1, §4; Sec. 6).

Weights only: no data and no Hessian. Each checkpoint of a run is loaded in turn; the layers are its ≥2-D
trainable tensors read as (out, in) matrices (``geomaudit.engine.svd``).
"""

from typing import Annotated

import typer

from . import options as o
from .common import (Command, FormatOption, JsonOption, TableOption, app, check_json_target, check_tables, emit,
                     handle_errors, progress_bars, stderr)

CONVENTION = "(out, in); GPT-2 Conv1D weights transposed"
DEFAULT_ENERGY = 0.9
TOP = 10
EXACT_MAX = 4096

Layers = Annotated[list[str] | None, typer.Option("--layers", "-l", metavar="GLOB", rich_help_panel=o.SAMPLING,
                                                  help="Glob over parameter names (repeat for several); default: "
                                                       "every weight. Tensors with fewer than 2 dimensions are "
                                                       "skipped.")]
Rank = Annotated[int | None, typer.Option(metavar="K", rich_help_panel=o.STATISTICS,
                                          help="Keep the top k singular triplets for R_u, R_v and the low-rank "
                                               "flag (instead of --energy).")]
Energy = Annotated[float | None, typer.Option(metavar="E", rich_help_panel=o.STATISTICS,
                                              help="Keep the smallest k whose singular values hold this share of "
                                                   "Σσ² = ‖W‖_F² \\[default: 0.9].")]


@app.command(cls=Command)
def svd(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Argument(metavar="CKPT", help="A Hugging Face save_pretrained directory, a "
                                              "state-dict file with --model, or a run directory of checkpoints.")],
    model: o.Model = None,
    allow_pickle: o.AllowPickle = False,
    merge: o.Merge = False,
    steps: o.Steps = None,
    every: o.Every = None,
    layers: Layers = None,
    rank: Rank = None,
    energy: Energy = None,
    json_path: JsonOption = None,
    format: FormatOption = None,
    table: TableOption = False,
    debug: o.Debug = False,
    version: o.Version = False,
):
    """Singular spectrum, effective rank, low-rank flag, R_u and R_v per weight matrix (no data needed)."""
    with handle_errors(ctx):
        check_json_target(json_path)
        check_tables(json_path, format and format.value, table)
        settings = svd_settings(layers or [], rank, energy, o.parse_numbers(steps, "--steps"), every, model,
                                merge)
        from ..report.tables import svd_tables

        with progress_bars() as progress:
            document = run_svd(checkpoint, settings, allow_pickle, progress)
        if document["model"]["initialised"]:
            stderr.print(f"note: {', '.join(document['model']['initialised'])} (added by transformers, not in the "
                         "checkpoint) left out", highlight=False, soft_wrap=True)
        emit(document, json_path, svd_tables, format and format.value, table)


def svd_settings(layers: list[str], rank: int | None, energy: float | None, steps: tuple[int, ...] | None,
                 every: int | None, model: str | None, merge: bool = False) -> dict:
    """The report's ``settings``; ``energy`` is ``null`` when ``--rank`` fixes k."""
    from ..errors import UsageError

    if rank is not None and energy is not None:
        raise UsageError("give --rank or --energy, not both")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise UsageError(f"--energy is a share of the spectrum's energy in (0, 1], got {energy}")
    return {"layers": list(layers), "rank": rank,
            "energy": None if rank is not None else (DEFAULT_ENERGY if energy is None else energy),
            "top": TOP, "exact_max": EXACT_MAX, "steps": None if steps is None else list(steps), "every": every,
            "model": model, "merge": merge}


def run_svd(checkpoint: str, settings: dict, allow_pickle: bool, progress) -> dict:
    """Discover the checkpoints, load each, and summarise the spectrum of every selected weight matrix."""
    from ..engine.audit import select_layers
    from ..engine.svd import model_spectra
    from ..errors import UsageError
    from ..io.checkpoints import load_checkpoint
    from ..io.trajectory import discover

    from ..progress import Plan, PlannedLayer

    trajectory = discover(checkpoint, settings["steps"], settings["every"])
    model_info, results = None, []
    for position, ref in enumerate(trajectory.checkpoints, 1):
        progress.status(f"loading {ref.path}")
        # has_labels: a headless Hugging Face model loads with a seeded head, left out below
        loaded = load_checkpoint(ref.path, has_labels=True, factory=settings["model"], allow_pickle=allow_pickle,
                                 merge=settings["merge"])
        model_info = model_info or loaded.describe()
        params = dict(loaded.model.named_parameters())
        names = [n for n in select_layers(loaded.model, settings["layers"]) if n not in loaded.initialised]
        matrices = [n for n in names if params[n].ndim >= 2]
        if not matrices:
            raise UsageError("the selected layers hold no tensor with 2 or more dimensions: svd needs weight "
                             "matrices, not biases or norms")
        if position == 1:  # one architecture: the first checkpoint's weights are every checkpoint's
            plan = Plan(tuple(str(r.path) for r in trajectory.checkpoints),
                        tuple(PlannedLayer(n, tuple(params[n].shape), 0, 0) for n in matrices), 0, hessian=False)
            progress.status(plan.line())
            progress.plan(plan)
        progress.checkpoint(position, len(trajectory.checkpoints))
        layers = model_spectra(loaded.model, matrices, rank=settings["rank"],
                               energy=settings["energy"] or DEFAULT_ENERGY, top=TOP, exact_max=EXACT_MAX,
                               on_layer=lambda i, n, name: progress.on_layer(i, n, name, 1))
        results.append({"path": str(ref.path), "step": ref.step, "skipped_1d": len(names) - len(matrices),
                        "layers": [_json_layer(layer) for layer in layers]})
    progress.plan(None)
    return svd_document(settings, model_info, results, trajectory.describe())


def _json_layer(layer: dict) -> dict:
    from ..results import json_number

    undefined = ("energy_top_k", "r_u", "r_v", "stable_rank")
    return {k: json_number(v) if k in undefined else v for k, v in layer.items()}


def svd_document(settings: dict, model: dict, checkpoints: list[dict], trajectory: dict) -> dict:
    """The ``geomaudit.report/1`` document of ``svd``: the common header, and ``svd`` in place of data and
    Hessian checkpoints (computed on the CPU in float64)."""
    import torch

    from ..report.document import report_document

    header = report_document("svd", settings, model, {}, [], torch.device("cpu"), torch.float64)
    return {k: v for k, v in header.items() if k not in ("data", "checkpoints")} | {
        "trajectories": [trajectory], "svd": {"convention": CONVENTION, "checkpoints": checkpoints}}
