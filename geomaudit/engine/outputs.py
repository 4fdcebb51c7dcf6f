"""H_ii through the output of the one module call that uses a tensor, affinely: the parameter-space HVP less its ends.

A tensor θ that reaches the loss only through the output y of one call of a module that is affine in it — an
``nn.Linear``, GPT-2's ``Conv1D``, an ``nn.Embedding``, an ``nn.LayerNorm`` — has, with J = ∂y/∂θ (the call's input
does not depend on θ, and ∂²y/∂θ² = 0),

    H_θ = Jᵀ (∂²L/∂y²) J,    so    H_ii = uᵀ ∂(δ·u)/∂y,    u = J e_i,  δ = ∂L/∂y.

u is one column of y (viewed as rows × features): a column of the layer's input for a weight entry, ones for a bias
entry, the indicator of a token for an embedding entry, the normalised input for a LayerNorm weight entry. So one
double-backward from δ to y per coordinate gives H_ii exactly: the same one the parameter-space HVP ``grad(g_i, θ)``
runs, less its first and last products (for an (out × in) weight, two products of the layer's input with a one-hot
tangent, T·in·out each; for an embedding, two vocabulary-sized tensors).

Whether a forward qualifies is checked on its autograd graph, never assumed: every module holding θ must be of a
type in ``LINEAR_IN`` (exactly that type, plain forward, no other hooks), the loss must depend on exactly one call
of them, neither that call's input nor its output may be changed in place afterwards, and θ must have exactly one
edge in the loss's graph (a second call, a tied weight, a functional use, a penalty in the loss adds one). Anything
else takes the parameter-space HVPs: with two uses the later one's input depends on θ, and the formula above misses
the terms that brings.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module


@dataclass
class Use:
    """One call of a module with θ: its output y, viewed as (-1, ``width``), and the column of it that coordinate i
    moves, with the values (``column(i) -> (column, values)``; values a column of the input, or 1.0)."""

    output: Tensor
    width: int
    column: Callable[[int], tuple[int, Tensor | float]]


def _linear(module: nn.Linear, role: str, x: Tensor, y: Tensor) -> Use:  # y = x Wᵀ + b, W (out, in)
    width, fan_in = module.weight.shape
    if role == "bias":
        return Use(y, width, lambda i: (i, 1.0))
    rows = x.reshape(-1, fan_in)
    return Use(y, width, lambda i: (i // fan_in, rows[:, i % fan_in]))


def _conv1d(module: nn.Module, role: str, x: Tensor, y: Tensor) -> Use:  # transformers' Conv1D: y = x W + b, W (in, out)
    fan_in, width = module.weight.shape
    if role == "bias":
        return Use(y, width, lambda i: (i, 1.0))
    rows = x.reshape(-1, fan_in)
    return Use(y, width, lambda i: (i % width, rows[:, i // width]))


def _embedding(module: nn.Embedding, role: str, ids: Tensor, y: Tensor) -> Use | None:  # y = W[ids]
    if module.max_norm is not None or module.sparse or module.scale_grad_by_freq:
        return None  # max_norm rewrites W in the forward; the others change what backward computes
    width, flat = module.embedding_dim, ids.reshape(-1)

    def column(i: int) -> tuple[int, Tensor | float]:
        token = i // width  # the padding row gets no gradient from nn.Embedding: its H_ii are 0, as in θ-space
        return i % width, 0.0 if token == module.padding_idx else (flat == token).to(y.dtype)
    return Use(y, width, column)


def _layer_norm(module: nn.LayerNorm, role: str, x: Tensor, y: Tensor) -> Use:  # y = γ ⊙ n(x) + β
    width = prod(module.normalized_shape)
    if role == "bias":
        return Use(y, width, lambda i: (i, 1.0))
    with torch.no_grad():
        normed = nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps).reshape(-1, width)
    return Use(y, width, lambda i: (i, normed[:, i]))


# the module types whose output is affine in each of their parameters, by qualified class name (transformers'
# Conv1D without importing transformers): how one coordinate's tangent u = J e_i sits in the output (None: this
# module's settings make it not so)
LINEAR_IN: dict[str, Callable[[nn.Module, str, Tensor, Tensor], Use | None]] = {
    "torch.nn.modules.linear.Linear": _linear,
    "transformers.pytorch_utils.Conv1D": _conv1d,
    "torch.nn.modules.sparse.Embedding": _embedding,
    "torch.nn.modules.normalization.LayerNorm": _layer_norm,
}


def _builder(module: nn.Module):
    cls = type(module)
    return LINEAR_IN.get(f"{cls.__module__}.{cls.__qualname__}")


@contextmanager
def captured_uses(model: nn.Module, param: nn.Parameter) -> Iterator[list | None]:
    """Record every call of a module holding ``param`` during the forward under it: yields a list that fills with
    (builder, role, module, input, output, versions), or None if some holder is not a plain ``LINEAR_IN`` module."""
    holders = [(m, [k for k, p in m._parameters.items() if p is param]) for m in model.modules()]
    holders = [(m, roles) for m, roles in holders if roles]
    plain = (not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks
             and all(len(roles) == 1 and _builder(m) and "forward" not in vars(m)
                     and not m._forward_hooks and not m._forward_pre_hooks for m, roles in holders))
    if not holders or not plain:
        yield None
        return
    calls: list = []

    def record(role):
        def hook(module, args, output):
            if len(args) == 1 and isinstance(output, Tensor):
                calls.append((_builder(module), role, module, args[0], output, args[0]._version, output._version))
            else:
                calls.append(None)  # called with keywords or extra arguments: not the plain forward
        return hook

    handles = [m.register_forward_hook(record(roles[0])) for m, roles in holders]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def use_in_loss(loss: Tensor, param: nn.Parameter, calls: list | None) -> Use | None:
    """The ``Use`` of the one recorded call the loss depends on, if ``param`` reaches ``loss`` through it alone (one
    graph edge into ``param``, nothing changed in place); None otherwise."""
    if calls is None or not calls or None in calls or loss.grad_fn is None:
        return None
    seen, stack, edges = {loss.grad_fn}, [loss.grad_fn], 0
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None:
                continue
            if getattr(node, "variable", None) is param:
                edges += 1
            elif node not in seen:
                seen.add(node)
                stack.append(node)
    uses = []
    for build, role, module, x, y, x_version, y_version in calls:
        if x._version != x_version or y._version != y_version:
            return None  # an in-place change after the call: y is no longer what the module computed
        if y.grad_fn in seen:
            uses.append(build(module, role, x.detach(), y))
    return uses[0] if len(uses) == 1 and edges == 1 else None


class OutputHVP:
    """H_ii of one micro-batch's loss for single coordinates, by one double-backward from δ = ∂L/∂y to y."""

    def __init__(self, loss: Tensor, use: Use):
        (delta,) = torch.autograd.grad(loss, use.output, create_graph=True)
        self.use, self.delta = use, delta
        self.tangent = torch.zeros(use.output.shape, dtype=use.output.dtype, device=use.output.device)
        self.rows = self.tangent.view(-1, use.width)  # one column is set for a coordinate, then zeroed again

    def entry(self, i: int) -> Tensor:
        if not self.delta.requires_grad:  # the loss is (at most) linear in y: H = 0
            return torch.zeros((), dtype=self.tangent.dtype, device=self.tangent.device)
        col, values = self.use.column(i)
        self.rows[:, col] = values
        (hv,) = torch.autograd.grad(self.delta, self.use.output, self.tangent, retain_graph=True)
        self.rows[:, col] = 0
        return (hv.reshape(-1, self.use.width)[:, col] * values).sum()
