"""The Adam/AdamW state saved beside a checkpoint (``optimizer.pt``), by parameter name.

``torch.optim`` state dicts number parameters 0, 1, … in the order of their parameter groups, and keep no names,
so the names follow from the model and a layout:

1. the Trainer's own optimizer: two groups built from ``model.named_parameters()`` (trainable only), first the
   tensors that get weight decay, then the rest (biases and norms);
2. any other grouping whose parameters, groups concatenated, are the model's in ``model.parameters()`` order:
   ``Trainer(optimizers=(AdamW(model.parameters()), None))`` (one group) and its trainable-only form.

The first layout whose group sizes and moment shapes fit is used; a state that fits none is an input error,
never a guess.
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


def _layouts(model: nn.Module, sizes: list[int]) -> list[list[str]]:
    """Candidate names of the state's parameters, in its numbering: the Trainer's groups when the group sizes
    are the Trainer's, then ``model.parameters()`` order (all parameters, then the trainable ones)."""
    trainer = trainer_parameter_order(model)
    candidates = [sum(trainer, [])] if sizes == [len(g) for g in trainer] else []
    every = [n for n, _ in model.named_parameters()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    candidates += [every] + ([trainable] if trainable != every else [])
    return [names for names in candidates if len(names) == sum(sizes)]


def adam_state(checkpoint: Path, model: nn.Module) -> dict[str, dict]:
    """``{name: {"exp_avg", "exp_avg_sq", "step", "betas", "eps"}}`` from ``checkpoint/optimizer.pt``."""
    import torch

    path = Path(checkpoint) / "optimizer.pt"
    if not path.is_file():
        raise InputError(f"--alignment needs the optimizer state: {path} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        groups, state = saved["param_groups"], saved["state"]
        indices = [(index, group) for group in groups for index in group["params"]]
    except Exception as err:
        raise InputError(f"cannot read {path} as a torch optimizer state ({err})") from err
    params = dict(model.named_parameters())
    sizes = [len(g["params"]) for g in groups]

    def fits(names: list[str]) -> bool:
        return all(index not in state or "exp_avg" not in state[index]
                   or tuple(state[index]["exp_avg"].shape) == tuple(params[name].shape)
                   for (index, _), name in zip(indices, names))

    layout = next((names for names in _layouts(model, sizes) if fits(names)), None)
    if layout is None:
        trainer = [len(g) for g in trainer_parameter_order(model)]
        raise InputError(f"{path} does not fit this model: its parameter groups {sizes} match neither the Trainer's "
                         f"groups {trainer} nor the model's {len(params)} parameters in model.parameters() order, "
                         f"in number and shape")
    result = {}
    for (index, group), name in zip(indices, layout):
        entry = state.get(index, {})
        if "exp_avg_sq" not in entry:
            raise InputError(f"{path} holds no Adam moments for {name}: --alignment needs Adam or AdamW")
        result[name] = {"exp_avg": entry["exp_avg"], "exp_avg_sq": entry["exp_avg_sq"],
                        "step": float(entry["step"]), "betas": group["betas"], "eps": group["eps"]}
    return result


def adaptive_step(moments: dict) -> Tensor:
    """Adam's bias-corrected step direction m̂ / (sqrt(v̂) + ε), the paper's "adaptive gradient" (App. A.6)."""
    (b1, b2), t = moments["betas"], moments["step"]
    m_hat = moments["exp_avg"] / (1 - b1 ** t)
    v_hat = moments["exp_avg_sq"] / (1 - b2 ** t)
    return m_hat / (v_hat.sqrt() + moments["eps"])
