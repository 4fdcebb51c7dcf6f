"""``geomaudit rmed``: the R_med family per layer of a checkpoint or of every checkpoint of a run (SPEC §1, §4)."""

from typing import Annotated

import typer

from . import options as o
from .common import (Command, FormatOption, JsonOption, TableOption, app, check_json_target, check_tables, emit,
                     handle_errors, progress_bars, ranks, stderr)


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
    steps: o.Steps = None,
    every: o.Every = None,
    coords: o.Coords = o.DEFAULT_COORDS,
    layers: o.Layers = None,
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
    debug: o.Debug = False,
    version: o.Version = False,
    fail_above: Annotated[float | None, typer.Option(metavar="R", rich_help_panel=o.GATES,
                                                     help="Exit 1 when a layer's --metric is above R.")] = None,
    metric: o.GateMetric = None,
):
    """Per-layer R_med, R_med_stab, R_topk and zero fraction of the exact Hessian diagonal."""
    with handle_errors(ctx):
        from ..gates import check_metric, fail_above as gate

        check_json_target(json_path)
        check_tables(json_path, format and format.value, table)
        config = o.audit_config(checkpoint, locals())
        gate_metric = o.gate_metric(metric, fail_above is not None)
        check_metric(gate_metric, config)
        from ..pipeline import run_rmed
        from ..report.tables import rmed_tables

        with ranks() as speaks, progress_bars() as progress:
            document = run_rmed(config, progress)
        if document["model"]["initialised"]:
            stderr.print(f"note: {', '.join(document['model']['initialised'])} not in the checkpoint: "
                         f"initialised from --seed {seed}", highlight=False, soft_wrap=True)
        if speaks:
            emit(document, json_path, rmed_tables, format and format.value, table)
        if fail_above is not None:
            gate(document, fail_above, gate_metric,
                 lambda note: stderr.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True))
