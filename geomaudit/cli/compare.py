"""``geomaudit compare``: R_med of two sets of runs, paired by step or by training loss (SPEC §4)."""

from typing import Annotated

import typer

from . import options as o
from .common import (FormatOption, JsonOption, TableOption, app, check_json_target, check_tables,
                     emit, handle_errors, progress_bars, ranks)


@app.command()
def compare(
    ctx: typer.Context,
    run_a: Annotated[str, typer.Argument(help="Run A: a run directory, a checkpoint, or a quoted glob of runs "
                                              "(one per seed).")],
    run_b: Annotated[str, typer.Argument(help="Run B, likewise.")],
    more_a: Annotated[list[str] | None, typer.Option("--a", help="Another run (seed) of side A; repeatable.")] = None,
    more_b: Annotated[list[str] | None, typer.Option("--b", help="Another run (seed) of side B; repeatable.")] = None,
    match_loss: Annotated[bool, typer.Option("--match-loss", help="Pair checkpoints of equal training loss "
                                             "instead of equal step.")] = False,
    paired: Annotated[bool, typer.Option("--paired", help="Run i of A goes with run i of B (repeats from one "
                                         "initialisation): mean (std) of the per-repeat ratios, and an interval "
                                         "over repeats and layers.")] = False,
    tolerance: Annotated[float, typer.Option(help="Largest relative distance |loss - level| / level of a "
                                             "matched checkpoint.")] = 0.02,
    levels: Annotated[str | None, typer.Option(help="Loss levels to match, e.g. 0.25,0.17,0.13 (default: three "
                                               "levels across the overlap of the loss curves).")] = None,
    reference: Annotated[str, typer.Option(help="The run in the ratio's denominator: a (ratio B/A, the "
                                           "default) or b (A/B).")] = "a",
    loss_from: Annotated[str, typer.Option(help="audit: the loss recomputed on the audit batch (exact, the same "
                                           "batch for both runs); trainer_state: the logged training loss.")]
    = "audit",
    rank: Annotated[int | None, typer.Option(help="With --metric r_u|r_v: the rank k of every weight (default: "
                                             "the effective rank at --energy).")] = None,
    energy: Annotated[float, typer.Option(help="With --metric r_u|r_v: the share of Σσ² that fixes k.")] = 0.9,
    fail_if_ratio_below: Annotated[float | None, typer.Option(help="Exit 1 when a pair's geometric-mean ratio "
                                                              "is below this (a CI gate).")] = None,
    data: o.Data = None,
    coords: o.Coords = o.DEFAULT_COORDS,
    layers: o.Layers = None,
    topk: o.TopK = 10,
    json_path: JsonOption = None,
    format: FormatOption = None,
    table: TableOption = False,
    batch_size: o.BatchSize = None,
    micro_batch: o.MicroBatch = None,
    max_length: o.MaxLength = 128,
    seed: o.Seed = 0,
    device: o.Device = "auto",
    precision: o.PrecisionOpt = o.Precision.fp32,
    task: o.TaskOpt = o.Task.auto,
    model: o.Model = None,
    loss: o.Loss = None,
    allow_pickle: o.AllowPickle = False,
    chunk_size: o.ChunkSize = None,
    steps: o.Steps = None,
    every: o.Every = None,
    cache_dir: o.CacheDir = None,
    no_cache: o.NoCache = False,
    metric: o.MetricOpt = o.Metric.r_med_stab,
    smed: o.Smed = False,
    dense_max: o.DenseMax = 2048,
    slq: o.Slq = False,
    across: o.Across = None,
    alignment: o.Alignment = False,
    merge: o.Merge = False,
):
    """Per-layer R_med of runs A and B, their ratio, and a summary per pair of checkpoints."""
    with handle_errors(ctx):
        from ..gates import fail_if_ratio_below as gate
        from ..pipeline import CompareConfig, run_compare
        from ..report.tables import compare_tables

        check_json_target(json_path)
        check_tables(json_path, format and format.value, table)
        config = o.audit_config(run_a, locals(), loss_from)
        spec = CompareConfig((run_a, *(more_a or [])), (run_b, *(more_b or [])), match_loss, tolerance,
                             o.parse_numbers(levels, "--levels", float), reference, metric.value, rank, energy,
                             paired)
        with ranks() as speaks, progress_bars() as progress:
            document = run_compare(config, spec, progress)
        if speaks:
            emit(document, json_path, compare_tables, format and format.value, table)
        if fail_if_ratio_below is not None:
            gate(document, fail_if_ratio_below)
