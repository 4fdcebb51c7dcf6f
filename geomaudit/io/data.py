"""The audit batch: read data files, tokenize, build labels for the task, fingerprint (SPEC §3).

Text data (``.jsonl`` with ``text`` and optional ``label``, ``.csv`` with a ``text`` column, ``.txt`` one
example a line) is tokenized with the checkpoint's tokenizer, padded to the longest example.
Pre-tokenized data (``.safetensors``/``.pt``) holds ``input_ids``, ``attention_mask``, ``labels``.
Labels per task: causal LMs predict their own tokens (``labels = input_ids``, padding ignored);
masked LMs get a seeded BERT-style mask of 15% of each example's ordinary tokens (at least one),
every chosen token replaced by the mask token; classifiers take ``label``.
"""

import csv
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..engine.hdiag import MicroBatch
from ..errors import InputError, UsageError
from .checkpoints import IGNORE_INDEX, LoadedModel, read_state_dict

TEXT_SUFFIXES = (".jsonl", ".csv", ".txt")
TENSOR_SUFFIXES = (".safetensors", ".pt", ".bin")
MASK_RATE = 0.15


@dataclass(frozen=True)
class TextRecords:
    texts: list[str]
    labels: list | None


@dataclass(frozen=True)
class AuditBatch:
    """The audit batch: tensors with examples along dim 0, where they came from, and their sha256."""

    tensors: dict[str, Tensor]
    source: str
    fingerprint: str

    @property
    def examples(self) -> int:
        return len(next(iter(self.tensors.values())))

    def micro_batches(self, loaded: LoadedModel, size: int, device: torch.device,
                      dtype: torch.dtype) -> list[MicroBatch]:
        """Slices of ``size`` examples, weighted by their share of the batch's loss items."""
        pieces = [{k: _to(v[s:s + size], device, dtype) for k, v in self.tensors.items()}
                  for s in range(0, self.examples, size)]
        counts = [loaded.loss_items(p) for p in pieces]
        total = sum(counts)
        if total == 0:
            raise InputError(f"the data from {self.source} leaves no token or example for the loss")
        return [MicroBatch(p, c / total) for p, c in zip(pieces, counts) if c]

    def describe(self, loaded: LoadedModel, micro_batches: list[MicroBatch]) -> dict:
        """The report's ``data`` section; ``loss_items`` counts what the audited micro-batches average over."""
        shapes = {k: list(v.shape) for k, v in self.tensors.items()}
        return {"source": self.source, "fingerprint": self.fingerprint, "examples": self.examples, "shapes": shapes,
                "loss_items": sum(loaded.loss_items(mb.tensors) for mb in micro_batches)}


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


def read_records(path: Path) -> TextRecords | dict[str, Tensor]:
    """Raw examples of a data file: text records, or a dict of tensors."""
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in TENSOR_SUFFIXES:
        return read_state_dict(path)
    if suffix not in TEXT_SUFFIXES:
        raise UsageError(f"cannot read data of type {suffix or '(none)'}: use .jsonl, .csv, .txt, .safetensors or .pt")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text") from err
    if suffix == ".txt":
        return TextRecords([ln for ln in text.splitlines() if ln.strip()], None)
    rows = _jsonl_rows(path, text) if suffix == ".jsonl" else list(csv.DictReader(text.splitlines()))
    if not rows:
        raise InputError(f"{path} holds no examples")
    if any("text" not in r for r in rows):
        raise InputError(f"{path}: every example needs a `text` field")
    has_labels = all(r.get("label") not in (None, "") for r in rows)
    return TextRecords([str(r["text"]) for r in rows], [r["label"] for r in rows] if has_labels else None)


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


def build_batch(records: TextRecords | dict[str, Tensor], loaded: LoadedModel, *, batch_size: int,
                max_length: int, seed: int, source: str) -> AuditBatch:
    """Tokenize (or slice) the first ``batch_size`` examples and add the labels the task needs."""
    if isinstance(records, TextRecords):
        tensors = _tokenize(records, loaded, batch_size, max_length)
    else:
        tensors = _slice(records, batch_size, source)
    if loaded.task == "causal-lm" and "labels" not in tensors:
        labels = tensors["input_ids"].clone()
        if "attention_mask" in tensors:
            labels[tensors["attention_mask"] == 0] = IGNORE_INDEX
        tensors["labels"] = labels
    elif loaded.task == "masked-lm" and "labels" not in tensors:
        tensors.update(_mask_tokens(tensors, loaded.tokenizer, seed))
    elif loaded.task == "classification" and "labels" not in tensors:
        raise InputError(f"{source} has no labels: a classifier needs a `label` for every example")
    _check_fits(tensors, loaded, source)
    return AuditBatch(tensors, source, fingerprint(tensors))


def _tokenize(records: TextRecords, loaded: LoadedModel, batch_size: int, max_length: int) -> dict[str, Tensor]:
    tok = loaded.tokenizer
    if tok is None:
        raise InputError("text data needs a tokenizer: use a Hugging Face checkpoint directory with tokenizer "
                         "files, or pre-tokenized .safetensors/.pt data")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    positions = _max_positions(loaded)
    if positions:
        max_length = min(max_length, positions)
    texts = records.texts[:batch_size]
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
              return_special_tokens_mask=loaded.task == "masked-lm")
    tensors = dict(enc)
    if records.labels is not None and loaded.task == "classification":
        tensors["labels"] = torch.tensor([_label_id(v, loaded) for v in records.labels[:batch_size]])
    return tensors


def _label_id(value, loaded: LoadedModel) -> int:
    label2id = getattr(loaded.model.config, "label2id", None) or {}
    if isinstance(value, str) and value in label2id:
        return int(label2id[value])
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"label {value!r} is neither an integer nor one of the model's labels "
                         f"{sorted(label2id)}") from None


def _slice(records: dict[str, Tensor], batch_size: int, source: str) -> dict[str, Tensor]:
    if not records:
        raise InputError(f"{source} holds no tensors")
    lengths = {k: (len(v) if v.ndim else 0) for k, v in records.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise InputError(f"the tensors in {source} differ in length along dim 0: {lengths}")
    return {k: v[:batch_size] for k, v in records.items()}


def _mask_tokens(tensors: dict[str, Tensor], tokenizer, seed: int) -> dict[str, Tensor]:
    if tokenizer is None or tokenizer.mask_token_id is None:
        raise InputError("masking tokens for a masked LM needs the checkpoint's tokenizer with a mask token")
    ids = tensors["input_ids"].clone()
    special = tensors.pop("special_tokens_mask", None)
    if special is None:
        special = torch.tensor([tokenizer.get_special_tokens_mask(r, already_has_special_tokens=True)
                                for r in ids.tolist()])
    maskable = special == 0
    if "attention_mask" in tensors:
        maskable &= tensors["attention_mask"] == 1
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.zeros_like(maskable)
    for row in range(len(ids)):
        cols = maskable[row].nonzero().flatten()
        if len(cols):
            k = max(1, round(MASK_RATE * len(cols)))
            chosen[row, cols[torch.randperm(len(cols), generator=gen)[:k]]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    ids[chosen] = tokenizer.mask_token_id
    return {"input_ids": ids, "labels": labels}


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
    if loaded.task == "classification":
        labels, n = tensors["labels"], config.num_labels
        if labels.ndim == 1 and not labels.is_floating_point() and (int(labels.max()) >= n or int(labels.min()) < 0):
            raise InputError(f"{source} has labels outside 0..{n - 1} for a model with {n} labels")
