"""Checks on a Hugging Face checkpoint before and after transformers builds it (issue 10).

- **No code from a checkpoint.** A ``*config*.json`` with ``auto_map`` asks transformers to import Python files
  shipped with the checkpoint (and, without ``trust_remote_code=False``, to prompt for it on stdout): such a
  checkpoint is refused before transformers reads it, and so is a ``model_type`` transformers does not know.
- **Sizes from the real tensors.** The sizes ``config.json`` states are checked against the tensors the
  checkpoint holds, read from the safetensors headers (or the memory-mapped ``.bin``), never their data: a count
  of layers or experts may not exceed the number of tensors, any other size (``vocab_size``, ``num_labels``,
  ``max_position_embeddings`` …) not ``SIZE_FACTOR`` times the largest tensor dimension (at least
  ``SIZE_FLOOR``); then the model is built on the meta device (no memory) and may have at most
  ``COUNT_FACTOR`` times as many parameters as the checkpoint holds values, besides a head the audit adds. So
  ``n_layer: 10**6`` or ``vocab_size: 10**8`` over a small checkpoint is one sentence, not a hang or gigabytes
  of random weights.
- **No silently random weights.** After loading, a tensor whose shape differs from the config's, or a
  parameter the checkpoint lacks, is an input error naming it, unless it belongs to the head the audit adds on
  purpose (outside the base model), which the report lists.
"""

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from .files import read_json

SIZE_FACTOR = 64
COUNT_FACTOR = 2
SIZE_FLOOR = 1 << 17
COUNT_KEY = re.compile(r"(^|_)(layers?|experts?)$|^n_layer$")
SIZE_KEY = re.compile(r"^(n|num)_|_(size|dim|positions|embeddings|labels|heads|ctx|embd|inner)$|^(d_model|d_ff|d_kv)$")


def refuse_remote_code(path: Path) -> None:
    """Refuse a checkpoint that asks transformers to run code it ships, or names a model transformers lacks."""
    for file in sorted(path.glob("*config*.json")):
        document = read_json(file, "checkpoint file", allow_nan=True)
        if isinstance(document, dict) and "auto_map" in document:
            raise InputError(f"{file} asks transformers to run Python code shipped with the checkpoint "
                             "(auto_map): geomaudit never runs code from a checkpoint")
    config = read_json(path / "config.json", "checkpoint file", allow_nan=True)
    if not isinstance(config, dict):
        raise InputError(f"{path / 'config.json'} is not a JSON object")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type is not None and (not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES):
        raise InputError(f"{path / 'config.json'} names model_type {model_type!r}, which transformers does not "
                         "know (geomaudit never runs a checkpoint's own model code)")


def tensor_shapes(path: Path, state: dict | None = None) -> list[tuple[int, ...]]:
    """The shapes of the checkpoint's tensors: from safetensors headers, ``state``, or memory-mapped .bin files."""
    if state is not None:
        return [tuple(t.shape) for t in state.values() if isinstance(t, torch.Tensor)]
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        shapes = []
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    shapes += [tuple(f.get_slice(k).get_shape()) for k in f.keys()]
            except Exception as err:
                raise InputError(f"cannot load the checkpoint {path}: {file.name} is not a valid safetensors "
                                 f"file ({_first_line(err)})") from err
        return shapes
    from .checkpoints import _torch_load

    return [tuple(t.shape) for f in sorted(path.glob("pytorch_model*.bin"))
            for t in _torch_load(f, allow_pickle=False).values() if isinstance(t, torch.Tensor)]


def check_config_sizes(path: Path, shapes: list[tuple[int, ...]]) -> None:
    """Every size ``config.json`` states, against the tensors the checkpoint holds (before transformers reads it)."""
    if not shapes:
        raise InputError(f"the checkpoint {path} holds no tensors")
    count = len(shapes)
    largest = max([d for s in shapes for d in s] or [1])
    bound = max(SIZE_FACTOR * max(largest, count), SIZE_FLOOR)
    config = read_json(path / "config.json", "checkpoint file", allow_nan=True)
    for key, value in _integers(config):
        if COUNT_KEY.search(key) and value > count:
            raise InputError(f"{path / 'config.json'} says {key} = {value}, but the checkpoint holds only "
                             f"{count} tensors: the config does not describe these weights")
        if SIZE_KEY.search(key) and value > bound:
            raise InputError(f"{path / 'config.json'} says {key} = {value}, far beyond any dimension of the "
                             f"checkpoint's tensors (the largest is {largest}): the config does not describe "
                             "these weights")


def check_parameter_count(path: Path, cls, config, shapes: list[tuple[int, ...]], new_head: bool) -> None:
    """The model ``cls`` builds from ``config``, on the meta device, has at most ``COUNT_FACTOR`` times the
    checkpoint's values (a head the audit adds aside): a bound on what loading may allocate. Smaller
    mismatches are named by ``check_loaded``."""
    with torch.device("meta"):
        try:
            model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
        except Exception as err:
            raise InputError(f"cannot build the model of {path / 'config.json'}: {_first_line(err)}") from err
    wanted = sum(p.numel() for name, p in model.named_parameters() if not (new_head and _in_head(model, name)))
    held = sum(_numel(s) for s in shapes)
    if wanted > COUNT_FACTOR * held:
        raise InputError(f"{path / 'config.json'} describes a model of {wanted:,} parameters, but the checkpoint "
                         f"holds {held:,} values: the config does not describe these weights")


def check_loaded(path: Path, model: nn.Module, info: dict, new_head: bool) -> list[str]:
    """The parameters the audit added (its new head); a tensor of another shape than the config asks for, or any
    other missing weight, is an input error naming it."""
    if info["mismatched_keys"]:
        name, held, wanted = sorted(info["mismatched_keys"], key=str)[0]
        raise InputError(f"the checkpoint {path} holds {name} of shape {tuple(held)}, but its config.json asks "
                         f"for {tuple(wanted)}: the config does not describe these weights")
    missing = sorted(info["missing_keys"])
    unexpected = [n for n in missing if not (new_head and _in_head(model, n))]
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else "")
        raise InputError(f"the checkpoint {path} lacks weights its config.json asks for ({shown}): renamed "
                         "tensors or a config of another model; geomaudit does not audit random weights")
    return missing


def _in_head(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` lies outside the base model (``base_model_prefix``): the task's head."""
    prefix = getattr(model, "base_model_prefix", "")
    return bool(prefix) and hasattr(model, prefix) and not name.startswith(prefix + ".")


def _integers(node, key: str = "") -> Iterator[tuple[str, int]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _integers(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _integers(v, key)
    elif isinstance(node, int) and not isinstance(node, bool):
        yield key, node


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
