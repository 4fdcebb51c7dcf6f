"""From command-line settings to a report: io → engine → results (no printing here)."""

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .engine.audit import audit_checkpoint, select_layers
from .errors import UsageError
from .io.checkpoints import load_checkpoint
from .io.data import TextRecords, build_batch, embedded_corpus, read_records
from .report.document import report_document
from .runtime import resolve_device, set_precision

EMBEDDED_SOURCE = "embedded corpus (pydoc_data.topics)"


@dataclass(frozen=True)
class AuditConfig:
    """Everything an ``rmed`` audit depends on; recorded in the report's ``settings``."""

    checkpoint: str
    data: str | None = None
    coords: int = 200
    layers: tuple[str, ...] = ()
    topk: int = 10
    batch_size: int = 32
    micro_batch: int | None = None
    max_length: int = 128
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    task: str = "auto"
    model: str | None = None
    loss: str | None = None
    allow_pickle: bool = False
    chunk_size: int | None = None

    def validate(self) -> None:
        for name in ("coords", "topk", "batch_size", "micro_batch", "max_length", "chunk_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("checkpoint", "data")}


@dataclass
class Progress:
    """Callbacks a front end passes in to show progress; every one is optional."""

    on_status: Callable[[str], None] | None = None
    on_layer: Callable[[int, int, str, int], None] | None = None
    on_chunk: Callable[[int], None] | None = None

    def status(self, message: str) -> None:
        if self.on_status:
            self.on_status(message)


def _label_count(records) -> int | None:
    labels = records.labels if isinstance(records, TextRecords) else None
    if not labels or not all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in labels):
        return None
    return max(2, max(int(v) for v in labels) + 1)


def run_rmed(config: AuditConfig, progress: Progress | None = None) -> dict:
    """Audit one checkpoint and return the report document (SPEC §4)."""
    progress = progress or Progress()
    config.validate()
    device, dtype = resolve_device(config.device), set_precision(config.precision)
    records = read_records(Path(config.data)) if config.data else None
    has_labels = (isinstance(records, TextRecords) and records.labels is not None) or (
        isinstance(records, dict) and "labels" in records)
    progress.status(f"loading {config.checkpoint}")
    loaded = load_checkpoint(config.checkpoint, task=config.task, has_labels=has_labels,
                             num_labels=_label_count(records), factory=config.model, loss=config.loss,
                             allow_pickle=config.allow_pickle, seed=config.seed)
    source = config.data
    if records is None:
        if loaded.task not in ("causal-lm", "masked-lm") or loaded.tokenizer is None:
            raise UsageError("--data is needed: only a language model with a tokenizer has a default batch")
        records, source = embedded_corpus(), EMBEDDED_SOURCE
    batch = build_batch(records, loaded, batch_size=config.batch_size, max_length=config.max_length,
                        seed=config.seed, source=source)
    model = loaded.model.to(device=device, dtype=dtype)
    micro = batch.micro_batches(loaded, config.micro_batch or batch.examples, device, dtype)
    layers = select_layers(model, config.layers)
    progress.status(f"auditing {len(layers)} layers on {batch.examples} examples")
    result = audit_checkpoint(model, loaded.loss_fn, micro, layers, coords=config.coords, seed=config.seed,
                              topk=config.topk, chunk_size=config.chunk_size, path=config.checkpoint,
                              on_layer=progress.on_layer, on_chunk=progress.on_chunk)
    data = batch.describe() | {"loss_items": sum(loaded.loss_items(mb.tensors) for mb in micro)}
    return report_document("rmed", config.settings(), loaded.describe(), data, [result], device, dtype)
