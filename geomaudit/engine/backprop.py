"""The exact Hessian diagonal of every parameter of a Sequential MLP, by backpropagating the Hessian.

For ``nn.Sequential`` models of ``nn.Linear`` layers and element-wise activations (``ELEMENTWISE``), whose loss
depends on the parameters only through the model's output and is a sum over the output's rows (examples, or tokens)
— so that the Hessian of the loss in the output is block-diagonal over rows — the Hessian M_a = ∂²L/∂a² of each row's
activations a is propagated backwards exactly (the recursion BackPACK's ``DiagHessian`` uses, written anew here):

    output z:            M_z = ∂²L/∂z²                        (autograd: one HVP per output unit, all rows at once)
    Linear z = a Wᵀ + b: H[W_jk] += Σ_n (M_z)_n,jj a_n,k²,   H[b_j] += Σ_n (M_z)_n,jj,   M_a = Wᵀ M_z W
    a = σ(z):            M_z = diag(σ'(z)) M_a diag(σ'(z)) + diag(σ''(z) ⊙ ∂L/∂a)

Each M is held as Σ S diag(s) Sᵀ + diag(D) with factors S of (rows, width, rank), so its diagonal costs the factors'
size: the output's C units give rank C, and each activation with σ'' ≠ 0 adds a diagonal that becomes a factor of its
width at the next Linear down. Every parameter's whole diagonal costs about C + 1 backward passes, against one
Hessian-vector product per coordinate for the engine's general path.

``exact_diagonals`` returns ``None`` when any condition fails (another layer type, a Dropout in training mode, a
module called twice, a loss that reaches a parameter or an activation other than through the output, a loss Hessian
that couples two rows, factors over ``COLUMN_BUDGET_BYTES``); the engine then computes Hessian-vector products.
"""

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
               nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout)
ROW_CHECK_SEED = 0


def exact_diagonals(model: nn.Module, loss_fn: Callable, micro_batches: Sequence, budget_bytes: int
                    ) -> dict[str, Tensor] | None:
    """Σ_b w_b diag(∇²_θ L_b) for every parameter θ of ``model`` (flattened, by name), or ``None`` where the
    recursion does not apply exactly (see the module's docstring)."""
    if not _supported(model):
        return None
    total = {name: torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for name, p in model.named_parameters()}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(True)
        for mb in micro_batches:
            part = _one_batch(model, loss_fn, mb.tensors, budget_bytes)
            if part is None:
                return None
            for name, values in part.items():
                total[name] += mb.weight * values
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
    return total


def _supported(model: nn.Module) -> bool:
    if not isinstance(model, nn.Sequential) or not any(isinstance(m, nn.Linear) for m in model):
        return False
    for m in model:
        if isinstance(m, nn.Dropout) and m.training:
            return False
        if not isinstance(m, (nn.Linear, *ELEMENTWISE)):
            return False
    return True


def _one_batch(model: nn.Sequential, loss_fn: Callable, tensors: Mapping[str, Tensor], budget_bytes: int
               ) -> dict[str, Tensor] | None:
    seen: list[tuple[nn.Module, Tensor, Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out))) for m in model]
    try:
        loss = loss_fn(model, tensors)
    finally:
        for h in hooks:
            h.remove()
    if [m for m, _, _ in seen] != list(model) or not loss.requires_grad:
        return None  # a module skipped or called twice, or the model called more than once
    z = seen[-1][2]
    if z.ndim < 1 or not _only_through(loss, z):
        return None
    width = z.shape[-1]
    acts = [out for m, _, out in seen[:-1]]
    grads = torch.autograd.grad(loss, [z, *acts], create_graph=True, allow_unused=True)
    g_z = grads[0]
    if g_z is None:  # the loss does not depend on the output, so on no parameter
        return {name: torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for name, p in model.named_parameters()}
    rows = z.reshape(-1, width).shape[0]
    factors = []  # M = Σ S diag(s) Sᵀ (+ diag(D)); none for a loss linear in the output
    if g_z.requires_grad:
        hess = torch.stack([torch.autograd.grad(g_z, z, _unit(z, c), retain_graph=True)[0].reshape(rows, width)
                            for c in range(width)], dim=2)  # (rows, width, width): column c of each row's block
        if not _block_diagonal(g_z, z, hess):
            return None
        evals, evecs = torch.linalg.eigh((hess + hess.transpose(1, 2)) / 2)
        factors.append((evecs * evals.abs().sqrt().unsqueeze(1), evals.sign()))
    diagonal: Tensor | None = None
    grad_of = {id(out): g for out, g in zip([z, *acts], grads)}
    result = {}
    names = {id(p): n for n, p in model.named_parameters()}
    below = [any(isinstance(m, nn.Linear) for m in list(model)[:i]) for i in range(len(model))]
    for i in reversed(range(len(seen))):
        module, a, out = seen[i]
        a = a.detach().reshape(rows, -1)
        if isinstance(module, nn.Linear):
            d = _diag(factors, diagonal, out.detach().reshape(rows, -1))
            result[names[id(module.weight)]] = torch.einsum("nj,nk->jk", d, a ** 2).reshape(-1)
            if module.bias is not None:
                result[names[id(module.bias)]] = d.sum(0)
            if not below[i]:
                break
            w = module.weight.detach()
            factors = [(torch.einsum("oi,nor->nir", w, s), sign) for s, sign in factors]
            if diagonal is not None:  # Wᵀ diag(D) W = (Wᵀ diag(√|D|)) diag(sign D) (…)ᵀ
                factors.append((w.t().unsqueeze(0) * diagonal.abs().sqrt().unsqueeze(1), diagonal.sign()))
                diagonal = None
            if sum(s.numel() * s.element_size() for s, _ in factors) > budget_bytes:
                return None
        elif not isinstance(module, (nn.Identity, nn.Dropout)):
            pre = a.detach().requires_grad_(True)
            first = torch.autograd.grad(module(pre).sum(), pre, create_graph=True)[0]
            second = torch.autograd.grad(first.sum(), pre, allow_unused=True)[0] if first.requires_grad else None
            first = first.detach()
            factors = [(first.unsqueeze(2) * s, sign) for s, sign in factors]
            if diagonal is not None:
                diagonal = first ** 2 * diagonal
            g_a = grad_of.get(id(out))
            if second is not None and g_a is not None and second.count_nonzero():  # σ'' = 0 (ReLU): no residual
                extra = second * g_a.detach().reshape(rows, -1)
                diagonal = extra if diagonal is None else diagonal + extra
    return {n: v.detach() for n, v in result.items()}


def _unit(z: Tensor, c: int) -> Tensor:
    v = torch.zeros_like(z)
    v[..., c] = 1
    return v


def _diag(factors: list[tuple[Tensor, Tensor]], diagonal: Tensor | None, like: Tensor) -> Tensor:
    """diag(Σ S diag(s) Sᵀ + diag(D)) per row, shaped and typed as ``like`` (rows, width), for factors S
    (rows, width, rank) and signs (rows, rank)."""
    d = torch.zeros_like(like) if diagonal is None else diagonal
    for s, sign in factors:
        d = d + (s ** 2 * sign.unsqueeze(1)).sum(2)
    return d


def _block_diagonal(g_z: Tensor, z: Tensor, hess: Tensor) -> bool:
    """Whether the loss Hessian in the output couples no two rows: an HVP with random signs per row and a random
    direction per unit must equal each row's block times its own part (a coupling would add other rows' parts)."""
    rows, width = hess.shape[:2]
    gen = torch.Generator(device="cpu").manual_seed(ROW_CHECK_SEED)
    v = torch.randn(rows, width, generator=gen, dtype=torch.float64).to(z.dtype).to(z.device)
    v *= torch.randint(0, 2, (rows, 1), generator=gen).to(v) * 2 - 1
    got = torch.autograd.grad(g_z, z, v.reshape(z.shape), retain_graph=True)[0].reshape(rows, width)
    want = torch.einsum("nab,nb->na", hess, v)
    scale = want.abs().max()
    tol = 1e-10 if z.dtype == torch.float64 else 1e-4
    return bool((got - want).abs().max() <= tol * scale) if scale > 0 else bool(got.abs().max() == 0)


def _only_through(loss: Tensor, z: Tensor) -> bool:
    """Whether the loss's graph reaches a leaf that requires grad (a parameter) only through the output ``z``."""
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node is z.grad_fn or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a parameter reached other than through z
            return False
        stack.extend(n for n, _ in node.next_functions)
    return True
