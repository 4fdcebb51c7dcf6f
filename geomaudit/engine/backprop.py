"""The exact Hessian diagonal of every parameter of a Sequential MLP or CNN, by backpropagating the Hessian.

For ``nn.Sequential`` models of ``nn.Linear`` layers, ``nn.Conv2d`` layers, element-wise activations
(``ELEMENTWISE``), ``SHAPING`` modules (Flatten, max and average pooling) and eval-mode ``nn.BatchNorm2d`` (with
running statistics: an affine map per channel), whose loss
depends on the parameters only through the model's output and is a sum over the output's rows (examples, or tokens)
— so that the Hessian of the loss in the output is block-diagonal over rows — the Hessian M_a = ∂²L/∂a² of each row's
activations a is propagated backwards exactly (the recursion BackPACK's ``DiagHessian`` uses, written anew here):

    output z:            M_z = ∂²L/∂z²                        (autograd: one HVP per output unit, all rows at once)
    Linear z = a Wᵀ + b: H[W_jk] += Σ_n (M_z)_n,jj a_n,k²,   H[b_j] += Σ_n (M_z)_n,jj,   M_a = Wᵀ M_z W
    a = σ(z):            M_z = diag(σ'(z)) M_a diag(σ'(z)) + diag(σ''(z) ⊙ ∂L/∂a)
    Conv2d z = W ⋆ a + b, with U = unfold(a) (patches k at positions p), channel o of z at p:
                         H[W_ok] += Σ_n Σ_pq (M_z)_n,(o,p)(o,q) U_n,kp U_n,kq,   H[b_o] += Σ_n Σ_pq (M_z)_n,(o,p)(o,q),
                         M_a = Jᵀ M_z J (J the convolution's Jacobian; likewise through Flatten and pooling)

Each M is held as Σ S diag(s) Sᵀ + diag(D) with factors S of (rows, width, rank), so its diagonal costs the factors'
size: the output's C units give rank C, and each activation with σ'' ≠ 0 adds a diagonal that becomes a factor of its
width at the next Linear down (at a convolution or a pooling that factor's rank would be the whole feature map, so
there the recursion gives up: a CNN is taken with piecewise-linear activations, ReLU and kin, below its last
convolution). Every parameter's whole diagonal costs about C + 1 backward passes, against one Hessian-vector product
per coordinate for the engine's general path.

Only the wanted tensors are computed: the recursion stops at the lowest layer holding one of them, and only they
require grad in its forward pass, so the conditions below are checked for them alone (a penalty on another tensor in
the loss leaves their Hessian unchanged). ``exact_diagonals`` returns ``None`` when any condition fails (another layer
type, a Dropout in training mode, a module called twice, a loss that reaches a wanted tensor or an activation above it
other than through the output, a loss Hessian that couples two rows, factors over ``COLUMN_BUDGET_BYTES``); the
engine then computes Hessian-vector products.
"""

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import Tensor, nn

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
               nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout)
LINEAR_PIECES = (nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.Identity, nn.Dropout)  # σ'' = 0: no factor added below
SHAPING = (nn.Flatten, nn.MaxPool2d, nn.AvgPool2d)  # (piecewise) linear, no parameters: factors go through their vjp
ROW_CHECK_SEED = 0
# The cost rule (``_cheaper``), in multiply-adds, measured on a 2-core CPU: one HVP's fixed cost (autograd's calls,
# ≈ 75 µs at that CPU's 135 G multiply-adds per second), and a batched symmetric eigendecomposition's per matrix of
# size C, ≈ 6 C³ + 5000 C² (timed for C = 10 … 1000); checked by benchmarks/bench_cost_rule.py
HVP_OVERHEAD = 1e7
EIGH_CUBIC, EIGH_SQUARE = 6, 5e3


def exact_diagonals(model: nn.Module, loss_fn: Callable, micro_batches: Sequence, budget_bytes: int,
                    names: Collection[str], coords: int | None = None) -> dict[str, Tensor] | None:
    """Σ_b w_b diag(∇²_θ L_b) for the parameters θ of ``model`` named in ``names`` (flattened, by name), or ``None``
    where the recursion does not apply exactly to them (see the module's docstring) or, given ``coords`` (the
    coordinates per tensor the caller would otherwise take one HVP each for), where those HVPs cost less."""
    params = dict(model.named_parameters())
    if not _supported(model) or not names or not set(names) <= params.keys():
        return None
    total = {name: torch.zeros(params[name].numel(), dtype=params[name].dtype, device=params[name].device)
             for name in names}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for name, p in params.items():
            p.requires_grad_(name in total)
        for mb in micro_batches:
            part = _one_batch(model, loss_fn, mb.tensors, budget_bytes, total.keys(), coords)
            if part is None:
                return None
            for name in total:
                total[name] += mb.weight * part[name]
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
    return total


def _supported(model: nn.Module) -> bool:
    if not isinstance(model, nn.Sequential) or not any(isinstance(m, nn.Linear) for m in model):
        return False
    shared = [id(p) for m in model for p in m.parameters()]
    if len(shared) != len(set(shared)):  # a weight tied between two layers: its diagonal is not theirs apart
        return False
    for m in model:
        if isinstance(m, nn.Dropout) and m.training:
            return False
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            return False
        if isinstance(m, nn.BatchNorm2d) and (m.training or m.running_var is None):
            return False  # batch statistics: the normalisation couples the rows
        if not isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d, *SHAPING, *ELEMENTWISE)):
            return False
    return True


def _one_batch(model: nn.Sequential, loss_fn: Callable, tensors: Mapping[str, Tensor], budget_bytes: int,
               names: Collection[str], coords: int | None) -> dict[str, Tensor] | None:
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
    owner = {n: i for i, m in enumerate(model) for n, _ in m.named_parameters(prefix=str(i))}
    lowest = min(owner[n] for n in names)  # the recursion stops at this layer
    rows = z.reshape(-1, width).shape[0]
    if any(a.numel() // m.weight[0].numel() != rows if isinstance(m, nn.Linear) else a.shape[0] != rows
           for m, a, _ in seen if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d, *SHAPING))):
        return None  # a layer whose rows are not the loss's (a Linear over the last axis of an image, say)
    if coords is not None and not _cheaper(seen, rows, {n: owner[n] for n in names}, coords):
        return None
    acts = [out for _, _, out in seen[lowest:-1]]
    grads = torch.autograd.grad(loss, [z, *acts], create_graph=True, allow_unused=True)
    g_z = grads[0]
    if g_z is None:  # the loss does not depend on the output, so on no wanted parameter
        return {name: torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                for name, p in model.named_parameters() if name in names}
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
    for i in reversed(range(lowest, len(seen))):
        module, shaped, out = seen[i]
        a = shaped.detach().reshape(rows, -1)
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):  # the factors and diagonal per output channel
            channels = out.shape[1]
            per_channel = [(s.reshape(rows, channels, -1, s.shape[-1]), sign) for s, sign in factors]
            extra = None if diagonal is None else diagonal.reshape(rows, channels, -1)
            if f"{i}.bias" in names:
                result[f"{i}.bias"] = _per_channel(out, per_channel, extra)
        if isinstance(module, nn.Conv2d):
            unfolded = nn.functional.unfold(shaped.detach(), module.kernel_size, module.dilation, module.padding,
                                            module.stride)  # (rows, C_in·kh·kw, positions)
            if f"{i}.weight" in names:  # Σ_n Σ_r s_r (Σ_p S[(o,p),r] U[k,p])² + Σ_n Σ_p D[(o,p)] U[k,p]²
                h = torch.zeros(channels, unfolded.shape[1], dtype=out.dtype, device=out.device)
                step = max(1, budget_bytes // (unfolded.element_size() * rows * channels * unfolded.shape[1]))
                for s, sign in per_channel:  # a slice of the rank at a time: (rows, C_out, C_in·kh·kw, step)
                    for r in range(0, s.shape[-1], step):
                        part = torch.einsum("nopr,nkp->nokr", s[..., r:r + step], unfolded) ** 2
                        h += (part * sign[:, None, None, r:r + step]).sum((0, 3))
                if extra is not None:
                    h += torch.einsum("nop,nkp->ok", extra, unfolded ** 2)
                result[f"{i}.weight"] = h.reshape(-1)
            if i == lowest:
                break
            if diagonal is not None:
                return None  # a curved activation's term through a convolution: a factor of rank C_out·H·W
            factors = [(_vjp(module, shaped, s), sign) for s, sign in factors]
        elif isinstance(module, nn.BatchNorm2d):  # y = γ n + β, n = (x - μ) / √(σ² + ε) per channel
            inv = (module.running_var.detach() + module.eps).rsqrt()
            if f"{i}.weight" in names:
                normed = ((shaped.detach() - module.running_mean.detach()[:, None, None]) * inv[:, None, None])
                result[f"{i}.weight"] = _per_channel(out, per_channel, extra, normed.reshape(rows, channels, -1))
            if i == lowest:
                break
            scale = (inv if module.weight is None else module.weight.detach() * inv)[:, None, None]
            factors = [((s * scale).reshape(rows, -1, s.shape[-1]), sign) for s, sign in per_channel]
            if diagonal is not None:  # a diagonal scaling keeps the curved activations' term diagonal
                diagonal = (extra * scale.squeeze(-1) ** 2).reshape(rows, -1)
        elif isinstance(module, SHAPING):
            if diagonal is not None and not isinstance(module, nn.Flatten):
                return None  # a curved activation's term through a pooling: no longer diagonal (or not kept so)
            factors = [(_vjp(module, shaped, s), sign) for s, sign in factors]
        elif isinstance(module, nn.Linear):
            d = _diag(factors, diagonal, out.detach().reshape(rows, -1))
            if f"{i}.weight" in names:
                result[f"{i}.weight"] = torch.einsum("nj,nk->jk", d, a ** 2).reshape(-1)
            if f"{i}.bias" in names:
                result[f"{i}.bias"] = d.sum(0)
            if i == lowest:
                break
            w = module.weight.detach()
            factors = [(torch.einsum("oi,nor->nir", w, s), sign) for s, sign in factors]
            if diagonal is not None:  # Wᵀ diag(D) W = (Wᵀ diag(√|D|)) diag(sign D) (…)ᵀ
                factors.append((w.t().unsqueeze(0) * diagonal.abs().sqrt().unsqueeze(1), diagonal.sign()))
                diagonal = None
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
        if sum(s.numel() * s.element_size() for s, _ in factors) > budget_bytes:
            return None
    return {n: result[n].detach() for n in names}


def _cheaper(seen: Sequence[tuple[nn.Module, Tensor, Tensor]], rows: int, owner: Mapping[str, int], coords: int
             ) -> bool:
    """Whether the recursion down to the lowest wanted layer costs no more multiply-adds (estimated from the layers'
    shapes in this forward, ``rows`` rows of output) than ``coords`` HVPs per wanted tensor through its outputs:
    2 multiply-adds per row and product of each layer above it (and of its own, for a convolution's tensor, whose
    HVPs are in its own space), plus ``HVP_OVERHEAD``; both pay a forward and a backward from there."""
    macs = {i: out.numel() // rows * m.weight[0].numel() for i, (m, _, out) in enumerate(seen)
            if isinstance(m, (nn.Linear, nn.Conv2d))}  # multiply-adds per row of each layer's forward
    params = {n: p for i, (m, _, _) in enumerate(seen) for n, p in m.named_parameters(prefix=str(i))}
    own = {k for k in owner.values() if isinstance(seen[k][0], nn.Conv2d)}  # HVPs in the tensor's own space
    hvps = sum(min(coords, params[n].numel())
               * (2 * rows * sum(v for i, v in macs.items() if i > k or (i == k and k in own)) + HVP_OVERHEAD)
               for n, k in owner.items())
    width = seen[-1][2].shape[-1]
    cost = width * (HVP_OVERHEAD + rows * width) + rows * (EIGH_CUBIC * width ** 3 + EIGH_SQUARE * width ** 2)
    rank, curved, lowest = width, False, min(owner.values())
    for i in reversed(range(lowest, len(seen))):
        m, _, out = seen[i]
        if isinstance(m, nn.Conv2d):
            cost += rows * macs[i] * rank * (f"{i}.weight" in owner)
        elif isinstance(m, nn.Linear):
            cost += rows * (out.shape[-1] * rank + macs[i] * (f"{i}.weight" in owner))
        if i == lowest:
            break
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            cost += rows * macs[i] * rank
            rank += out.shape[-1] * curved
            curved = False
        else:
            curved = curved or not isinstance(m, (*LINEAR_PIECES, *SHAPING, nn.BatchNorm2d))
    return cost <= hvps


def _per_channel(out: Tensor, per_channel: list[tuple[Tensor, Tensor]], extra: Tensor | None,
                 u: Tensor | None = None) -> Tensor:
    """H of a per-channel tensor whose entry c moves channel c of the output ``out`` by u (ones for a bias, the
    normalised input for a BatchNorm weight): Σ_n Σ_r s_r (Σ_p S[(c,p),r] u_p)² + Σ_n Σ_p D[(c,p)] u_p², for factors
    (rows, channels, positions, rank) and the diagonal ``extra`` (rows, channels, positions)."""
    h = torch.zeros(out.shape[1], dtype=out.dtype, device=out.device)
    for s, sign in per_channel:
        h += ((s.sum(2) if u is None else torch.einsum("ncpr,ncp->ncr", s, u)) ** 2 * sign.unsqueeze(1)).sum((0, 2))
    if extra is not None:
        h += (extra if u is None else extra * u ** 2).sum((0, 2))
    return h


def _vjp(module: nn.Module, a: Tensor, s: Tensor) -> Tensor:
    """The factor columns ``s`` (rows, width of the output, rank) taken back through ``module`` at its input ``a``:
    (rows, width of the input, rank), one batched vector-Jacobian product (the module is linear in its input, or
    piecewise so)."""
    pre = a.detach().requires_grad_(True)
    out = module(pre)
    cols = s.permute(2, 0, 1).reshape(s.shape[-1], *out.shape)
    (back,) = torch.autograd.grad(out, pre, cols, is_grads_batched=True)
    return back.reshape(s.shape[-1], len(a), -1).permute(1, 2, 0)


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
