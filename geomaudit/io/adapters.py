"""PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``): the adapter on its base model.

The base model is ``base_model_name_or_path`` of ``adapter_config.json``: a local folder, or a hub id resolved
from the local Hugging Face cache (``hub.locate``). It is loaded like any Hugging Face checkpoint, then
``peft`` puts the adapter's layers into it and loads their tensors, so the forward pass is peft's own, the
one the adapter was trained with. By default the audited layers are the adapter's tensors (LoRA's
``lora_A``/``lora_B``, and the copies of ``modules_to_save``), on the frozen base; with ``merge`` the adapter
is merged into the base weights (``merge_and_unload``) and every layer of the merged model is audited.

peft (the ``peft`` extra) is used rather than a LoRA re-implementation because it is the reference for every
variant an adapter can hold (rsLoRA and rank/alpha patterns, GPT-2's transposed ``Conv1D``, DoRA, IA³, LoHa …);
the tests check its H_ii against a hand-written LoRA forward.
"""

import json
import warnings
from dataclasses import replace
from pathlib import Path

from ..errors import InputError, UsageError
from .formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, model_files
from .hub import locate

# peft's task_type → geomaudit's task, for --task auto (a base without that head gets it, as peft trains it).
ADAPTER_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification"}
HEAD_WEIGHTS = (".classifier.weight", ".score.weight", ".classifier.out_proj.weight")


def adapter_config(path: Path) -> dict:
    """``adapter_config.json`` as a dict; unreadable or without a base model is an input error."""
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path / ADAPTER_CONFIG}: {str(err).splitlines()[0]}") from err
    if not isinstance(config, dict) or not isinstance(config.get("base_model_name_or_path"), str):
        raise InputError(f"{path / ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return config


def base_model(path: Path) -> Path:
    """The folder of the adapter's base model: a local path, or a hub id from the local Hugging Face cache."""
    try:
        return locate(adapter_config(path)["base_model_name_or_path"], what="the adapter's base model")
    except InputError as err:
        raise InputError(f"{err}: point base_model_name_or_path in {path / ADAPTER_CONFIG} at the base model's "
                         "folder") from err


def adapter_weights(path: Path) -> Path:
    found = [path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()]
    if not found:
        raise InputError(f"the adapter folder {path} has no {' or '.join(ADAPTER_WEIGHTS)}")
    return found[0]


def adapter_files(path: Path) -> list[Path]:
    """What an adapter audit loads: the adapter's config and weights, and the base model's files."""
    return [path / ADAPTER_CONFIG, adapter_weights(path), *model_files(base_model(path))]


def _head_size(state: dict) -> int | None:
    """The number of labels of the classification head an adapter carries (peft saves ``classifier``/``score``)."""
    heads = [v for k, v in state.items() if k.endswith(HEAD_WEIGHTS) and v.ndim == 2]
    return int(heads[0].shape[0]) if len(heads) == 1 else None


def load_adapter(path: Path, options, load_base):
    """The adapter at ``path`` in its base model, or merged into it with ``options.merge``.

    ``load_base(folder, options)`` loads the base as a Hugging Face checkpoint. With ``--task auto`` the base is
    loaded for the adapter's ``task_type`` when geomaudit knows it, and a classification head gets as many labels
    as the adapter's saved head has.
    """
    try:
        import peft
    except ImportError as err:
        raise UsageError("auditing a PEFT adapter needs peft: pip install 'geomaudit[peft]'") from err
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    from .checkpoints import load_tokenizer, read_state_dict

    try:
        with warnings.catch_warnings():  # peft's notes on configs from other versions: not one line, not errors
            warnings.simplefilter("ignore")
            config = peft.PeftConfig.from_pretrained(str(path))
    except Exception as err:
        raise InputError(f"cannot read {path / ADAPTER_CONFIG}: {_first_line(err)}") from err
    if config.is_prompt_learning:
        raise InputError(f"{path} is a {config.peft_type.value} adapter: its tensors act outside the base model's "
                         "layers (virtual tokens), which geomaudit does not audit")
    state = read_state_dict(adapter_weights(path), options.allow_pickle)
    task = ADAPTER_TASKS.get(config.task_type, "auto") if options.task == "auto" else options.task
    loaded = load_base(base_model(path), replace(options, task=task,
                                                 num_labels=_head_size(state) or options.num_labels))
    config.inference_mode = False
    try:
        with warnings.catch_warnings():  # deprecation notices about peft's calls, and peft fixing fan_in_fan_out
            warnings.simplefilter("ignore")
            model = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, peft.PeftModel)(loaded.model, config)
        result = peft.set_peft_model_state_dict(model, state)
    except Exception as err:
        raise InputError(f"the adapter {path} does not fit its base model: {_first_line(err)}") from err
    adapter_names = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(adapter_names & set(result.missing_keys))
    if result.unexpected_keys or missing:
        what = (f"has tensors the base model has no place for ({result.unexpected_keys[0]})"
                if result.unexpected_keys else f"lacks {len(missing)} of its tensors ({missing[0]})")
        raise InputError(f"the adapter {path} {what}")
    try:
        net = model.merge_and_unload().requires_grad_(True) if options.merge else model.get_base_model()
    except (NotImplementedError, ValueError, RuntimeError) as err:  # a variant peft cannot merge (aLoRA …)
        raise InputError(f"the adapter {path} cannot be merged into its base model: {_first_line(err)}") from err
    saved = tuple(config.modules_to_save or ())
    initialised = [n for n in loaded.initialised  # a head the adapter carries is restored, not initialised
                   if not any(f".{n.rsplit('.', 1)[0]}".endswith(f".{m}") for m in saved)]
    return replace(loaded, model=net.eval(), path=str(path),
                   format="peft-merged" if options.merge else "peft-adapter",
                   tokenizer=load_tokenizer(path) or loaded.tokenizer, initialised=initialised, base=loaded.path)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
