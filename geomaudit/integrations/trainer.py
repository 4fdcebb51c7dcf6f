"""``GeometryCallback``: audit the live model every N steps of a ``transformers.Trainer`` run (SPEC §4).

At every ``every``-th optimizer step the model being trained is audited in place, exactly as ``geomaudit rmed``
audits a saved checkpoint (same batch, same seeded coordinates at every step, eval mode, eager attention), the
full report is written beside the checkpoints as ``<output_dir>/geomaudit-step-<step>.json``, and the values join
the Trainer's log of that step (the step is made a logging step): the summary ``geomaudit/<metric>_median``,
``geomaudit/<metric>_max`` over layers and ``geomaudit/loss`` (the audit loss) everywhere, the per-layer
``geomaudit/<metric>/<layer>`` in ``state.log_history`` and the reporting integrations but not on the console.

The audit batch is built and checked when training begins, where bad data or layer globs raise before any
training time is spent; later, a failing audit is logged as one warning and skipped: it never stops training.
"""

import contextlib
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..engine.audit import audit_checkpoint, audit_loss, select_layers
from ..engine.fused import fused_blocks
from ..errors import InputError, UsageError
from ..io.checkpoints import LoadedModel
from ..io.tasks import infer_task
from ..io.data import build_batch, embedded_corpus, has_labels, read_records
from ..pipeline import EMBEDDED_SOURCE, AuditConfig
from ..report.document import report_document, write_json
from ..results import CheckpointResult

METRICS = ("r_med", "r_med_stab", "r_topk", "zero_frac", "max_abs", "median_abs", "mean_abs")
CONSOLE = (PrinterCallback, ProgressCallback)  # the callbacks that print the Trainer's logs

logger = logging.getLogger(__name__)


def _first_float(model: nn.Module) -> nn.Parameter:
    """A floating-point parameter: its device and dtype are the model's (the audit runs in them)."""
    return next(p for p in model.parameters() if p.is_floating_point())


@contextlib.contextmanager
def _audit_mode(model: nn.Module):
    """``eval()`` mode and eager attention (SDPA kernels have no double backward), restored afterwards."""
    training = model.training
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = attention not in (None, "eager") and hasattr(model, "set_attn_implementation")
    try:
        model.eval()
        if switch:
            model.set_attn_implementation("eager")
        yield
    finally:
        if switch:
            model.set_attn_implementation(attention)
        model.train(training)


def _one_line(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


class GeometryCallback(TrainerCallback):
    """Audit the trained model every ``every`` steps, log an R_med summary and write the JSON report.

    ``data`` is a data file (as ``--data``), a dict of tensors (input_ids, attention_mask, labels …), or ``None``
    for the embedded corpus tokenized with ``tokenizer`` (default: the Trainer's ``processing_class``). The other
    settings and their defaults are ``geomaudit rmed``'s. The batch is built and checked at ``on_train_begin``
    (an error there is raised: nothing has been trained yet); an audit that fails later is logged as a warning
    and skipped. Only the world process zero audits. ``split_fused`` audits fused q/k/v parameters as their blocks
    (as ``--split-fused``; one ``UserWarning`` names the fused parameters it cannot split).

    Values reach ``trainer.state.log_history`` (so ``trainer_state.json``) and the callbacks after this one. The
    reporting integrations (TensorBoard, W&B …) run before callbacks passed to the Trainer, so for them to see
    the values too, put the callback first with ``GeometryCallback(...).attach(trainer)``.
    """

    def __init__(self, every: int, data: str | os.PathLike | Mapping[str, Tensor] | None = None,
                 coords: int = AuditConfig.coords, layers: Sequence[str] = (), batch_size: int | None = None,
                 micro_batch: int | None = None, max_length: int = AuditConfig.max_length,
                 seed: int = AuditConfig.seed, topk: int = AuditConfig.topk, metric: str = "r_med_stab",
                 tokenizer=None, split_fused: bool = False):
        if every < 1:
            raise UsageError(f"every must be at least 1, got {every}")
        if metric not in METRICS:
            raise UsageError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.config = AuditConfig("", coords=coords, layers=tuple(layers), batch_size=batch_size,
                                  micro_batch=micro_batch, max_length=max_length, seed=seed, topk=topk, every=every,
                                  split_fused=split_fused)
        self.config.validate()
        self.every, self.data, self.metric, self.tokenizer = every, data, metric, tokenizer
        self._prepared: tuple | None = None
        self._pending: tuple[dict[str, float], dict[str, float]] | None = None
        self._console = _ConsoleFilter()
        self._attached = False

    def attach(self, trainer) -> "GeometryCallback":
        """Make this the Trainer's first callback, so that the reporting integrations log its values (the
        per-layer ones are taken out again before the console prints the log)."""
        callbacks = trainer.callback_handler.callbacks
        for callback in (self, self._console):
            if callback in callbacks:
                callbacks.remove(callback)
        callbacks.insert(0, self)
        printer = next((i for i, c in enumerate(callbacks) if isinstance(c, CONSOLE)), len(callbacks))
        callbacks.insert(printer, self._console)
        self._attached = True
        return self

    def prepare(self, model: nn.Module, tokenizer=None) -> None:
        """Build the audit batch and check it against ``model``: the layer globs match, the data fits (one
        forward pass in eval mode, which draws no random numbers). Raises ``UsageError`` / ``InputError``."""
        records, source = self.data, "tensors given to GeometryCallback"
        if isinstance(records, (str, os.PathLike)):
            records, source = read_records(Path(records)), str(records)
        elif records is None:
            tokenizer = tokenizer or self.tokenizer
            if tokenizer is None:
                raise UsageError("GeometryCallback needs data= when the Trainer has no processing_class (tokenizer)")
            records, source = embedded_corpus(), EMBEDDED_SOURCE
        else:
            records = dict(records)
        task = infer_task(type(model).__name__, has_labels(records))
        loaded = LoadedModel(model, task, "", "huggingface", tokenizer or self.tokenizer)
        c = self.config
        try:
            batch = build_batch(records, loaded, batch_size=c.batch_size, max_length=c.max_length, seed=c.seed,
                                source=source)
            param = _first_float(model)
            micro = batch.micro_batches(loaded, c.micro_batch or batch.examples, param.device, param.dtype)
        except (RuntimeError, IndexError, ValueError, TypeError, KeyError) as err:
            raise InputError(f"GeometryCallback's audit batch from {source} does not fit the model: "
                             f"{_one_line(err)}") from err
        found, uncovered = fused_blocks(model) if c.split_fused else ({}, [])
        if uncovered:
            warnings.warn(f"split_fused has no layout for {', '.join(uncovered)}: audited whole", stacklevel=3)
        select_layers(model, c.layers, found)
        with _audit_mode(model):
            audit_loss(model, loaded.loss_fn, micro)
        self._prepared = loaded, batch, micro, found

    def audit(self, model: nn.Module, step: int, output_dir: str | None = None, tokenizer=None) -> CheckpointResult:
        """Audit ``model`` as it is, leaving its mode, attention, ``requires_grad`` flags and ``.grad`` untouched.

        With ``output_dir``, the report goes to ``<output_dir>/geomaudit-step-<step>.json`` (written atomically).
        """
        if self._prepared is None:
            self.prepare(model, tokenizer)
        loaded, batch, micro, found = self._prepared
        c = self.config
        blocks = {b.name: b for bs in found.values() for b in bs}
        with _audit_mode(model), torch.enable_grad():
            result = audit_checkpoint(model, loaded.loss_fn, micro, select_layers(model, c.layers, found),
                                      blocks=blocks, coords=c.coords, seed=c.seed, topk=c.topk,
                                      path=output_dir or "", step=step)
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
        """The summary of one audit, for the console too: median and max of the metric over layers and the loss
        (layers whose Hessian is zero to round-off have no ratio and are left out)."""
        values = np.array(list(self.per_layer(result).values()))
        over = {f"geomaudit/{self.metric}_median": float(np.median(values)),
                f"geomaudit/{self.metric}_max": float(values.max())} if values.size else {}
        return over | {"geomaudit/loss": result.loss}

    def per_layer(self, result: CheckpointResult) -> dict[str, float]:
        """Each layer's metric, for the log history and the integrations (not the console)."""
        return {f"geomaudit/{self.metric}/{la.name}": float(la.stats[self.metric]) for la in result.layers
                if not la.zero_hessian}  # no ratio where the Hessian is zero to round-off

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.is_world_process_zero:
            self.prepare(model, processing_class)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every:
            return
        control.should_log = True  # on every process: logging gathers the loss across them
        if not state.is_world_process_zero:
            return
        try:
            result = self.audit(model, state.global_step, args.output_dir, processing_class)
        except Exception as err:  # an audit never stops training
            logger.warning("geomaudit: the audit at step %d failed and was skipped; training goes on (%s)",
                           state.global_step, _one_line(err))
            return
        self._pending = self.summary(result), self.per_layer(result)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the latest audit's values to this log and to its entry in ``state.log_history``."""
        if self._pending is None or logs is None:
            return
        summary, per_layer = self._pending
        if self._attached:  # the integrations come next and see every value; the console filter drops these
            logs.update(summary | per_layer)
            self._console.keys = set(per_layer)
        else:  # after the integrations: only the console and later callbacks see the log
            logs.update(summary)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(summary | per_layer)
        self._pending = None


class _ConsoleFilter(TrainerCallback):
    """Placed just before the callback that prints the logs: takes the per-layer values out of the log there."""

    def __init__(self):
        self.keys: set[str] = set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self.keys:
            if logs is not None:
                logs.pop(key, None)
        self.keys = set()
