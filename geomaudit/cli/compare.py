"""``geomaudit compare``: R_med of two sets of runs, paired by step or by training loss (SPEC §4)."""

from enum import Enum
from typing import Annotated

import typer

from . import options as o
from .common import (Command, FormatOption, JsonOption, TableOption, app, check_json_target, check_tables,
                     dry_run_tables, emit, handle_errors, progress_bars, ranks)

DEFAULT_TOLERANCE = 0.02
DEFAULT_ENERGY = 0.9


class Reference(str, Enum):
    a = "a"
    b = "b"


class LossFrom(str, Enum):
    audit = "audit"
    trainer_state = "trainer_state"


@app.command(cls=Command)
def compare(
    ctx: typer.Context,
    run_a: Annotated[str, typer.Argument(metavar="RUN_A", help="Run A: a run directory, a checkpoint, or a quoted "
                                         "glob of runs (one per seed).")],
    run_b: Annotated[str, typer.Argument(metavar="RUN_B", help="Run B, likewise.")],
    more_a: Annotated[list[str] | None, typer.Option("--a", metavar="RUN", rich_help_panel=o.PAIRING,
                                                     help="Another run (seed) of side A; repeatable.")] = None,
    more_b: Annotated[list[str] | None, typer.Option("--b", metavar="RUN", rich_help_panel=o.PAIRING,
                                                     help="Another run (seed) of side B; repeatable.")] = None,
    match_loss: Annotated[bool, o.flag("--match-loss", panel=o.PAIRING, help="Pair checkpoints of equal training "
                                       "loss instead of equal step.")] = False,
    paired: Annotated[bool, o.flag("--paired", panel=o.PAIRING, help="Run i of A goes with run i of B (repeats "
                                   "from one initialisation): mean (std) of the per-repeat ratios, and an interval "
                                   "over repeats and layers.")] = False,
    tolerance: Annotated[float | None, typer.Option(metavar="T", rich_help_panel=o.PAIRING,
                                                    help="With --match-loss: the largest relative distance "
                                                         "|loss - level| / level of a matched checkpoint "
                                                         f"\\[default: {DEFAULT_TOLERANCE}].")] = None,
    levels: Annotated[str | None, typer.Option(metavar="L,L,…", rich_help_panel=o.PAIRING,
                                               help="With --match-loss: the loss levels to match, e.g. "
                                                    "0.25,0.17,0.13 (default: three levels across the overlap of "
                                                    "the loss curves).")] = None,
    loss_from: Annotated[LossFrom, typer.Option(rich_help_panel=o.PAIRING,
                                                help="audit: the loss recomputed on the audit batch (exact, the "
                                                     "same batch for both runs); trainer_state: the logged training "
                                                     "loss.")] = LossFrom.audit,
    metric: o.CompareMetric = o.Metric.r_med_stab,
    reference: Annotated[Reference, typer.Option(rich_help_panel=o.PAIRING,
                                                 help="The run in the ratio's denominator: a (ratio B/A) or b "
                                                      "(A/B).")] = Reference.a,
    rank: Annotated[int | None, typer.Option(metavar="K", rich_help_panel=o.PAIRING,
                                             help="With --metric r_u|r_v: the rank k of every weight (default: the "
                                                  "effective rank at --energy).")] = None,
    energy: Annotated[float | None, typer.Option(metavar="E", rich_help_panel=o.PAIRING,
                                                 help="With --metric r_u|r_v: the share of Σσ² that fixes k "
                                                      f"\\[default: {DEFAULT_ENERGY}].")] = None,
    data: o.Data = None,
    batch_size: o.BatchSize = None,
    max_length: o.MaxLength = 128,
    task: o.TaskOpt = o.Task.auto,
    model: o.Model = None,
    loss: o.Loss = None,
    allow_pickle: o.AllowPickle = False,
    merge: o.Merge = False,
    steps: o.Steps = None,
    every: o.Every = None,
    coords: o.Coords = o.DEFAULT_COORDS,
    layers: o.Layers = None,
    split_fused: o.SplitFused = False,
    seed: o.Seed = 0,
    topk: o.TopK = 10,
    smed: o.Smed = False,
    dense_max: o.DenseMax = None,
    slq: o.Slq = False,
    across: o.Across = None,
    alignment: o.Alignment = False,
    device: o.Device = "auto",
    precision: o.PrecisionOpt = o.Precision.fp32,
    micro_batch: o.MicroBatch = None,
    chunk_size: o.ChunkSize = None,
    json_path: JsonOption = None,
    format: FormatOption = None,
    table: TableOption = False,
    cache_dir: o.CacheDir = None,
    no_cache: o.NoCache = False,
    dry_run: o.DryRun = False,
    debug: o.Debug = False,
    version: o.Version = False,
    fail_if_ratio_below: Annotated[float | None, typer.Option(metavar="X", rich_help_panel=o.GATES,
                                                              help="Exit 1 when a pair's geometric-mean ratio is "
                                                                   "below X, or when nothing was compared.")] = None,
):
    """Per-layer R_med of runs A and B, their ratio, and a summary per pair of checkpoints."""
    with handle_errors(ctx):
        from ..errors import UsageError

        check_json_target(json_path)
        check_tables(json_path, format and format.value, table)
        r_uv = metric.value in ("r_u", "r_v")
        for option, value, applies, needs in (("--tolerance", tolerance, match_loss, "--match-loss"),
                                              ("--levels", levels, match_loss, "--match-loss"),
                                              ("--rank", rank, r_uv, "--metric r_u|r_v"),
                                              ("--energy", energy, r_uv, "--metric r_u|r_v")):
            if value is not None and not applies:
                raise UsageError(f"{option} applies only with {needs}")
        config = o.audit_config(run_a, locals(), loss_from.value)
        from ..pipeline import CompareConfig, run_compare
        from ..report.tables import compare_tables

        spec = CompareConfig(runs_a=(run_a, *(more_a or [])), runs_b=(run_b, *(more_b or [])),
                             match_loss=match_loss,
                             tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance,
                             levels=o.parse_numbers(levels, "--levels", float), reference=reference.value,
                             metric=metric.value, rank=rank, energy=DEFAULT_ENERGY if energy is None else energy,
                             paired=paired)
        if dry_run:
            from ..pipeline import plan_compare

            with ranks() as speaks, progress_bars() as progress:
                plan = plan_compare(config, spec, progress)
            if speaks:
                dry_run_tables(plan, format and format.value)
            return
        with ranks() as speaks, progress_bars() as progress:
            document = run_compare(config, spec, progress)
        if speaks:
            emit(document, json_path, compare_tables, format and format.value, table)
        if fail_if_ratio_below is not None:
            from ..gates import conclude, fail_if_ratio_below as gate

            conclude([gate(document, fail_if_ratio_below)])
