"""Checkpoint folders and what each one loads (SPEC §3): one table, ``FOLDER_KINDS``.

- ``peft-adapter``: ``adapter_config.json``; the adapter's tensors on its base model (``adapters.py``);
- ``huggingface``: ``config.json``; ``save_pretrained``'s weight files, read by transformers;
- ``distcp``: ``.metadata`` and ``*.distcp`` files (``torch.distributed.checkpoint``); every tensor, put
  together from its shards without a process group;
- ``accelerate``: Accelerate ``save_state`` weights (``model.safetensors``, ``pytorch_model.bin``, FSDP's
  ``pytorch_model_fsdp.bin`` or ``pytorch_model_fsdp_0/``) and no ``config.json``; that file or DCP folder
  alone: the other files (``random_states_*.pkl``, ``optimizer.bin`` …) are never opened.

The first row that matches a folder decides its kind. ``model_files`` lists the files a kind loads, for the
result cache's content hash.

``torch.distributed.checkpoint`` pickles its ``.metadata`` with plain ``pickle``; geomaudit unpickles it with
an allowlist of the classes DCP itself writes there (tensor and chunk descriptions, storage offsets), so a
``.metadata`` that names anything else is refused unless ``--allow-pickle``. Tensor data is read by DCP with
``torch.load(weights_only=True)``; non-tensor entries (a step counter, dataloader state) are not read.
"""

import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError, UsageError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DCP_METADATA = ".metadata"
ACCELERATE_WEIGHTS = re.compile(r"(model(_\d+)?\.safetensors|pytorch_model(_\d+)?\.bin|pytorch_model_fsdp(_\d+)?\.bin"
                                r"|pytorch_model_fsdp_\d+)")
ACCELERATE_PER_RANK = re.compile(r"pytorch_model_fsdp(_\d+)?_rank\d+\.bin")


def is_distcp(path: Path) -> bool:
    return (path / DCP_METADATA).is_file() and any(path.glob("*.distcp"))


def _accelerate_models(path: Path) -> dict[int, Path]:
    """Model index → its weights in an Accelerate ``save_state`` folder (``model_1.safetensors`` is model 1)."""
    found: dict[int, Path] = {}
    for child in sorted(path.iterdir()):
        if ACCELERATE_WEIGHTS.fullmatch(child.name) and (child.is_file() or is_distcp(child)):
            index = re.search(r"_(\d+)(\.\w+)?$", child.name)
            found.setdefault(int(index.group(1)) if index else 0, child)
    return found


def is_accelerate(path: Path) -> bool:
    return not (path / "config.json").exists() and (
        bool(_accelerate_models(path)) or any(ACCELERATE_PER_RANK.fullmatch(p.name) for p in path.iterdir()))


@dataclass(frozen=True)
class FolderKind:
    name: str
    detect: Callable[[Path], bool]
    files: Callable[[Path], list[Path]]


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # the first present is what transformers loads


def hf_model_files(path: Path) -> list[Path]:
    """The files ``from_pretrained`` reads a ``save_pretrained`` folder's model from: ``config.json`` and the
    weights — the first of ``WEIGHT_FILES`` present (or the file ``config.json``'s ``transformers_weights``
    names), with every shard a sharded index lists. Each must be a regular file inside the folder: a shard named
    ``../x.safetensors`` or ``/abs/x.safetensors``, or a link out of the folder or to a device, is an input error
    (it would load weights the cache key does not cover, or hang on ``/dev/zero``)."""
    from .files import read_json

    config = read_json(path / "config.json", "config")
    if not isinstance(config, dict):
        raise InputError(f"{path / 'config.json'} is not a JSON object")
    explicit = config.get("transformers_weights")
    names = [explicit] if isinstance(explicit, str) else [n for n in WEIGHT_FILES if os.path.lexists(path / n)][:1]
    files = [_inside(path, "config.json", "config.json")]
    for name in names:
        weights = _inside(path, name, "the weights file")
        files.append(weights)
        if name.endswith(".index.json"):
            index = read_json(weights, "sharded index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not (isinstance(weight_map, dict) and weight_map and
                    all(isinstance(v, str) for v in weight_map.values())):
                raise InputError(f"{weights} is not a sharded index: its weight_map is not a mapping of tensor "
                                 "names to file names")
            files += [_inside(path, shard, f"the shard named in {weights.name}")
                      for shard in sorted(set(weight_map.values()))]
    return files


def _inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name`` when ``name`` is a relative path that stays inside ``folder`` and names a regular file
    (a link is followed, as in the Hugging Face cache, whose snapshot files link to its blobs); else an
    ``InputError``."""
    from .files import regular_file

    parts = Path(os.path.normpath(name)).parts if name else ()
    if not parts or Path(name).is_absolute() or parts[0] in ("..", "."):
        raise InputError(f"{what} {name!r} lies outside the checkpoint folder {folder}: only files inside it "
                         "are read")
    return regular_file(folder / name, what)


def _adapter_files(path: Path) -> list[Path]:
    from .adapters import adapter_files

    return adapter_files(path)


def _distcp_files(path: Path) -> list[Path]:
    return [path / DCP_METADATA, *sorted(path.glob("*.distcp"))]


def _accelerate_files(path: Path) -> list[Path]:
    weights = accelerate_weights(path)
    return _distcp_files(weights) if weights.is_dir() else [weights]


FOLDER_KINDS = (
    FolderKind("peft-adapter", lambda p: (p / ADAPTER_CONFIG).is_file(), _adapter_files),
    FolderKind("huggingface", lambda p: (p / "config.json").is_file(), hf_model_files),
    FolderKind("distcp", is_distcp, _distcp_files),
    FolderKind("accelerate", is_accelerate, _accelerate_files),
)


def folder_kind(path: Path) -> str | None:
    """The kind of checkpoint folder ``path`` is, or None when it is none of them (e.g. a run's root)."""
    if not path.is_dir():
        return None
    return next((k.name for k in FOLDER_KINDS if k.detect(path)), None)


def model_files(path: Path) -> list[Path]:
    """The files that define the model at ``path`` (a file is itself), in a stable order."""
    if path.is_file():
        return [path]
    kind = folder_kind(path)
    return next(k.files for k in FOLDER_KINDS if k.name == kind)(path) if kind else []


def accelerate_weights(path: Path) -> Path:
    """The weight file (or FSDP DCP folder) of the one model an Accelerate ``save_state`` folder holds."""
    models = _accelerate_models(path)
    if not models:
        ranks = sorted(p.name for p in path.iterdir() if ACCELERATE_PER_RANK.fullmatch(p.name))
        raise InputError(f"{path} holds per-rank FSDP shards ({', '.join(ranks[:3])}) that need the process group "
                         "to be put together: save with SHARDED_STATE_DICT or FULL_STATE_DICT instead")
    if len(models) > 1:
        names = ", ".join(p.name for p in models.values())
        raise UsageError(f"{path} holds {len(models)} models ({names}): pass the file or folder of the one to audit")
    return next(iter(models.values()))


def read_folder_state(path: Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The model tensors of a ``distcp`` or ``accelerate`` folder."""
    from .checkpoints import read_state_dict

    if folder_kind(path) == "accelerate":
        path = accelerate_weights(path)
        if path.is_file():
            return read_state_dict(path, allow_pickle)
    return read_distcp(path, allow_pickle)


# What torch.distributed.checkpoint writes into .metadata (torch 2.4 – 2.13), and nothing else.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _Refused(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _DCP_GLOBALS.get(module, ())
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            allowed = (name,)
        if name not in allowed:
            raise _Refused(f"{module}.{name} is not a torch.distributed.checkpoint metadata class")
        return super().find_class(module, name)


def _reader(path: Path, allow_pickle: bool):
    """DCP's file reader, with its ``.metadata`` unpickled through the allowlist unless ``allow_pickle``."""
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(path / DCP_METADATA, "rb") as stream:
                try:
                    metadata = (pickle.Unpickler if allow_pickle else _MetadataUnpickler)(stream).load()
                except _Refused as err:
                    raise InputError(f"refusing to unpickle {path / DCP_METADATA}: {err} "
                                     "(pass --allow-pickle if you trust the file)") from err
                except Exception as err:
                    raise InputError(f"cannot read {path / DCP_METADATA}: not a torch.distributed.checkpoint "
                                     f"metadata file ({type(err).__name__})") from err
            from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

            if not isinstance(metadata, Metadata):
                raise InputError(f"cannot read {path / DCP_METADATA}: it holds a {type(metadata).__name__}, "
                                 "not torch.distributed.checkpoint metadata")
            storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
            for shard in sorted({getattr(info, "relative_path", None) for info in storage.values()}, key=str):
                if not isinstance(shard, str) or (path / shard).resolve().parent != path.resolve():
                    raise InputError(f"{path / DCP_METADATA} points at a shard outside its folder ({shard!r})")
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(path)


def read_distcp(path: Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Every tensor of a ``torch.distributed.checkpoint`` folder, put together from its shards in one process.

    When the checkpoint holds a ``model`` group beside others (optimizer state, as Accelerate's FSDP and
    torchtitan save them), only the ``model.`` tensors are read, with that prefix.
    """
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = _reader(path, allow_pickle)
    metadata = reader.read_metadata()
    entries = {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    groups = {k.split(".", 1)[0] for k in entries}
    if "model" in groups and len(groups) > 1:
        entries = {k: v for k, v in entries.items() if k.startswith("model.")}
    if not entries:
        raise InputError(f"{path} holds no tensors")
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in entries.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
        cause = next(iter(getattr(err, "failures", {}).values()), err)  # rank → (exception, its frames)
        cause = cause[0] if isinstance(cause, tuple) else cause
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise InputError(f"cannot read the torch.distributed.checkpoint folder {path}: {reason}") from err
    return state
