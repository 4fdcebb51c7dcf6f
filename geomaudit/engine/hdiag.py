"""Exact Hessian diagonal entries of one parameter tensor by batched Hessian-vector products.

For the audit loss L = Σ_b w_b L_b over micro-batches b (w_b = the share of loss items in b, so L is
the mean over the whole batch), and a flat coordinate i of a parameter tensor θ,

    H_ii = e_iᵀ (∇²_θ L) e_i = Σ_b w_b e_iᵀ (∇²_θ L_b) e_i.

Per micro-batch the engine runs one forward and one ``create_graph`` backward with only θ requiring
grad, then reuses that graph for every coordinate: one double-backward ``grad(g_i, θ)`` per coordinate
(chunk 1, the CPU default: measured fastest there, ``benchmarks/bench_hdiag.py``), or one batched
double-backward per chunk of one-hot tangents (``torch.autograd.grad(..., is_grads_batched=True)``, vmapped).

Memory: a chunk's size is capped so that its intermediates stay within ``CHUNK_BUDGET_BYTES``, from the bytes
one tangent's double-backward allocates (counted on the layer's first coordinate); the Hessian columns kept for
``columns`` stay within ``COLUMN_BUDGET_BYTES``. Chunks halve on out-of-memory (CUDA's, and the CPU allocator's
failure); an op without a batching rule falls back to one tangent at a time.
"""

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import InputError, UsageError
from .outputs import OutputHVP, captured_uses, uses_in_loss

LossFn = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]

# measured on a 2-core CPU (benchmarks/bench_hdiag.py): batched chunks of 2-8 are 10-45% slower per coordinate than
# one double-backward per coordinate on every layer; on CUDA 64 (not measured: no GPU was lent)
DEFAULT_CHUNK = {"cpu": 1, "cuda": 64}
CHUNK_BUDGET_BYTES = {"cpu": 1 << 30, "cuda": 4 << 30}  # what one chunk's double-backward may allocate
COLUMN_BUDGET_BYTES = 2 << 30  # the Hessian columns and H[S, S] that ``columns`` holds (and backprop's factors)
# one Hessian-vector product per coordinate in the parameter's space, or in the outputs of the modules that use it
# linearly (outputs.OutputHVP); the exact Hessian backpropagation of backprop.exact_diagonals
METHODS = ("hvp", "hvp-output", "hessian-backprop")


@dataclass(frozen=True)
class MicroBatch:
    """Tensors for one call of the loss, and their share ``weight`` of the audit loss."""

    tensors: Mapping[str, Tensor]
    weight: float


@contextmanager
def only_requires_grad(model: nn.Module, *params: nn.Parameter):
    """Differentiate the audited tensors alone: every other parameter is frozen for the duration."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class DiagonalEngine:
    """Computes H_ii for chosen coordinates of any parameter of ``model``.

    ``chunk_size`` is the number of tangents per batched HVP (1: one double-backward per coordinate, no vmap);
    ``None`` picks the device's default (``DEFAULT_CHUNK``). A chunk above 1 is capped per layer so that its
    double-backward allocates at most ``CHUNK_BUDGET_BYTES``, as counted on the layer's first coordinate. A chunk
    halved on out-of-memory stays halved for later layers, unless the layer's own cost had capped it.
    ``layers`` names the tensors the caller will ask for (``None``: any): the exact Hessian backpropagation, where the
    model allows it, computes those alone and stops below the lowest of them.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, micro_batches: Sequence[MicroBatch],
                 chunk_size: int | None = None, backprop: bool = True, layers: Sequence[str] | None = None):
        self.model, self.loss_fn, self.micro_batches = model, loss_fn, list(micro_batches)
        self.chunk_size, self.layers = chunk_size, layers
        self.batched = True
        self.chunks: dict[str, int] = {}  # the chunk each layer ran with
        self.methods: dict[str, str] = {}  # how each layer's H_ii were computed: METHODS
        self._exact: dict[str, Tensor] | None = None if backprop else {}

    def diagonal(self, name: str, indices: Sequence[int] | Tensor,
                 on_chunk: Callable[[int], None] | None = None) -> Tensor:
        """H_ii for the flat ``indices`` of parameter ``name``, in the parameter's dtype.

        From the exact Hessian backpropagation of ``backprop.exact_diagonals`` (the whole diagonal of every tensor in
        ``layers`` at once, on the first call) when ``backprop`` is on, the model allows it and it costs less than
        HVPs for as many coordinates of each tensor as this first call asks for; else from HVPs.
        ``on_chunk(n)`` is called after each chunk of ``n`` coordinates of each micro-batch.
        """
        if self._exact is None:
            from .backprop import exact_diagonals

            names = [n for n, _ in self.model.named_parameters()] if self.layers is None else self.layers
            self._exact = exact_diagonals(self.model, self.loss_fn, self.micro_batches, COLUMN_BUDGET_BYTES,
                                          names, coords=len(indices)) or {}
        if name in self._exact:
            self.methods[name] = "hessian-backprop"
            values = self._exact[name]
            if on_chunk:
                on_chunk(len(indices) * len(self.micro_batches))
            return values[torch.as_tensor(indices, dtype=torch.long, device=values.device)]
        return self._accumulate(name, indices, on_chunk, keep_columns=False).diag

    def columns(self, name: str, indices: Sequence[int] | Tensor, on_chunk: Callable[[int], None] | None = None,
                across: Sequence[str] = ()) -> "HessianColumns":
        """H_ii, the principal submatrix H[S, S] and the squared norms ‖H e_i‖² for the coordinates S.

        The columns come from the same HVPs as the diagonal, taken over the layer and the tensors named in
        ``across`` together: ``sq_norms`` covers the layer's own rows, ``sq_norms_across`` all of them. H[S, S],
        and with several micro-batches the summed columns (``len(S) ×`` their length), must fit in
        ``COLUMN_BUDGET_BYTES`` (a usage error otherwise).
        """
        return self._accumulate(name, indices, on_chunk, keep_columns=True, across=across)

    def abs_spectrum(self, name: str, probes: int = 8, steps: int = 40, seed: int = 0) -> dict[str, float]:
        """Max and median |eigenvalue| of the layer's Hessian block by stochastic Lanczos quadrature (``slq``).

        Each matvec is Σ_b w_b H_b v, so every micro-batch's graph is held at once.
        """
        from .slq import slq_abs_stats

        param = dict(self.model.named_parameters())[name]
        with only_requires_grad(self.model, param):
            grads = []
            for mb in self.micro_batches:
                loss = self.loss_fn(self.model, mb.tensors)
                grad = torch.autograd.grad(loss, param, create_graph=True)[0] if loss.requires_grad else None
                if grad is not None and grad.requires_grad:
                    grads.append((mb.weight, grad.reshape(-1)))

            def matvec(v: Tensor) -> Tensor:
                out = torch.zeros_like(v)
                for weight, grad in grads:
                    out += weight * torch.autograd.grad(grad, param, v, retain_graph=True)[0].reshape(-1)
                return out

            return slq_abs_stats(matvec, param.numel(), probes=probes, steps=steps, seed=seed, dtype=param.dtype,
                                 device=param.device)

    def _accumulate(self, name: str, indices: Sequence[int] | Tensor, on_chunk: Callable[[int], None] | None,
                    keep_columns: bool, across: Sequence[str] = (), rows: range | None = None) -> "HessianColumns":
        """The Hessian columns at ``indices``; with ``rows`` (positions into ``indices``) only those, the other
        rows left at exact zeros (a rank's piece of a distributed layer)."""
        named = dict(self.model.named_parameters())
        param = named[name]
        wrt = [param] + [named[n] for n in across if n != name]  # the layer first: its rows lead every column
        length = sum(p.numel() for p in wrt)
        idx = torch.as_tensor(indices, dtype=torch.long, device=param.device)
        zeros = partial(torch.zeros, dtype=param.dtype, device=param.device)
        diag, sq_norms, sq_across = zeros(len(idx)), zeros(len(idx)), zeros(len(idx))
        block = summed = None
        if keep_columns:
            held = len(idx) ** 2 + (len(idx) * length if len(self.micro_batches) > 1 else 0)
            if held * param.element_size() > COLUMN_BUDGET_BYTES:
                raise UsageError(f"the Hessian columns of {name} need {held * param.element_size() / 2**30:.1f} GiB "
                                 f"(over {COLUMN_BUDGET_BYTES / 2**30:g} GiB): use fewer --coords, one micro-batch, "
                                 "or fewer --layers")
            block = zeros(len(idx), len(idx))
            summed = zeros(len(idx), length) if len(self.micro_batches) > 1 else None
        if self.chunk_size is None:
            self.chunk_size = DEFAULT_CHUNK["cuda" if param.device.type == "cuda" else "cpu"]
        chunk = None  # set from the layer's first coordinate
        rows = range(len(idx)) if rows is None else rows
        through_outputs = not keep_columns and self.chunk_size == 1  # where outputs.OutputHVP applies, it is used
        ran = set()
        with only_requires_grad(self.model, *wrt), refusing_without_second_derivative():
            for mb in self.micro_batches if len(rows) else ():
                with captured_uses(self.model, param) if through_outputs else nullcontext() as calls:
                    loss = self.loss_fn(self.model, mb.tensors)
                uses = uses_in_loss(loss, param, calls) if loss.requires_grad else None
                ran.add("hvp" if uses is None else "hvp-output")
                if uses is not None:
                    hvp, coords, entries = OutputHVP(loss, uses), idx.tolist(), []
                    for at in rows:
                        entries.append(hvp.entry(coords[at]))
                        if on_chunk:
                            on_chunk(1)
                    diag[rows.start:rows.stop] += mb.weight * torch.stack(entries)
                    del hvp, loss, entries
                    continue
                grad = torch.autograd.grad(loss, param, create_graph=True)[0] if loss.requires_grad else None
                if grad is None or not grad.requires_grad:  # L_b ignores θ or is linear in it: H = 0
                    if on_chunk:
                        on_chunk(len(rows))
                    continue
                flat = grad.reshape(-1)
                start = rows.start
                while start < rows.stop:
                    sel = idx[start:min(rows.stop, start + (chunk or 1))]
                    at = slice(start, start + len(sel))
                    try:
                        if chunk is None:
                            cols, chunk = self._first_column(flat, wrt if keep_columns else [param], sel)
                        else:
                            cols = self._columns_at(flat, wrt if keep_columns else [param], sel)
                    except RuntimeError as err:
                        if not out_of_memory(err) or chunk in (None, 1):
                            raise
                        if chunk == self.chunk_size:  # not a cap for this layer's cost alone: keep it for later layers
                            self.chunk_size = chunk // 2
                        chunk //= 2
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        continue
                    w = mb.weight
                    diag[at] += w * cols[torch.arange(len(sel)), sel]
                    if keep_columns:
                        block[at] += w * cols[:, idx]
                        if summed is None:  # one micro-batch: its columns are the layer's
                            sq_norms[at] += w ** 2 * (cols[:, :param.numel()] ** 2).sum(1)
                            sq_across[at] += w ** 2 * (cols ** 2).sum(1)
                        else:
                            summed[at] += w * cols
                    del cols
                    start += len(sel)
                    if on_chunk:
                        on_chunk(len(sel))
                del grad, flat, loss
        self.chunks[name] = chunk or 1
        self.methods[name] = "hvp-output" if ran == {"hvp-output"} else "hvp"
        if summed is not None:
            sq_norms, sq_across = (summed[:, :param.numel()] ** 2).sum(1), (summed ** 2).sum(1)
        if block is None:
            block = zeros(0, 0)
        return HessianColumns(diag, block, sq_norms, sq_across)

    def _first_column(self, flat_grad: Tensor, params: Sequence[Tensor], sel: Tensor) -> tuple[Tensor, int]:
        """The first coordinate's column, and the chunk the layer can afford: ``chunk_size`` capped by what that
        column's double-backward allocated (counted by ``AllocationCounter``), so a chunk stays in budget."""
        if self.chunk_size == 1:
            return self._columns_at(flat_grad, params, sel), 1
        with AllocationCounter() as counter:
            cols = self._columns_at(flat_grad, params, sel)
        budget = CHUNK_BUDGET_BYTES["cuda" if flat_grad.device.type == "cuda" else "cpu"]
        return cols, max(1, min(self.chunk_size, budget // max(1, counter.bytes)))

    def _columns_at(self, flat_grad: Tensor, params: Sequence[Tensor], sel: Tensor) -> Tensor:
        """The Hessian columns H e_i, i in ``sel``, over ``params`` (concatenated) as rows: one double-backward
        per coordinate through the retained graph for a single one (or without vmap), else one batched one."""
        if self.batched and len(sel) > 1:
            tangents = torch.zeros(len(sel), flat_grad.numel(), dtype=flat_grad.dtype, device=flat_grad.device)
            tangents[torch.arange(len(sel), device=sel.device), sel] = 1
            try:
                cols = torch.autograd.grad(flat_grad, params, grad_outputs=tangents, retain_graph=True,
                                           is_grads_batched=True, allow_unused=True)
                pieces = [_zeros_if_none(c, len(sel), p).reshape(len(sel), -1) for c, p in zip(cols, params)]
                return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)  # one tensor: no copy
            except RuntimeError as err:
                if out_of_memory(err):
                    raise
                warnings.warn(f"batched HVPs failed ({str(err).splitlines()[0]}); "
                              "falling back to one HVP per coordinate", RuntimeWarning, stacklevel=2)
                self.batched = False
        rows = []
        for i in sel:  # a 0-d tensor: flat_grad[i] is an index op (measured 4x faster than a select on the embedding)
            cols = torch.autograd.grad(flat_grad[i], params, retain_graph=True, allow_unused=True)
            pieces = [_zeros_if_none(c, None, p).reshape(-1) for c, p in zip(cols, params)]
            rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces))  # one tensor: no copy
        return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)


@contextmanager
def refusing_without_second_derivative():
    """An operator PyTorch cannot differentiate twice (the SDPA kernels behind ``nn.MultiheadAttention`` with
    ``need_weights=False`` or ``F.scaled_dot_product_attention``) is the model's limit, not a bug: one sentence, exit 3,
    whichever double-backward under this met it (in the tensor's space or through a layer's output)."""
    try:
        yield
    except RuntimeError as err:
        found = re.search(r"derivative for (\S+) is not implemented", str(err))
        if not found:
            raise
        raise InputError(f"the model runs {found.group(1)}, which PyTorch cannot differentiate twice, so its Hessian "
                         "cannot be computed: use the plain (math) attention path (transformers models are loaded "
                         "with eager attention; nn.MultiheadAttention needs need_weights=True)") from None


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: CUDA's ``OutOfMemoryError`` or the CPU allocator's RuntimeError."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


class AllocationCounter(TorchDispatchMode):
    """Counts the bytes of every tensor the operators under it return: an upper bound of the memory they need."""

    def __enter__(self):
        self.bytes = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, Tensor))
        return out


@dataclass(frozen=True)
class HessianColumns:
    """What the statistics need of the Hessian columns H e_i at the sampled coordinates S of one layer."""

    diag: Tensor      # H_ii, i in S
    block: Tensor     # H[S, S]: row r is column i_r restricted to S
    sq_norms: Tensor  # ‖H e_i‖² over the whole layer (zeros unless columns were kept)
    sq_norms_across: Tensor  # ‖H e_i‖² over the layer and the ``across`` tensors together


def _zeros_if_none(cols: Tensor | None, batch: int | None, param: Tensor) -> Tensor:
    if cols is not None:
        return cols
    shape = param.shape if batch is None else (batch, *param.shape)
    return torch.zeros(shape, dtype=param.dtype, device=param.device)
