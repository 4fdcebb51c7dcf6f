"""Data as rows of examples: ``.json``, ``.parquet`` and ``datasets`` ``save_to_disk`` folders (SPEC §3).

Each gives a list of rows (dicts), read like ``.jsonl``: a ``text`` column (and ``label``) is tokenized with the
checkpoint's tokenizer; rows with an ``input_ids`` column are pre-tokenized and become tensors as they are
(``rows_to_tensors``). ``.json`` is a JSON array of objects, an object holding one such array (the
Hugging Face ``field`` layout, e.g. ``{"version": 1, "data": [...]}``), an object of equal-length columns, or
JSON Lines (what ``Dataset.to_json`` writes). ``.parquet`` needs pyarrow and ``save_to_disk`` folders need
``datasets``, both in the ``data`` extra.
"""

import json
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError, UsageError

TABLE_SUFFIXES = (".json", ".parquet")
PAD_VALUES = {"labels": -100, "attention_mask": 0}


def is_dataset_folder(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def read_rows(path: Path) -> list[dict]:
    """The examples of a ``.json``/``.parquet`` file or a ``save_to_disk`` folder, as rows."""
    if path.is_dir():
        rows = _dataset_rows(path)
    elif path.suffix.lower() == ".parquet":
        rows = _parquet_rows(path)
    else:
        rows = _json_rows(path)
    if not rows:
        raise InputError(f"{path} holds no examples")
    return rows


def _need(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UsageError(f"reading {what} needs {module.split('.')[0]}: pip install 'geomaudit[data]'") from err


def _dataset_rows(path: Path) -> list[dict]:
    datasets = _need("datasets", "a datasets save_to_disk folder")
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise UsageError(f"{path} is a DatasetDict with the splits {', '.join(map(str, splits))}: "
                         f"pass one of them, e.g. --data {path / str(splits[0]) if splits else path}")
    try:
        return datasets.load_from_disk(str(path), keep_in_memory=True).to_list()
    except Exception as err:
        raise InputError(f"cannot read the dataset folder {path}: {_first_line(err)}") from err


def _parquet_rows(path: Path) -> list[dict]:
    parquet = _need("pyarrow.parquet", ".parquet files")
    try:
        return parquet.read_table(path).to_pylist()
    except Exception as err:
        raise InputError(f"cannot read {path}: not a valid Parquet file ({_first_line(err)})") from err


def _json_rows(path: Path) -> list[dict]:
    from .files import read_text

    text = read_text(path, "data file")
    try:
        data = json.loads(text)
    except RecursionError:
        raise InputError(f"{path} is not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":
            raise InputError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from err
        data = _json_lines(path, text)
    if isinstance(data, dict):
        arrays = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        columns = {k: v for k, v in data.items() if isinstance(v, list)}
        if len(arrays) == 1:
            data = arrays[0]
        elif columns and len(columns) == len(data) and len({len(v) for v in columns.values()}) == 1:
            data = [dict(zip(columns, values)) for values in zip(*columns.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"{path} holds no examples: expected a JSON array of objects, an object holding one, "
                         "an object of equal-length columns, or JSON Lines")
    return data


def _json_lines(path: Path, text: str) -> list:
    rows = []
    from .files import parse_json

    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            rows.append(parse_json(line, f"{path} line {n}"))
    return rows


def rows_to_tensors(rows: list[dict], source: str) -> dict[str, Tensor]:
    """Pre-tokenized rows (an ``input_ids`` column) as tensors, examples along dim 0.

    Numeric columns are kept (a ``label`` column becomes ``labels`` when there is none), text columns are
    dropped. Rows of different lengths are padded on the right to the longest: ``labels`` with -100 (ignored by
    the loss), ``attention_mask`` with 0, anything else with 0; an ``attention_mask`` is made if the rows have
    none, so padding never takes part in the loss.
    """
    if any(set(r) != set(rows[0]) for r in rows):
        raise InputError(f"the rows of {source} do not all have the same columns")
    columns = [k for k in rows[0] if _numeric(rows[0][k])]
    for name in ("label", "labels"):
        if name in rows[0] and name not in columns:
            raise InputError(f"the pre-tokenized rows of {source} need numbers in their {name!r} column, "
                             f"got {rows[0][name]!r}")
    lengths = [len(r["input_ids"]) if isinstance(r["input_ids"], list) else -1 for r in rows]
    ragged = len(set(lengths)) > 1
    if ragged and "attention_mask" not in columns:
        for r, n in zip(rows, lengths):
            r["attention_mask"] = [1] * n
        columns.append("attention_mask")
    tensors = {}
    for name in columns:
        values = [r[name] for r in rows]
        if any(not _numeric(v) for v in values):
            raise InputError(f"column {name!r} of {source} mixes numbers with other values")
        if any(isinstance(v, list) for v in values):
            if not all(isinstance(v, list) for v in values):
                raise InputError(f"column {name!r} of {source} mixes sequences and single values")
            width, pad = max(map(len, values)), PAD_VALUES.get(name, 0)
            values = [v + [pad] * (width - len(v)) if not any(isinstance(x, list) for x in v) else v for v in values]
        try:
            tensors[name] = torch.tensor(values)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:  # ragged, or beyond int64
            raise InputError(f"column {name!r} of {source} is not a table of numbers ({_first_line(err)})") from err
    if "label" in tensors and "labels" not in tensors:
        tensors["labels"] = tensors.pop("label")
    return tensors


def _numeric(value) -> bool:
    return all(map(_numeric, value)) if isinstance(value, list) else isinstance(value, int | float)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
