"""The Adam/AdamW state a Hugging Face Trainer saves beside a checkpoint (``optimizer.pt``), by parameter name.

``torch.optim`` state dicts number parameters 0, 1, … in the order of their parameter groups. The Trainer
builds two groups from ``model.named_parameters()`` (trainable only): first the tensors that get weight decay,
then the rest (biases and norms), so the names follow from the model.
"""

from pathlib import Path

from torch import Tensor, nn

from ..errors import InputError


def trainer_parameter_order(model: nn.Module) -> list[list[str]]:
    """The Trainer's two parameter groups for ``model``: decayed tensors, then the others."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [[n for n in names if n in decay], [n for n in names if n not in decay]]


def adam_state(checkpoint: Path, model: nn.Module) -> dict[str, dict]:
    """``{name: {"exp_avg", "exp_avg_sq", "step", "betas", "eps"}}`` from ``checkpoint/optimizer.pt``."""
    import torch

    path = Path(checkpoint) / "optimizer.pt"
    if not path.is_file():
        raise InputError(f"--alignment needs the optimizer state: {path} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        groups, state = saved["param_groups"], saved["state"]
    except Exception as err:
        raise InputError(f"cannot read {path} as a torch optimizer state ({err})") from err
    order = trainer_parameter_order(model)
    if [len(g["params"]) for g in groups] != [len(names) for names in order]:
        raise InputError(f"{path} does not follow the Trainer's parameter groups for this model "
                         f"({[len(g['params']) for g in groups]} parameters per group, expected "
                         f"{[len(names) for names in order]})")
    params = dict(model.named_parameters())
    result = {}
    for group, names in zip(groups, order):
        for index, name in zip(group["params"], names):
            entry = state.get(index, {})
            if "exp_avg_sq" not in entry:
                raise InputError(f"{path} holds no Adam moments for {name}: --alignment needs Adam or AdamW")
            if entry["exp_avg"].shape != params[name].shape:
                raise InputError(f"{path}: the moments of parameter {index} have shape "
                                 f"{tuple(entry['exp_avg'].shape)}, but {name} has {tuple(params[name].shape)}")
            result[name] = {"exp_avg": entry["exp_avg"], "exp_avg_sq": entry["exp_avg_sq"],
                            "step": float(entry["step"]), "betas": group["betas"], "eps": group["eps"]}
    return result


def adaptive_step(moments: dict) -> Tensor:
    """Adam's bias-corrected step direction m̂ / (sqrt(v̂) + ε), the paper's "adaptive gradient" (App. A.6)."""
    (b1, b2), t = moments["betas"], moments["step"]
    m_hat = moments["exp_avg"] / (1 - b1 ** t)
    v_hat = moments["exp_avg_sq"] / (1 - b2 ** t)
    return m_hat / (v_hat.sqrt() + moments["eps"])
