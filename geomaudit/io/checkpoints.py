"""Load a checkpoint and the loss it is audited on (SPEC §3).

Two kinds of checkpoint:
- a Hugging Face ``save_pretrained`` directory (safetensors, sharded safetensors, or
  ``pytorch_model.bin`` read with ``weights_only=True``), loaded with eager attention and no remote code;
- a plain state-dict file (``.safetensors``, ``.pt``/``.bin``, a Lightning ``.ckpt``) with
  ``--model module:factory`` and optionally ``--loss module:fn``.
"""

import importlib
import os
import pickle
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import InputError, UsageError

TASKS = ("auto", "causal-lm", "masked-lm", "classification")
IGNORE_INDEX = -100


@dataclass
class LoadedModel:
    """A model in ``eval()`` mode with its loss; ``task`` fixes how text data is turned into a batch."""

    model: nn.Module
    loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor]
    task: str
    path: str
    format: str
    tokenizer: object | None = None
    initialised: list[str] = field(default_factory=list)

    def loss_items(self, tensors: Mapping[str, Tensor]) -> int:
        """How many terms the mean loss of ``tensors`` averages over (tokens for LMs, else examples)."""
        if self.task == "causal-lm":
            return int((tensors["labels"][:, 1:] != IGNORE_INDEX).sum())
        if self.task == "masked-lm":
            return int((tensors["labels"] != IGNORE_INDEX).sum())
        return len(next(iter(tensors.values())))

    def describe(self) -> dict:
        return {"path": self.path, "format": self.format, "class": type(self.model).__name__,
                "task": self.task, "initialised": self.initialised}


def model_output_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The model's own loss: ``model(**batch).loss`` (Hugging Face models compute it from ``labels``)."""
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", out)
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise InputError("the model returned no scalar loss for the data; give labels in the data or --loss module:fn")
    return loss


def task_loss(task: str) -> Callable[[nn.Module, Mapping[str, Tensor]], Tensor]:
    """The loss a Hugging Face head trains with, computed from the logits in the audit's precision.

    Same formulas as transformers (shifted token cross-entropy for causal LMs, cross-entropy over
    labelled tokens for masked LMs, the ``problem_type`` rule for classifiers), but transformers'
    own loss casts logits to fp32, which would cap ``--precision fp64`` at fp32 accuracy.
    """
    import torch.nn.functional as F

    def loss_fn(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        if task == "causal-lm":
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        if task == "masked-lm":
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        problem = model.config.problem_type
        if problem == "regression" or (problem is None and model.config.num_labels == 1):
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).squeeze(-1))
        if problem == "multi_label_classification" or (problem is None and labels.is_floating_point()):
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return F.cross_entropy(logits, labels)

    return loss_fn


def infer_task(architecture: str | None, has_labels: bool) -> str:
    """The task from a Hugging Face architecture name; a headless model becomes a classifier if the data has labels."""
    arch = architecture or ""
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if arch.endswith("ForMaskedLM"):
        return "masked-lm"
    if arch.endswith("ForSequenceClassification") or has_labels:
        return "classification"
    raise UsageError(f"the checkpoint's architecture {arch or '(none given)'} has no loss head: "
                     "give data with a `label` field or choose --task causal-lm|masked-lm|classification")


def load_checkpoint(path: str | os.PathLike, *, task: str = "auto", has_labels: bool = False,
                    num_labels: int | None = None, factory: str | None = None, loss: str | None = None,
                    allow_pickle: bool = False, seed: int = 0) -> LoadedModel:
    """Load ``path`` as a Hugging Face directory, or as a state dict for the model ``factory`` builds.

    Parameters a head needs but the checkpoint lacks are initialised from ``seed`` and listed in
    ``LoadedModel.initialised``.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"checkpoint {p} does not exist")
    if factory is not None:
        if p.is_dir():
            raise UsageError(f"--model takes a state-dict file, but {p} is a directory")
        return _load_state_dict_model(p, factory, loss, allow_pickle)
    if loss is not None:
        raise UsageError("--loss needs --model: a Hugging Face checkpoint uses its own loss")
    if p.is_file():
        raise UsageError(f"{p} is a plain state dict: say which model it belongs to with --model module:factory")
    if not (p / "config.json").is_file():
        raise InputError(f"{p} is not a Hugging Face checkpoint directory (it has no config.json)")
    return _load_hf(p, task, has_labels, num_labels, seed, allow_pickle)


def _load_hf(path: Path, task: str, has_labels: bool, num_labels: int | None, seed: int,
             allow_pickle: bool) -> LoadedModel:
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise InputError(f"cannot read {path / 'config.json'}: {_first_line(err)}") from err
    architecture = (config.architectures or [""])[0]
    if task == "auto":
        task = infer_task(architecture, has_labels)
    auto_class = {"causal-lm": transformers.AutoModelForCausalLM, "masked-lm": transformers.AutoModelForMaskedLM,
                  "classification": transformers.AutoModelForSequenceClassification}[task]
    new_head = task == "classification" and not architecture.endswith("ForSequenceClassification")
    state = _pickled_state(path, allow_pickle)
    torch.manual_seed(seed)
    try:
        if num_labels and new_head:
            config.num_labels = num_labels
        if state is None:
            model, info = auto_class.from_pretrained(
                path, config=config, local_files_only=True, attn_implementation="eager", dtype=torch.float32,
                output_loading_info=True, trust_remote_code=False)
        else:
            model, info = auto_class._model_mapping[type(config)].from_pretrained(
                None, config=config, state_dict=state, attn_implementation="eager", dtype=torch.float32,
                output_loading_info=True)
    except Exception as err:
        raise InputError(f"cannot load the checkpoint {path}: {_first_line(err)}") from err
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:
            raise InputError(f"cannot load the tokenizer in {path}: {_first_line(err)}") from err
    return LoadedModel(model.eval(), task_loss(task), task, str(path), "huggingface", tokenizer,
                       sorted(info["missing_keys"]))


def _pickled_state(path: Path, allow_pickle: bool) -> dict[str, Tensor] | None:
    """Check ``pytorch_model*.bin`` files before transformers reads them with ``weights_only=True``.

    A file that needs code execution is refused unless ``allow_pickle``; then its tensors are read here
    and handed to transformers as the state dict.
    """
    bins = [] if any(path.glob("*.safetensors")) else sorted(path.glob("pytorch_model*.bin"))
    if allow_pickle:
        return {k: v for f in bins for k, v in _torch_load(f, allow_pickle=True).items()} or None
    for f in bins:
        _torch_load(f, allow_pickle=False)
    return None


def _torch_load(path: Path, allow_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise InputError(f"refusing to unpickle {path}: it needs code execution beyond plain tensors "
                         "(pass --allow-pickle if you trust the file)") from err
    except Exception as err:
        raise InputError(f"cannot read {path}: {_first_line(err)}") from err


def read_state_dict(path: Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch-saved dict (a Lightning ``state_dict`` key is unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:
            raise InputError(f"cannot read {path}: not a valid safetensors file ({_first_line(err)})") from err
    obj = _torch_load(path, allow_pickle)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InputError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def import_object(spec: str, option: str) -> Callable:
    """``package.module:name`` imported as ``python -m`` would, with the current directory on the path."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{option} takes module:name, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"{option} {spec}: {_first_line(err)}") from err
    if not callable(obj):
        raise UsageError(f"{option} {spec} is not callable")
    return obj


def _load_state_dict_model(path: Path, factory: str, loss: str | None, allow_pickle: bool) -> LoadedModel:
    model = import_object(factory, "--model")()
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {factory} returned {type(model).__name__}, not a torch.nn.Module")
    state = read_state_dict(path, allow_pickle)
    try:
        model.load_state_dict(_match_prefix(state, model), strict=True)
    except RuntimeError as err:
        raise InputError(f"the state dict {path} does not fit the model from --model {factory}: "
                         f"{_first_line(err, skip_header=True)}") from err
    loss_fn = import_object(loss, "--loss") if loss else model_output_loss
    return LoadedModel(model.float().eval(), loss_fn, "custom", str(path), "state_dict")


def _match_prefix(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Strip one common leading ``prefix.`` (Lightning's ``model.``) when that makes the keys fit."""
    wanted = set(model.state_dict())
    if set(state) == wanted or not state:
        return state
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) == 1 and all("." in k for k in state):
        stripped = {k.split(".", 1)[1]: v for k, v in state.items()}
        if set(stripped) == wanted:
            return stripped
    return state


def _first_line(err: BaseException, skip_header: bool = False) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
    return lines[1] if skip_header and len(lines) > 1 else lines[0]
