"""``geomaudit rmed``: the R_med family per layer of a checkpoint or of every checkpoint of a run (SPEC §1, §4)."""

from typing import Annotated

import typer

from . import options as o
from .common import (Command, FormatOption, JsonOption, TableOption, app, check_json_target, check_tables,
                     dry_run_tables, emit, handle_errors, progress_bars, ranks, stderr)


@app.command(cls=Command)
def rmed(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Argument(metavar="CKPT", help="A Hugging Face save_pretrained directory, a "
                                              "state-dict file with --model, or a run directory of checkpoints.")],
    data: o.Data = None,
    batch_size: o.BatchSize = None,
    max_length: o.MaxLength = 128,
    task: o.TaskOpt = o.Task.auto,
    model: o.Model = None,
    loss: o.Loss = None,
    allow_pickle: o.AllowPickle = False,
    merge: o.Merge = False,
    ci: o.Ci = False,
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
    fail_above: Annotated[float | None, typer.Option(metavar="R", rich_help_panel=o.GATES,
                                                     help="Exit 1 when a layer's --metric is above R.")] = None,
    metric: o.GateMetric = None,
    baseline: Annotated[str | None, typer.Option(metavar="REPORT.json", rich_help_panel=o.GATES,
                                                 help="An earlier rmed --json report of this model on the same "
                                                      "data, coordinates and steps, for --fail-if-increase.")] = None,
    fail_if_increase: Annotated[float | None, typer.Option(metavar="X", rich_help_panel=o.GATES,
                                                           help="Exit 1 when a layer's --metric is more than X times "
                                                                "its value in --baseline.")] = None,
):
    """Per-layer R_med, R_med_stab, R_topk and zero fraction of the exact Hessian diagonal."""
    with handle_errors(ctx):
        from .. import gates

        check_json_target(json_path)
        check_tables(json_path, format and format.value, table)
        config = o.audit_config(checkpoint, locals())
        gate_metric = o.gate_metric(metric, fail_above is not None or fail_if_increase is not None)
        gates.check_metric(gate_metric, config)
        earlier = _baseline(baseline, fail_if_increase, config, gate_metric)
        from ..pipeline import plan_rmed, run_rmed
        from ..report.tables import rmed_tables

        if dry_run:
            with ranks() as speaks, progress_bars() as progress:
                plan = plan_rmed(config, progress)
            if speaks:
                dry_run_tables(plan, format and format.value)
            return
        with ranks() as speaks, progress_bars() as progress:
            document = run_rmed(config, progress)
        if document["model"]["initialised"]:
            stderr.print(f"note: {', '.join(document['model']['initialised'])} not in the checkpoint: "
                         f"initialised from --seed {seed}", highlight=False, soft_wrap=True)
        if speaks:
            emit(document, json_path, rmed_tables, format and format.value, table)

        def note(text: str) -> None:
            stderr.print(f"note: {text}", markup=False, highlight=False, soft_wrap=True)

        reasons = []
        if fail_above is not None:
            reasons.append(gates.fail_above(document, fail_above, gate_metric, note))
        if earlier is not None:
            reasons.append(gates.fail_if_increase(document, earlier, baseline, fail_if_increase, gate_metric, note))
        gates.conclude(reasons)


def _baseline(path: str | None, factor: float | None, config, metric: str) -> dict | None:
    """The --baseline report, read and checked before any work; the two options go together."""
    from ..errors import UsageError
    from ..gates import check_baseline
    from .report import read_report

    if (path is None) != (factor is None):
        raise UsageError("--baseline and --fail-if-increase go together: the gate compares with the baseline")
    if path is None:
        return None
    if not factor > 0:
        raise UsageError(f"--fail-if-increase is a factor above 0, got {factor}")
    document = read_report(path)
    check_baseline(document, path, config, metric)
    return document
