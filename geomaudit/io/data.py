"""The audit batch: read data files, tokenize, build labels for the task, fingerprint (SPEC §3).

Text data (``.jsonl`` with ``text`` and optional ``label``, ``.csv`` with a ``text`` column, ``.txt`` one
example a line) is tokenized with the checkpoint's tokenizer, padded to the longest example.
Pre-tokenized data (``.safetensors``/``.pt``) holds ``input_ids``, ``attention_mask``, ``labels``.
What a task adds to the batch (labels, a mask …) is its row of ``tasks.TASKS``; the file formats are the
rows of ``DATA_FORMATS``.
"""

import csv
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..engine.hdiag import MicroBatch
from ..errors import InputError, UsageError
from .checkpoints import LoadedModel, read_state_dict
from .tasks import Examples

DEFAULT_TEXT_BATCH = 32
CHARS_PER_TOKEN = 32  # texts are cut to this many characters per token of --max-length before tokenizing


@dataclass(frozen=True)
class TextRecords:
    """Text examples: one text each, with a label each or none, and a target text each or none."""

    texts: list[str]
    labels: list | None = None
    targets: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: Sequence[int]) -> "TextRecords":
        def pick(values):
            return None if values is None else [values[i] for i in rows]

        return TextRecords(pick(self.texts), pick(self.labels), pick(self.targets))


@dataclass(frozen=True)
class AuditBatch:
    """The audit batch: tensors with examples along dim 0, where they came from, and their sha256."""

    tensors: dict[str, Tensor]
    source: str
    fingerprint: str
    available: int | None = None  # examples in the source; None: the batch is all of it
    seed: int | None = None  # the seed of the sample, when the batch is a sample

    @property
    def examples(self) -> int:
        return len(next(iter(self.tensors.values())))

    @property
    def selection(self) -> str:
        """How the batch was taken from its source, e.g. ``32 of 10,000 examples, sampled with seed 0``."""
        if self.seed is None:
            return f"all {self.examples:,} examples"
        return f"{self.examples:,} of {self.available:,} examples, sampled with seed {self.seed}"

    def micro_batches(self, loaded: LoadedModel, size: int, device: torch.device,
                      dtype: torch.dtype) -> list[MicroBatch]:
        """Slices of ``size`` examples, weighted by their share of the batch's loss items (SPEC §1, Loss)."""
        pieces = [{k: _to(v[s:s + size], device, dtype) for k, v in self.tensors.items()}
                  for s in range(0, self.examples, size)]
        split = len(pieces) > 1
        counts = [loaded.loss_items(p) for p in pieces] if split or loaded.custom_loss is None else [None]
        if None in counts:
            if not split:  # one piece: its weight is 1 whatever the loss averages over
                return [MicroBatch(pieces[0], 1.0)]
            raise UsageError(f"--micro-batch {size} would split the batch, but the loss does not say how many "
                             "terms it averages over, so the pieces cannot be weighted: use one micro-batch, or "
                             "--loss module:fn returning (loss, items)")
        total = sum(counts)
        if total == 0:
            raise InputError(f"the data from {self.source} leaves no token or example for the loss")
        return [MicroBatch(p, c / total) for p, c in zip(pieces, counts) if c]

    def describe(self, loaded: LoadedModel, micro_batches: list[MicroBatch]) -> dict:
        """The report's ``data`` section; ``loss_items`` counts what the audited micro-batches average over
        (``None`` when the loss does not say)."""
        shapes = {k: list(v.shape) for k, v in self.tensors.items()}
        counts = [loaded.loss_items(mb.tensors) for mb in micro_batches]
        return {"source": self.source, "fingerprint": self.fingerprint, "examples": self.examples,
                "available": self.available or self.examples, "sample_seed": self.seed, "selection": self.selection,
                "shapes": shapes, "loss_items": None if None in counts else sum(counts)}


def _to(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    return t.to(device, dtype) if t.is_floating_point() else t.to(device)


def fingerprint(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def has_labels(records: TextRecords | dict[str, Tensor]) -> bool:
    """Whether raw examples carry labels: a ``label`` on every text record, or a ``labels`` tensor."""
    return "labels" in records if isinstance(records, dict) else records.labels is not None


@dataclass(frozen=True)
class DataFormat:
    """A row of ``DATA_FORMATS``: ``matches(path)`` says whether ``read(path)`` takes the file or folder."""

    name: str  # as error messages list it
    matches: Callable[[Path], bool]
    read: Callable[[Path], "TextRecords | dict[str, Tensor]"]


def read_records(path: Path) -> TextRecords | dict[str, Tensor]:
    """Raw examples of a data file: text records, or a dict of tensors (the first format that takes it)."""
    if not path.exists():
        raise InputError(f"data file {path} does not exist")
    if path.is_dir() and not _is_dataset_folder(path):
        raise InputError(f"the data folder {path} is not a datasets save_to_disk folder (no state.json)")
    for fmt in DATA_FORMATS:
        if fmt.matches(path):
            return fmt.read(path)
    raise UsageError(f"cannot read data of type {path.suffix or '(none)'}: use "
                     f"{', '.join(f.name for f in DATA_FORMATS)}")


def _suffix(*suffixes: str) -> Callable[[Path], bool]:
    return lambda path: path.is_file() and path.suffix.lower() in suffixes


def _text_of(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text") from err


def _read_lines(path: Path) -> TextRecords:
    return TextRecords([ln for ln in _text_of(path).splitlines() if ln.strip()], None)


def _read_jsonl(path: Path) -> TextRecords | dict[str, Tensor]:
    return _rows(path, _jsonl_rows(path, _text_of(path)))


def _read_table(path: Path) -> TextRecords | dict[str, Tensor]:
    from .tables import read_rows

    return _rows(path, read_rows(path))


def _rows(path: Path, rows: list[dict]) -> TextRecords | dict[str, Tensor]:
    """Pre-tokenized rows (an ``input_ids`` field, used as they are) as tensors; else text records."""
    from .tables import rows_to_tensors

    if rows and all("input_ids" in r for r in rows):
        return rows_to_tensors(rows, str(path))
    return _text_rows(path, rows)


def _read_csv(path: Path) -> TextRecords:
    return _text_rows(path, list(csv.DictReader(_text_of(path).splitlines())))


def _read_tensors(path: Path) -> dict[str, Tensor]:
    return read_state_dict(path)


def _text_rows(path: Path, rows: list[dict]) -> TextRecords:
    """Examples from rows with a ``text`` field and, on every row or on none, a ``label``."""
    if not rows:
        raise InputError(f"{path} holds no examples")
    if any("text" not in r for r in rows):
        raise InputError(f"{path}: every example needs a `text` field")
    labelled = all(r.get("label") not in (None, "") for r in rows)
    return TextRecords([str(r["text"]) for r in rows], [r["label"] for r in rows] if labelled else None)


def _jsonl_rows(path: Path, text: str) -> list[dict]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path} line {n} is not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise InputError(f"{path} line {n} is not a JSON object")
        rows.append(row)
    return rows


def embedded_corpus() -> TextRecords:
    """Paragraphs of the Python reference manual topics that ship with CPython (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            para = " ".join(para.split())
            if len(para) >= 200 and para[0].isalpha():
                paragraphs.append(para)
    return TextRecords(paragraphs, None)


def build_batch(records: TextRecords | dict[str, Tensor], loaded: LoadedModel, *, batch_size: int | None,
                max_length: int, seed: int, source: str) -> AuditBatch:
    """The audit batch: ``batch_size`` examples, tokenized, with what the task needs (its ``prepare``).

    Without ``batch_size``, a file of tensors is the batch, whole, and text gives ``DEFAULT_TEXT_BATCH``
    examples. A batch smaller than the source is a seeded random sample of it (rows kept in file order),
    never its first rows: a file sorted by class would give a one-class batch.
    """
    available = _count(records, source)
    size = batch_size or (DEFAULT_TEXT_BATCH if isinstance(records, TextRecords) else available)
    sampled = size < available
    if sampled:
        rows = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:size].sort().values
        records = records.take(rows.tolist()) if isinstance(records, TextRecords) else {
            k: v[rows] for k, v in records.items()}
    if isinstance(records, TextRecords):
        tensors, examples = _tokenize(records, loaded, max_length)
    else:
        tensors, examples = dict(records), Examples()
    tensors = loaded.task.prepare(tensors, examples, loaded, seed)
    _check_fits(tensors, loaded, source)
    return AuditBatch(tensors, source, fingerprint(tensors), available, seed if sampled else None)


def _count(records: TextRecords | dict[str, Tensor], source: str) -> int:
    """The number of examples in ``records``; tensors must agree on it along dim 0."""
    if isinstance(records, TextRecords):
        if not len(records):
            raise InputError(f"{source} holds no examples")
        return len(records)
    if not records:
        raise InputError(f"{source} holds no tensors")
    lengths = {k: (len(v) if v.ndim else 0) for k, v in records.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise InputError(f"the tensors in {source} differ in length along dim 0: {lengths}")
    return next(iter(lengths.values()))


def _tokenize(records: TextRecords, loaded: LoadedModel, max_length: int) -> tuple[dict[str, Tensor], Examples]:
    """Each text cut to ``CHARS_PER_TOKEN`` characters per token of ``max_length`` (a 10 MB line is not
    tokenized whole), then tokenized, truncated at ``max_length`` and padded to the longest."""
    tok = loaded.tokenizer
    if tok is None:
        raise InputError("text data needs a tokenizer: use a Hugging Face checkpoint directory with tokenizer "
                         "files, or pre-tokenized .safetensors/.pt data")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    positions = _max_positions(loaded)
    if positions:
        max_length = min(max_length, positions)
    chars = max_length * CHARS_PER_TOKEN
    enc = tok([t[:chars] for t in records.texts], padding=True, truncation=True, max_length=max_length,
              return_tensors="pt", return_special_tokens_mask=True)
    tensors = dict(enc)
    special = tensors.pop("special_tokens_mask")
    return tensors, Examples(labels=records.labels, special_tokens_mask=special)


def _max_positions(loaded: LoadedModel) -> int | None:
    config = getattr(loaded.model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _check_fits(tensors: dict[str, Tensor], loaded: LoadedModel, source: str) -> None:
    """Catch data that cannot fit a Hugging Face model before it reaches an index error deep in torch."""
    config = getattr(loaded.model, "config", None)
    ids = tensors.get("input_ids")
    if config is None or ids is None:
        return
    vocab = getattr(config, "vocab_size", None)
    if vocab and int(ids.max()) >= vocab:
        raise InputError(f"{source} has token id {int(ids.max())}, beyond the model's vocabulary of {vocab}")
    positions = _max_positions(loaded)
    if positions and ids.shape[-1] > positions:
        raise InputError(f"{source} has sequences of {ids.shape[-1]} tokens; the model takes at most {positions}")
    if loaded.task.class_labels:
        labels, n = tensors["labels"], config.num_labels
        if labels.ndim == 1 and not labels.is_floating_point() and (int(labels.max()) >= n or int(labels.min()) < 0):
            raise InputError(f"{source} has labels outside 0..{n - 1} for a model with {n} labels")


DATA_FORMATS: tuple[DataFormat, ...] = (
    DataFormat(".jsonl", _suffix(".jsonl"), _read_jsonl),
    DataFormat(".csv", _suffix(".csv"), _read_csv),
    DataFormat(".txt", _suffix(".txt"), _read_lines),
    DataFormat(".safetensors/.pt/.bin", _suffix(".safetensors", ".pt", ".bin"), _read_tensors),
    DataFormat(".json", _suffix(".json"), _read_table),
    DataFormat(".parquet", _suffix(".parquet"), _read_table),
    DataFormat("a datasets save_to_disk folder", lambda path: _is_dataset_folder(path), _read_table),
)


def _is_dataset_folder(path: Path) -> bool:
    from .tables import is_dataset_folder

    return is_dataset_folder(path)
