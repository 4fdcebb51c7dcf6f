"""The audit batch: read data files, tokenize, build labels for the task, fingerprint (SPEC §3).

Text data (``.jsonl`` with ``text`` and optional ``label``, ``.csv`` with a ``text`` column, ``.txt`` one
example a line) is tokenized with the checkpoint's tokenizer, padded to the longest example.
Pre-tokenized data (``.safetensors``/``.pt``) holds ``input_ids``, ``attention_mask``, ``labels``.
What a task adds to the batch (labels, a mask …) is its row of ``tasks.TASKS``; the file formats are the
rows of ``DATA_FORMATS``.
"""

import csv
import hashlib
import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from ..engine.hdiag import MicroBatch
from ..errors import InputError, UsageError
from .checkpoints import LoadedModel, read_state_dict
from .files import lone_surrogate, parse_json, read_text
from .tasks import IGNORE_INDEX, Examples, token_ids

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
class ImageRecords:
    """Image files, each labelled with the name of the class folder it lies in."""

    paths: list[Path]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, rows: Sequence[int]) -> "ImageRecords":
        return ImageRecords([self.paths[i] for i in rows], [self.labels[i] for i in rows])


Records = TextRecords | ImageRecords | dict[str, Tensor]


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


def has_labels(records: Records) -> bool:
    """Whether raw examples carry labels: a ``label`` on every text record, class folders, or a ``labels``
    tensor."""
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
    if path.is_dir() and not (_is_dataset_folder(path) or _is_image_folder(path)):
        raise InputError(f"the data folder {path} is not a datasets save_to_disk folder (no state.json), nor an "
                         "image folder (class/image.png)")
    for fmt in DATA_FORMATS:
        if fmt.matches(path):
            return fmt.read(path)
    raise UsageError(f"cannot read data of type {path.suffix or '(none)'}: use "
                     f"{', '.join(f.name for f in DATA_FORMATS)}")


def _suffix(*suffixes: str) -> Callable[[Path], bool]:
    return lambda path: path.is_file() and path.suffix.lower() in suffixes


def _text_of(path: Path) -> str:
    r"""The file's UTF-8 text (regular files only), with ``\r\n`` and ``\r`` line ends read as ``\n``."""
    return read_text(path, "data file").replace("\r\n", "\n").replace("\r", "\n")


def _read_lines(path: Path) -> TextRecords:
    r"""One example a line: lines end at ``\n`` only (U+2028 and other Unicode separators are text)."""
    return _text_rows(path, [{"text": ln} for ln in _text_of(path).split("\n") if ln.strip()])


def _read_jsonl(path: Path) -> TextRecords | dict[str, Tensor]:
    return _rows(path, _jsonl_rows(path, _text_of(path)))


def _read_table(path: Path) -> TextRecords | dict[str, Tensor]:
    from .tables import read_rows

    return _rows(path, read_rows(path))


def _rows(path: Path, rows: list[dict]) -> TextRecords | dict[str, Tensor]:
    """Pre-tokenized rows (an ``input_ids`` field, used as they are) as tensors; else text records."""
    from .tables import rows_to_tensors

    if rows and all("input_ids" in r for r in rows):
        tensors = rows_to_tensors(rows, str(path))
        check_tensors(tensors, str(path))
        return tensors
    return _text_rows(path, rows)


def _read_csv(path: Path) -> TextRecords:
    """Rows of a CSV with a header, quoted strictly (a stray quote is an error, not a guess); a field may hold a
    whole document (no 131,072-character limit)."""
    text = _text_of(path)
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as err:
        raise InputError(f"{path} is not valid CSV ({err})") from None
    return _text_rows(path, rows)


def _read_tensors(path: Path) -> dict[str, Tensor]:
    tensors = read_state_dict(path)
    check_tensors(tensors, str(path))
    return tensors


TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")  # (examples, tokens) of integers


def check_tensors(tensors: Mapping[str, Tensor], source: str) -> None:
    """Tensors a batch can be made of: dense, in memory, real; the token tensors of the usual names
    (``TOKEN_KEYS``) integer, of shape (examples, …, tokens) with at least one token, and all of one shape."""
    for name, t in tensors.items():
        if t.layout != torch.strided or t.is_meta or t.device.type != "cpu":
            kind = "meta" if t.is_meta else str(t.layout).removeprefix("torch.")
            raise InputError(f"{source}: {name} is a {kind} tensor; the audit batch needs dense tensors in memory")
        if t.is_complex():
            raise InputError(f"{source}: {name} holds complex numbers")
    shapes = {}
    for name in TOKEN_KEYS:
        t = tensors.get(name)
        if t is None:
            continue
        if t.is_floating_point() or (t.dtype == torch.bool and name == "input_ids"):
            raise InputError(f"{source}: {name} holds {str(t.dtype).removeprefix('torch.')} values; token ids "
                             "and masks are integers")
        if t.ndim < 2 or t.numel() == 0:
            raise InputError(f"{source}: {name} has shape {tuple(t.shape)}; expected (examples, tokens) with at "
                             "least one token (or (examples, choices, tokens))")
        shapes[name] = tuple(t.shape)
    if len(set(shapes.values())) > 1:
        raise InputError(f"{source}: the token tensors differ in shape: "
                         f"{', '.join(f'{k} {v}' for k, v in shapes.items())}")


def _text_rows(path: Path, rows: list[dict]) -> TextRecords:
    """Examples from rows with a ``text`` field (a string of real text) and, on every row or on none, a ``label``
    (a list of one label per word for token classification) and a ``target`` text (sequence-to-sequence models)."""
    if not rows:
        raise InputError(f"{path} holds no examples")
    for n, row in enumerate(rows, 1):
        text = row.get("text")
        if text is None:
            raise InputError(f"{path}: every example needs a `text` field (example {n} has none)")
        if not isinstance(text, str):
            raise InputError(f"{path}: the text of example {n} is a {type(text).__name__}, not a string")
        found = lone_surrogate(text)
        if found:
            raise InputError(f"{path}: the text of example {n} holds a lone surrogate ({found}), which is not a "
                             "character")
    labelled = all(r.get("label") not in (None, "") for r in rows)
    targeted = all(isinstance(r.get("target"), str) for r in rows)
    return TextRecords([str(r["text"]) for r in rows], [r["label"] for r in rows] if labelled else None,
                       [r["target"] for r in rows] if targeted else None)


def _jsonl_rows(path: Path, text: str) -> list[dict]:
    r"""One JSON object a line; lines end at ``\n`` only (a U+2028 inside a string is part of it)."""
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        row = parse_json(line, f"{path} line {n}")
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
    size = batch_size or (available if isinstance(records, dict) else DEFAULT_TEXT_BATCH)
    sampled = size < available
    if sampled:
        rows = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:size].sort().values
        records = {k: v[rows] for k, v in records.items()} if isinstance(records, dict) else records.take(
            rows.tolist())
    if isinstance(records, TextRecords):
        tensors, examples = _tokenize(records, loaded, max_length)
    elif isinstance(records, ImageRecords):
        tensors, examples = _pixels(records, loaded)
    else:
        tensors, examples = dict(records), Examples()
    tensors = loaded.task.prepare(tensors, examples, loaded, seed)
    _check_fits(tensors, loaded, source)
    return AuditBatch(tensors, source, fingerprint(tensors), available, seed if sampled else None)


def _count(records: TextRecords | dict[str, Tensor], source: str) -> int:
    """The number of examples in ``records``; tensors must agree on it along dim 0."""
    if not isinstance(records, dict):
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
    tokenized whole), then tokenized, truncated at ``max_length`` and padded to the longest; target texts
    likewise. Texts whose label is a list (one per word) are split into words at whitespace first."""
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
    options = {"padding": True, "truncation": True, "max_length": max_length, "return_tensors": "pt"}
    by_word = records.labels is not None and all(isinstance(v, list) for v in records.labels)
    if by_word:
        texts = [t.split()[:max_length] for t in records.texts]
        for n, (words, labels) in enumerate(zip(records.texts, records.labels)):
            if len(words.split()) != len(labels):
                raise InputError(f"example {n + 1} of the batch has {len(words.split())} words but "
                                 f"{len(labels)} labels: a token classifier needs one label per word")
        if not tok.is_fast:
            raise InputError("labels per word need a fast tokenizer (tokenizer.json), which maps tokens to words")
    else:
        texts = [t[:chars] for t in records.texts]
    try:
        enc = tok(texts, is_split_into_words=by_word, return_special_tokens_mask=True, **options)
        targets = None if records.targets is None else tok(text_target=[t[:chars] for t in records.targets],
                                                           **options)
    except Exception as err:  # tokenizers raises plain Exceptions for a broken vocabulary
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"the checkpoint's tokenizer cannot tokenize the data: {first}") from err
    tensors = dict(enc)
    examples = Examples(labels=records.labels, special_tokens_mask=tensors.pop("special_tokens_mask"),
                        word_ids=[enc.word_ids(i) for i in range(len(texts))] if by_word else None)
    if targets is not None:
        examples = replace(examples, target_ids=targets["input_ids"], target_mask=targets["attention_mask"])
    return tensors, examples


def _pixels(records: ImageRecords, loaded: LoadedModel) -> tuple[dict[str, Tensor], Examples]:
    """The images, opened with Pillow and turned into ``pixel_values`` by the checkpoint's image processor."""
    try:
        from PIL import Image
    except ImportError as err:
        raise UsageError("reading an image folder needs Pillow: pip install 'geomaudit[image]'") from err
    if loaded.processor is None:
        raise InputError("an image folder needs the checkpoint's image processor (preprocessor_config.json), or "
                         "give pre-computed `pixel_values` in a .safetensors/.pt file")
    images = []
    for path in records.paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise InputError(f"cannot read the image {path}: {str(err).splitlines()[0]}") from err
    pixels = loaded.processor(images=images, return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixels}, Examples(labels=records.labels)


def _max_positions(loaded: LoadedModel) -> int | None:
    config = getattr(loaded.model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _check_fits(tensors: dict[str, Tensor], loaded: LoadedModel, source: str) -> None:
    """Catch data that cannot fit a Hugging Face model before it reaches an index error deep in torch."""
    config = getattr(loaded.model, "config", None)
    if config is None:
        return
    if loaded.task.default_batch and "labels" in tensors:  # a language model: one label per token
        ids, labels = token_ids(tensors), tensors["labels"]
        if labels.shape != ids.shape:
            raise InputError(f"{source} has labels of shape {tuple(labels.shape)} for input_ids of shape "
                             f"{tuple(ids.shape)}: a language model takes one label per token")
    ids = tensors.get("input_ids")
    if ids is not None:
        if ids.numel() == 0:
            raise InputError(f"{source} gives no token to audit: its texts tokenize to zero tokens")
        vocab, positions = getattr(config, "vocab_size", None), _max_positions(loaded)
        if vocab and int(ids.max()) >= vocab:
            raise InputError(f"{source} has token id {int(ids.max())}, beyond the model's vocabulary of {vocab}")
        if int(ids.min()) < 0:
            raise InputError(f"{source} has a negative token id ({int(ids.min())})")
        if positions and ids.shape[-1] > positions:
            raise InputError(f"{source} has sequences of {ids.shape[-1]} tokens; the model takes at most {positions}")
    labels = tensors.get("labels")
    if loaded.task.class_labels and labels is not None and not labels.is_floating_point():
        n, used = config.num_labels, labels[labels != IGNORE_INDEX]
        if used.numel() and (int(used.max()) >= n or int(used.min()) < 0):
            raise InputError(f"{source} has labels outside 0..{n - 1} for a model with {n} labels")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _is_image_folder(path: Path) -> bool:
    """A folder of class folders holding images (``cat/001.png``), as torchvision's ``ImageFolder`` reads."""
    return path.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.glob("*/*") if f.is_file())


def _read_image_folder(path: Path) -> ImageRecords:
    """Every image in ``path/<class>/``, in sorted order, labelled with its class folder's name."""
    found = sorted(f for f in path.glob("*/*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    return ImageRecords(found, [f.parent.name for f in found])


DATA_FORMATS: tuple[DataFormat, ...] = (
    DataFormat(".jsonl", _suffix(".jsonl"), _read_jsonl),
    DataFormat(".csv", _suffix(".csv"), _read_csv),
    DataFormat(".txt", _suffix(".txt"), _read_lines),
    DataFormat(".safetensors/.pt/.bin", _suffix(".safetensors", ".pt", ".bin"), _read_tensors),
    DataFormat(".json", _suffix(".json"), _read_table),
    DataFormat(".parquet", _suffix(".parquet"), _read_table),
    DataFormat("a datasets save_to_disk folder", lambda path: _is_dataset_folder(path), _read_table),
    DataFormat("an image folder (class/image.png)", _is_image_folder, _read_image_folder),
)


def _is_dataset_folder(path: Path) -> bool:
    from .tables import is_dataset_folder

    return is_dataset_folder(path)
