"""``geomaudit rmed``: the R_med family per layer of a checkpoint or of every checkpoint of a run (SPEC §1, §4)."""

from typing import Annotated

import typer

from . import options as o
from .common import (FormatOption, JsonOption, TableOption, app, check_json_target, check_tables,
                     emit, handle_errors, progress_bars, ranks, stderr)


@app.command()
def rmed(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Argument(help="A Hugging Face save_pretrained directory, a state-dict file "
                                                   "with --model, or a run directory of checkpoints.")],
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
    fail_above: Annotated[float | None, typer.Option(help="Exit 1 when a layer's --metric is above this "
                                                          "(a CI gate).")] = None,
):
    """Per-layer R_med, R_med_stab, R_topk and zero fraction of the exact Hessian diagonal."""
    with handle_errors(ctx):
        check_json_target(json_path)
        check_tables(json_path, format and format.value, table)
        config = o.audit_config(checkpoint, locals())
        from ..gates import fail_above as gate
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
            gate(document, fail_above, metric.value,
                 lambda note: stderr.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True))
