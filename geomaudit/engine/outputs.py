"""H_ii through the outputs of the module calls that use a tensor affinely: the parameter-space HVP less its ends.

Let a tensor θ reach the loss only through the outputs y_1 … y_k of calls y_j = f_j(x_j, θ) of modules affine in θ —
``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding``, ``nn.LayerNorm`` — one call, or several (a weight tied between
the embedding and the output head, a layer called twice). Give each call its own copy θ_j of θ; then
H_ii = Σ_jl ∂²L/∂θ_j,i ∂θ_l,i, and with δ_j = ∂L/∂y_j, u_j = ∂y_j/∂θ_i (one column of y_j: a column of x_j for a
weight entry, ones for a bias entry, the indicator of a token for an embedding entry, the normalised input for a
LayerNorm weight entry) and w_j = ∂(u_j·δ_j)/∂x_j at fixed δ_j (for a weight entry of a Linear: a column of δ_j in
the place of that column of x_j):

    H_ii = Σ_j u_j · ∂S/∂y_j,    S = Σ_l (δ_l·u_l + 2 w_l·x_l),

the derivatives taken through the graph with the parameters fixed: one double-backward from the δ's (and x's) to
the y's per coordinate. Why: θ_j enters L only through y_j (x_j does not depend on θ_j) and ∂²y_j/∂θ_j² = 0, so
u_j·∂(δ_l·u_l)/∂y_j is the term (j, l) for a call j not downstream of l, whose δ_l's graph holds no θ_j. For j
downstream of l it misses θ_j's direct use in the backward of call j (∂L/∂x_j = (∂f_j/∂x_j)ᵀ δ_j), a term equal to
u_l·∂(w_j·x_j)/∂y_l by the symmetry of ∂²f_j/∂x_j∂θ_i, which the 2 in S counts once more. With one call, x_j does not
depend on any y and S = δ·u: H_ii = uᵀ (∂²L/∂y²) u.

This is the double-backward the parameter-space HVP ``grad(g_i, θ)`` runs, less its first and last products (for
an (out × in) weight, two products of the layer's input with a one-hot tangent, T·in·out each; for an embedding,
two vocabulary-sized tensors). A LayerNorm weight, whose u is not linear in its input, is taken only with one call.

Whether a forward qualifies is checked on its autograd graph, never assumed: every module holding θ must be of a
type in ``LINEAR_IN`` (exactly that type, plain forward, no other hooks), no input or output of theirs may be changed
in place afterwards, and θ must have exactly one edge in the loss's graph per call the loss depends on (a
functional use of θ, a penalty on it in the loss or a subclass's forward adds one). Anything else takes the
parameter-space HVPs.
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
    """One call of a module with θ. ``column(i) -> (column, values)``: u_i is ``values`` (a column of the input, or
    1.0) in that column of the output y, viewed as (-1, ``width``). For a weight entry of a Linear/Conv1D,
    ``input_column(i) -> (column of x, column of y)`` places w_i in the input x, viewed as (-1, ``fan_in``).
    ``normalised``: u_i is not linear in x (a LayerNorm weight), so the call must be θ's only one."""

    output: Tensor
    width: int
    column: Callable[[int], tuple[int, Tensor | float]]
    input: Tensor | None = None
    fan_in: int = 0
    input_column: Callable[[int], tuple[int, int]] | None = None
    normalised: bool = False


def _linear(module: nn.Linear, role: str, x: Tensor, y: Tensor) -> Use:  # y = x Wᵀ + b, W (out, in)
    width, fan_in = module.weight.shape
    if role == "bias":
        return Use(y, width, lambda i: (i, 1.0))
    rows = x.detach().reshape(-1, fan_in)
    return Use(y, width, lambda i: (i // fan_in, rows[:, i % fan_in]), x, fan_in, lambda i: (i % fan_in, i // fan_in))


def _conv1d(module: nn.Module, role: str, x: Tensor, y: Tensor) -> Use:  # transformers' Conv1D: y = x W + b, W (in, out)
    fan_in, width = module.weight.shape
    if role == "bias":
        return Use(y, width, lambda i: (i, 1.0))
    rows = x.detach().reshape(-1, fan_in)
    return Use(y, width, lambda i: (i % width, rows[:, i // width]), x, fan_in, lambda i: (i // width, i % width))


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
    return Use(y, width, lambda i: (i, normed[:, i]), normalised=True)


# the module types whose output is affine in each of their parameters, by qualified class name (transformers'
# Conv1D without importing transformers): how one coordinate's tangent u = ∂y/∂θ_i sits in the output (None: this
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

    def record(build, role):
        def hook(module, args, output):
            if len(args) == 1 and isinstance(output, Tensor):
                calls.append((build, role, module, args[0], output, args[0]._version, output._version))
            else:
                calls.append(None)  # called with keywords or extra arguments: not the plain forward
        return hook

    handles = [m.register_forward_hook(record(_builder(m), roles[0])) for m, roles in holders]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def uses_in_loss(loss: Tensor, param: nn.Parameter, calls: list | None) -> list[Use] | None:
    """The ``Use`` of each recorded call the loss depends on, if ``param`` reaches ``loss`` through them alone (one
    graph edge into ``param`` per such call, nothing changed in place); None otherwise."""
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
            uses.append(build(module, role, x, y))
    if not uses or edges != len(uses) or None in uses or (len(uses) > 1 and any(u.normalised for u in uses)):
        return None
    return uses


class OutputHVP:
    """H_ii of one micro-batch's loss for single coordinates: one double-backward from the δ's (and, with several
    calls, the x's) to the y's per coordinate."""

    def __init__(self, loss: Tensor, uses: list[Use]):
        deltas = torch.autograd.grad(loss, [u.output for u in uses], create_graph=True)
        self.uses = uses
        self.u = [_Tangent(u.output, u.width) for u in uses]  # the tangents are kept zero between coordinates
        self.sources = [(d, t) for d, t in zip(deltas, self.u) if d.requires_grad]
        self.w = []
        if len(uses) > 1:  # the inputs that depend on θ through another call: the 2 w·x terms of S
            self.w = [(u, d.detach().reshape(-1, u.width), _Tangent(u.input, u.fan_in)) for u, d in zip(uses, deltas)
                      if u.input_column and u.input.requires_grad]
            self.sources += [(u.input, t) for u, _, t in self.w]
        self.zero = torch.zeros((), dtype=uses[0].output.dtype, device=uses[0].output.device)

    def entry(self, i: int) -> Tensor:
        if not self.sources:  # the loss is (at most) linear in every y: H = 0
            return self.zero
        at = [u.column(i) for u in self.uses]
        for t, (col, values) in zip(self.u, at):
            t.set(col, values)
        for u, delta, t in self.w:
            x_col, y_col = u.input_column(i)
            t.set(x_col, 2 * delta[:, y_col])
        outputs, tangents = zip(*((s, t.tensor) for s, t in self.sources))
        hv = torch.autograd.grad(outputs, [u.output for u in self.uses], tangents, retain_graph=True,
                                 allow_unused=True)
        for t in self.u + [t for _, _, t in self.w]:
            t.clear()
        parts = [_dot(h.reshape(-1, u.width)[:, col], values) for h, u, (col, values) in zip(hv, self.uses, at)
                 if h is not None]
        return parts[0] if len(parts) == 1 else sum(parts, self.zero)


def _dot(column: Tensor, values: Tensor | float) -> Tensor:
    return column.sum() * values if isinstance(values, float) else torch.dot(column, values.to(column.dtype))


class _Tangent:
    """A zero tensor shaped like ``like`` in which one column (of its (-1, width) view) is set, then cleared."""

    def __init__(self, like: Tensor, width: int):
        self.tensor = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        self.rows, self.col = self.tensor.view(-1, width), None

    def set(self, col: int, values: Tensor | float) -> None:
        self.rows[:, col], self.col = values, col

    def clear(self) -> None:
        if self.col is not None:
            self.rows[:, self.col], self.col = 0, None
