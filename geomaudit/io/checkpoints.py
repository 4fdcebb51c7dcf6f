"""Load a checkpoint and the loss it is audited on (SPEC §3).

The kinds of checkpoint are the rows of ``CHECKPOINT_KINDS``, tried in order:
- ``huggingface``: a ``save_pretrained`` directory (safetensors, sharded safetensors, or
  ``pytorch_model.bin`` read with ``weights_only=True``), loaded with eager attention and no remote code;
  its task (a row of ``tasks.TASKS``) comes from its architecture, or from ``--task``;
- ``peft-adapter`` (tried first): a PEFT adapter folder, audited on its base model (``adapters.py``);
- ``state_dict``: a plain state-dict file (``.safetensors``, ``.pt``/``.bin``, a Lightning ``.ckpt``), an
  Accelerate ``save_state`` or a ``torch.distributed.checkpoint`` folder (``formats.py``), with
  ``--model module:factory`` and optionally ``--loss module:fn``.

A path that does not exist may be a hub id in the local Hugging Face cache (``hub.locate``).
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
from . import guards
from .precision import KeepFloat64, float32_modules, is_float64
from .files import regular_file
from .formats import hf_model_files
from .tasks import TASKS, Task, infer_task, model_class, task_row

LossFn = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]


@dataclass
class LoadedModel:
    """A model in ``eval()`` mode, the task it is audited as, and where it came from.

    ``custom_loss`` (``--loss``) replaces the task's loss when given. It returns the mean loss of the batch
    it is given, averaged over the batch's examples; a loss averaged over something else (tokens) says so by
    returning the pair ``(loss, items)``, ``items`` being how many terms the mean ran over.
    """

    model: nn.Module
    task: Task
    path: str = ""
    format: str = ""
    tokenizer: object | None = None
    initialised: list[str] = field(default_factory=list)
    custom_loss: LossFn | None = None
    base: str | None = None  # the base model folder of a PEFT adapter
    float32_modules: list[str] | None = None  # in an fp64 audit: modules that computed in a lower precision
    processor: object | None = None  # the checkpoint's image processor, for image folders

    def loss_fn(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """The audited loss of ``batch``: a scalar mean; for a float64 model, computed in float64 throughout
        (``precision.KeepFloat64``)."""
        if not is_float64(model):
            return self.plain_loss(model, batch)
        with KeepFloat64():
            return self.plain_loss(model, batch)

    def plain_loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """The loss as the model's code computes it, in whatever precisions that code asks for."""
        if self.custom_loss is None:
            return self.task.loss(model, batch)
        return self._custom(model, batch)[0]

    def loss_items(self, tensors: Mapping[str, Tensor]) -> int | None:
        """How many terms the mean loss of ``tensors`` averages over; ``None`` when that is not known."""
        if self.custom_loss is None:
            return self.task.items(tensors)
        try:
            with torch.no_grad():
                return self._custom(self.model, tensors)[1]
        except (RuntimeError, IndexError, ValueError, TypeError, KeyError) as err:
            raise InputError(f"the data does not fit the model: {_first_line(err)}") from err

    def _custom(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
        out = self.custom_loss(model, batch)
        if not isinstance(out, tuple):
            return out, len(next(iter(batch.values())))
        items = out[1] if len(out) == 2 else None
        if isinstance(items, Tensor) and items.numel() == 1 and not items.is_floating_point():
            items = int(items)
        if not isinstance(items, int) or isinstance(items, bool) or items < 0:
            raise UsageError("--loss returned a tuple, so it must be (loss, items) with items a whole number "
                             "≥ 0: how many terms the mean loss averages over")
        return out[0], items

    def check_precision(self, batch: Mapping[str, Tensor]) -> list[str]:
        """For a float64 model: the modules that still computed in a lower precision on ``batch``
        (``precision.float32_modules``), kept in ``float32_modules`` for the report."""
        try:
            self.float32_modules = float32_modules(self.model, self.plain_loss, batch)
        except (RuntimeError, IndexError, ValueError, TypeError, KeyError) as err:
            raise InputError(f"the data does not fit the model: {_first_line(err)}") from err
        return self.float32_modules

    def describe(self) -> dict:
        return {"path": self.path, "format": self.format, "class": type(self.model).__name__,
                "task": self.task.name, "initialised": self.initialised, "base": self.base,
                "float32_modules": self.float32_modules}


@dataclass(frozen=True)
class LoadOptions:
    """What loading needs besides the path (the command line's options, by name)."""

    task: str = "auto"
    has_labels: bool = False
    num_labels: int | None = None
    factory: str | None = None
    loss: str | None = None
    allow_pickle: bool = False
    seed: int = 0
    merge: bool = False  # a PEFT adapter merged into its base model


@dataclass(frozen=True)
class CheckpointKind:
    """A row of ``CHECKPOINT_KINDS``: ``matches(path, options)`` says whether ``load`` takes the path."""

    name: str
    matches: Callable[[Path, LoadOptions], bool]
    load: Callable[[Path, LoadOptions], LoadedModel]


def load_checkpoint(path: str | os.PathLike, **options) -> LoadedModel:
    """Load ``path`` as the first kind of ``CHECKPOINT_KINDS`` that takes it (``options``: ``LoadOptions``).

    Parameters a head needs but the checkpoint lacks are initialised from ``seed`` and listed in
    ``LoadedModel.initialised``.
    """
    from .formats import folder_kind
    from .hub import locate

    p, opts = locate(path, "checkpoint"), LoadOptions(**options)
    if opts.merge and folder_kind(p) != "peft-adapter":
        raise UsageError(f"--merge merges a PEFT adapter into its base model, but {p} is not an adapter folder")
    if opts.task != "auto" and opts.task not in TASKS:
        raise UsageError(f"--task must be one of auto, {', '.join(TASKS)}, got {opts.task!r}")
    for kind in CHECKPOINT_KINDS:
        if kind.matches(p, opts):
            return kind.load(p, opts)
    if opts.factory is not None:
        raise UsageError(f"--model takes a state dict (a file, an Accelerate save_state or a "
                         f"torch.distributed.checkpoint folder), but {p} is a directory")
    if p.is_file() or folder_kind(p) in STATE_DICT_FOLDERS:
        what = "a plain state dict" if p.is_file() else f"{STATE_DICT_FOLDERS[folder_kind(p)]} (weights without " \
                                                        "config.json)"
        raise UsageError(f"{p} is {what}: say which model it belongs to with --model module:factory")
    raise InputError(f"{p} is not a Hugging Face checkpoint directory (it has no config.json)")


# ---------------------------------------------------------------- Hugging Face directories

def _is_hf_dir(path: Path, opts: LoadOptions) -> bool:
    return opts.factory is None and path.is_dir() and (path / "config.json").is_file()


def _load_hf(path: Path, opts: LoadOptions) -> LoadedModel:
    import transformers
    from transformers.utils import logging as hf_logging

    if opts.loss is not None:
        raise UsageError("--loss needs --model: a Hugging Face checkpoint uses its own loss")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hf_model_files(path)  # every file it reads is a regular file inside the folder
    guards.refuse_remote_code(path)
    state = _pickled_state(path, opts.allow_pickle)
    shapes = guards.tensor_shapes(path, state)
    guards.check_config_sizes(path, shapes)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise InputError(f"cannot read {path / 'config.json'}: {_first_line(err)}") from err
    architectures = config.architectures or [""]
    if not (isinstance(architectures, list | tuple) and all(isinstance(a, str) for a in architectures)):
        raise InputError(f"{path / 'config.json'}: architectures must be a list of class names, got "
                         f"{str(architectures)[:60]}")
    architecture = architectures[0]
    task = TASKS[opts.task] if opts.task != "auto" else infer_task(architecture, opts.has_labels, config.model_type)
    new_head = task.auto_class is not None and not task.matches(architecture)
    auto_class = model_class(task, architecture)
    cls = auto_class._model_mapping[type(config)] if task.auto_class and type(config) in auto_class._model_mapping \
        else auto_class
    if opts.num_labels and new_head and task.class_labels:
        config.num_labels = opts.num_labels
    guards.check_parameter_count(path, cls, config, shapes, new_head)
    torch.manual_seed(opts.seed)
    try:
        if state is None:
            model, info = auto_class.from_pretrained(
                path, config=config, local_files_only=True, attn_implementation="eager", dtype=torch.float32,
                output_loading_info=True, trust_remote_code=False, ignore_mismatched_sizes=True)
        else:
            model, info = cls.from_pretrained(
                None, config=config, state_dict=state, attn_implementation="eager", dtype=torch.float32,
                output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as err:
        raise InputError(f"cannot load the checkpoint {path}: {_first_line(err)}") from err
    initialised = guards.check_loaded(path, model, info, new_head)
    return LoadedModel(model.eval(), task, str(path), "huggingface", load_tokenizer(path), initialised,
                       processor=load_image_processor(path))


def load_image_processor(path: Path):
    """The image processor saved in ``path`` (``preprocessor_config.json``), or None."""
    import transformers

    if not (path / "preprocessor_config.json").is_file():
        return None
    try:
        return transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise InputError(f"cannot load the image processor in {path}: {_first_line(err)}") from err


def load_tokenizer(path: Path):
    """The tokenizer saved in ``path``, or None when the folder has no tokenizer files."""
    import transformers

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise InputError(f"cannot load the tokenizer in {path}: {_first_line(err)}") from err


# ---------------------------------------------------------------- PEFT adapters on their base model

def _is_adapter(path: Path, opts: LoadOptions) -> bool:
    from .formats import folder_kind

    return folder_kind(path) == "peft-adapter"


def _load_adapter(path: Path, opts: LoadOptions) -> LoadedModel:
    from .adapters import load_adapter

    if opts.factory is not None or opts.loss is not None:
        raise UsageError(f"{path} is a PEFT adapter: it names its base model, so --model and --loss do not apply")
    return load_adapter(path, opts, _load_hf)


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


# ---------------------------------------------------------------- plain state dicts with --model

STATE_DICT_FOLDERS = {"accelerate": "an Accelerate save_state folder",
                      "distcp": "a torch.distributed.checkpoint folder"}


def _is_state_dict_file(path: Path, opts: LoadOptions) -> bool:
    from .formats import folder_kind

    return opts.factory is not None and (path.is_file() or folder_kind(path) in STATE_DICT_FOLDERS)


def _load_state_dict_model(path: Path, opts: LoadOptions) -> LoadedModel:
    model = import_object(opts.factory, "--model")()
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {opts.factory} returned {type(model).__name__}, not a torch.nn.Module")
    state = read_state_dict(path, opts.allow_pickle)
    try:
        model.load_state_dict(_fit_keys(state, model), strict=True)
    except RuntimeError as err:
        raise InputError(f"the state dict {path} does not fit the model from --model {opts.factory}: "
                         f"{_first_line(err, skip_header=True)}") from err
    custom_loss = import_object(opts.loss, "--loss") if opts.loss else None
    from .formats import folder_kind

    return LoadedModel(model.float().eval(), _own_task(model), str(path), folder_kind(path) or "state_dict",
                       custom_loss=custom_loss)


def _own_task(model: nn.Module) -> Task:
    """A transformers head (``GPT2LMHeadModel``) is audited as its checkpoint directory would be, with eager
    attention; other modules on ``model(**batch).loss``."""
    transformers = sys.modules.get("transformers")  # a transformers model has imported it
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        model.set_attn_implementation("eager")
        return task_row(type(model).__name__) or TASKS["custom"]
    return TASKS["custom"]


def _torch_load(path: Path, allow_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise InputError(f"refusing to unpickle {path}: it needs code execution beyond plain tensors "
                         "(pass --allow-pickle if you trust the file)") from err
    except Exception as err:
        raise InputError(f"cannot read {path}: {_first_line(err)}") from err


def read_state_dict(path: Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, of a torch-saved dict (a Lightning ``state_dict`` key is unwrapped), or
    of an Accelerate ``save_state`` or ``torch.distributed.checkpoint`` folder; keyed by strings."""
    if path.is_dir():
        from .formats import read_folder_state

        return read_folder_state(path, allow_pickle)
    regular_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:
            raise InputError(f"cannot read {path}: not a valid safetensors file ({_first_line(err)})") from err
    obj = _torch_load(path, allow_pickle)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
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


def _fit_keys(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The state dict under the model's own names, when one of two repairs makes the keys fit.

    - one common leading ``prefix.`` stripped (Lightning's ``model.``);
    - names of a tied tensor that the saver dropped (``safetensors.torch.save_model``, Accelerate keep one
      name per shared tensor) filled in from the model's own tied-parameter map: the names under which
      ``model`` holds one and the same parameter.
    """
    wanted = set(model.state_dict())
    candidates = [state]
    if state and all("." in k for k in state) and len({k.split(".", 1)[0] for k in state}) == 1:
        candidates.append({k.split(".", 1)[1]: v for k, v in state.items()})
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    for candidate in candidates:
        filled = dict(candidate)
        for names in tied.values():
            kept = [n for n in names if n in candidate]
            for name in names:
                if kept:
                    filled.setdefault(name, candidate[kept[0]])
        if set(filled) == wanted:
            return filled
    return state


def _first_line(err: BaseException, skip_header: bool = False) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
    return lines[1] if skip_header and len(lines) > 1 else lines[0]


CHECKPOINT_KINDS: tuple[CheckpointKind, ...] = (
    CheckpointKind("peft-adapter", _is_adapter, _load_adapter),
    CheckpointKind("huggingface", _is_hf_dir, _load_hf),
    CheckpointKind("state_dict", _is_state_dict_file, _load_state_dict_model),
)
