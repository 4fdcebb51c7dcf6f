"""``GeometryCallback``: audit the live model every N steps of a ``transformers.Trainer`` run (SPEC §4).

At every ``every``-th optimizer step the model being trained is audited in place, exactly as ``geomaudit rmed``
audits a saved checkpoint (same batch, same seeded coordinates at every step, eval mode, eager attention), the
full report is written beside the checkpoints as ``<output_dir>/geomaudit-step-<step>.json``, and a summary joins
the Trainer's log of that step (the step is made a logging step): ``geomaudit/<metric>_median`` and
``geomaudit/<metric>_max`` over layers, ``geomaudit/loss`` (the audit loss) and ``geomaudit/<metric>/<layer>``.
"""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ..engine.audit import audit_checkpoint, select_layers
from ..errors import UsageError
from ..io.checkpoints import LoadedModel
from ..io.tasks import infer_task
from ..io.data import build_batch, embedded_corpus, has_labels, read_records
from ..pipeline import EMBEDDED_SOURCE, AuditConfig
from ..report.document import report_document, write_json
from ..results import CheckpointResult

METRICS = ("r_med", "r_med_stab", "r_topk", "zero_frac", "max_abs", "median_abs", "mean_abs")


def _first_float(model: nn.Module) -> nn.Parameter:
    """A floating-point parameter: its device and dtype are the model's (the audit runs in them)."""
    return next(p for p in model.parameters() if p.is_floating_point())


class GeometryCallback(TrainerCallback):
    """Audit the trained model every ``every`` steps, log an R_med summary and write the JSON report.

    ``data`` is a data file (as ``--data``), a dict of tensors (input_ids, attention_mask, labels …), or ``None``
    for the embedded corpus tokenized with ``tokenizer`` (default: the Trainer's ``processing_class``). The batch
    is built once, at the first audit. Only the world process zero audits.

    Values reach ``trainer.state.log_history`` (so ``trainer_state.json``) and the callbacks after this one. The
    reporting integrations (TensorBoard, W&B …) run before callbacks passed to the Trainer, so for them to see
    the values too, put the callback first with ``GeometryCallback(...).attach(trainer)``.
    """

    def __init__(self, every: int, data: str | os.PathLike | Mapping[str, Tensor] | None = None, coords: int = 50,
                 layers: Sequence[str] = (), batch_size: int = 16, max_length: int = 128, seed: int = 0,
                 metric: str = "r_med_stab", tokenizer=None):
        if every < 1:
            raise UsageError(f"every must be at least 1, got {every}")
        if metric not in METRICS:
            raise UsageError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.config = AuditConfig("", coords=coords, layers=tuple(layers), batch_size=batch_size,
                                  max_length=max_length, seed=seed, every=every)
        self.config.validate()
        self.every, self.data, self.metric, self.tokenizer = every, data, metric, tokenizer
        self._prepared: tuple | None = None
        self._pending: dict[str, float] | None = None

    def attach(self, trainer) -> "GeometryCallback":
        """Make this the Trainer's first callback, so that the reporting integrations log its values."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def _prepare(self, model: nn.Module, tokenizer) -> tuple:
        records, source = self.data, "tensors given to GeometryCallback"
        if isinstance(records, (str, os.PathLike)):
            records, source = read_records(Path(records)), str(records)
        elif records is None:
            if tokenizer is None:
                raise UsageError("GeometryCallback needs data= when the Trainer has no processing_class (tokenizer)")
            records, source = embedded_corpus(), EMBEDDED_SOURCE
        else:
            records = dict(records)
        task = infer_task(type(model).__name__, has_labels(records))
        loaded = LoadedModel(model, task, "", "huggingface", tokenizer)
        c = self.config
        batch = build_batch(records, loaded, batch_size=c.batch_size, max_length=c.max_length, seed=c.seed,
                            source=source)
        param = _first_float(model)
        return loaded, batch, batch.micro_batches(loaded, batch.examples, param.device, param.dtype)

    def audit(self, model: nn.Module, step: int, output_dir: str | None = None, tokenizer=None) -> CheckpointResult:
        """Audit ``model`` as it is, leaving its mode, attention, ``requires_grad`` flags and ``.grad`` untouched.

        With ``output_dir``, the report goes to ``<output_dir>/geomaudit-step-<step>.json`` (written atomically).
        """
        if self._prepared is None:
            self._prepared = self._prepare(model, tokenizer or self.tokenizer)
        loaded, batch, micro = self._prepared
        c, training = self.config, model.training
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        switch = attention not in (None, "eager") and hasattr(model, "set_attn_implementation")
        try:  # SDPA kernels have no double backward
            model.eval()
            if switch:
                model.set_attn_implementation("eager")
            with torch.enable_grad():
                result = audit_checkpoint(model, loaded.loss_fn, micro, select_layers(model, c.layers),
                                          coords=c.coords, seed=c.seed, topk=c.topk, path=output_dir or "", step=step)
        finally:
            if switch:
                model.set_attn_implementation(attention)
            model.train(training)
        if output_dir:
            param = _first_float(model)
            settings = c.settings() | {"precision": "fp64" if param.dtype == torch.float64 else "fp32"}
            data = batch.describe(loaded, micro)
            document = report_document("rmed", settings, loaded.describe() | {"path": str(output_dir)}, data,
                                       [result], param.device, param.dtype)
            os.makedirs(output_dir, exist_ok=True)
            write_json(document, os.path.join(output_dir, f"geomaudit-step-{step}.json"))
        return result

    def summary(self, result: CheckpointResult) -> dict[str, float]:
        """The values logged for one audit: median and max of the metric over layers, loss, and each layer's
        (layers whose Hessian is zero to round-off have no ratio and are left out)."""
        per_layer = {f"geomaudit/{self.metric}/{la.name}": float(la.stats[self.metric]) for la in result.layers
                     if not la.zero_hessian}  # no ratio where the Hessian is zero to round-off
        values = np.array(list(per_layer.values()))
        over = {f"geomaudit/{self.metric}_median": float(np.median(values)),
                f"geomaudit/{self.metric}_max": float(values.max())} if values.size else {}
        return over | {"geomaudit/loss": result.loss} | per_layer

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every:
            return
        control.should_log = True  # on every process: logging gathers the loss across them
        if state.is_world_process_zero:
            self._pending = self.summary(self.audit(model, state.global_step, args.output_dir, processing_class))

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the latest audit's summary to this log and to its entry in ``state.log_history``."""
        if self._pending is None or logs is None:
            return
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = None
