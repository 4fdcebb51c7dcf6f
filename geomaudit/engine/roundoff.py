"""Which sampled Hessian diagonals are zero to round-off, found by computing them again with other arithmetic.

Some Hessians are exactly 0 in exact arithmetic: attention key biases (softmax ignores a shift common to a row of
scores), or the key block of GPT-2's fused ``c_attn.bias``. Computed in floating point they come out as round-off,
e.g. |H_ii| ≈ 1e-15 in fp32, and max/median of round-off is a meaningless R_med that changes with micro-batching
and precision.

A threshold on |H_ii| cannot tell them apart from real but small curvature: floating point is scale-free, so an
entry 1e-10 below the other layers' is computed as accurately as they are when nothing cancels in its computation
(tiny BERT: the real query weights' largest |H_ii| is 4e-8 of the largest layer's, below fp32's epsilon of 1.2e-7),
while round-off is small only relative to the terms that cancelled. What separates them is that a real entry does
not depend on the arithmetic it was computed with, and round-off does. So a few entries of every layer are computed
again in the other precision (fp64 for an fp32 or tf32 audit, fp32 for an fp64 audit) and with the loss multiplied
by 1/3 (not a power of two, so every product rounds differently, also in modules that transformers runs in
float32 whatever the model's dtype, such as the softmax of Llama, OPT or ViT). Measured on tiny BERT, GPT-2, OPT
and Llama in fp32 and fp64, with and without micro-batches: real entries moved by at most 1.5e-5 (relative), the
entries of structurally zero layers by 0.7 to 2. An entry that moves by more than ``TOLERANCE`` (1%) is round-off.

- ``zero_hessian``: one of the layer's three largest |H_ii| is round-off (so all of them are), or every H_ii is
  exactly 0; the layer's ratios are undefined.
- ``median_zero``: the entry at the upper median is round-off, so the true median is 0 to round-off and R_med is
  undefined (infinite), as with an exact zero median.
"""

import copy
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from .hdiag import LossFn, MicroBatch, only_requires_grad

TOLERANCE = 1e-2
LOSS_SCALE = 1 / 3
TOP = 3


def check_positions(h: np.ndarray) -> np.ndarray:
    """Positions in ``h`` to recompute: the (up to) three largest |H_ii| first, then the upper median.

    >>> check_positions(np.array([5.0, -1.0, 0.5, 3.0, 2.0])).tolist()
    [0, 3, 4]
    >>> check_positions(np.array([0.0, 0.0, 1e-15, 2.0, 0.0, 1.0, 0.0, 0.0])).tolist()
    [3, 5, 2, 7]
    """
    order = np.argsort(np.abs(h), kind="stable")
    top = order[::-1][:TOP]
    middle = order[len(h) // 2]
    return top if middle in top else np.append(top, middle)


def other_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a layer is recomputed in: fp32 for an fp64 audit, fp64 otherwise."""
    return torch.float32 if dtype == torch.float64 else torch.float64


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def recompute(model: nn.Module, loss_fn: LossFn, micro_batches: Sequence[MicroBatch],
              wanted: Mapping[str, np.ndarray], on_chunk: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """H_ii at ``wanted[name]`` (flat indices) of each named parameter, in the other precision with the loss × 1/3.

    The model is copied (and cast) once; per micro-batch, one forward and one ``create_graph`` backward serve every
    layer, then each layer's few one-hot tangents go through one batched double backward. ``on_chunk(n)`` follows
    each layer of each micro-batch with its number of entries.
    """
    if not wanted:
        return {}
    dtype = other_dtype(model_dtype(model))
    twin = copy.deepcopy(model).to(dtype)
    named = dict(twin.named_parameters())
    params = [named[n] for n in wanted]
    out = {n: np.zeros(len(idx)) for n, idx in wanted.items()}
    with _no_tf32(), only_requires_grad(twin, *params):
        for mb in micro_batches:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in mb.tensors.items()}
            loss = LOSS_SCALE * loss_fn(twin, tensors)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True) \
                if loss.requires_grad else [None] * len(params)
            for (name, idx), param, grad in zip(wanted.items(), params, grads):
                if grad is not None and grad.requires_grad:  # otherwise H = 0 on this micro-batch
                    out[name] += mb.weight * _diagonal_at(grad.reshape(-1), param, idx) / LOSS_SCALE
                if on_chunk:
                    on_chunk(len(idx))
            del loss, grads
    return out


def _diagonal_at(flat_grad: torch.Tensor, param: torch.Tensor, idx: np.ndarray) -> np.ndarray:
    """(H e_i)_i for the flat indices ``idx``: one batched double backward, or one per entry where vmap fails."""
    at = torch.as_tensor(idx, dtype=torch.long, device=param.device)
    rows = torch.arange(len(at), device=param.device)
    tangents = torch.zeros(len(at), flat_grad.numel(), dtype=flat_grad.dtype, device=flat_grad.device)
    tangents[rows, at] = 1
    try:
        cols = torch.autograd.grad(flat_grad, param, grad_outputs=tangents, retain_graph=True,
                                   is_grads_batched=True, allow_unused=True)[0]
        values = torch.zeros(len(at), dtype=param.dtype) if cols is None else cols.reshape(len(at), -1)[rows, at]
    except RuntimeError as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        values = torch.stack([_entry(flat_grad, param, int(i)) for i in at])
    return values.detach().double().cpu().numpy()


def _entry(flat_grad: torch.Tensor, param: torch.Tensor, i: int) -> torch.Tensor:
    col = torch.autograd.grad(flat_grad[i], param, retain_graph=True, allow_unused=True)[0]
    return torch.zeros((), dtype=param.dtype, device=param.device) if col is None else col.reshape(-1)[i]


@contextmanager
def _no_tf32():
    """TF32 off while recomputing: in a tf32 audit the recomputation must not share its rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a − b| / max(|a|, |b|), 0 where both are 0: how much an entry moved when recomputed (between 0 and 2)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.maximum(np.abs(a), np.abs(b))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, np.abs(a - b) / scale, 0.0)


def verdict(h: np.ndarray, positions: np.ndarray, again: np.ndarray) -> dict:
    """``zero_hessian`` and ``median_zero`` from the audited ``h`` and its recomputation ``again`` at ``positions``
    (as ``check_positions`` orders them), with the relative ``changes``."""
    changes = relative_change(h[positions], again)
    top = min(TOP, len(h))
    zero = bool((changes[:top] > TOLERANCE).any())
    middle = np.argsort(np.abs(h), kind="stable")[len(h) // 2]
    at = int(np.flatnonzero(positions == middle)[0])
    return {"zero_hessian": zero, "median_zero": zero or bool(changes[at] > TOLERANCE), "changes": changes}
