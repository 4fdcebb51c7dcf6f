"""Singular spectra of weight matrices: effective rank, low-rank flag, R_u and R_v (paper Sec. 6, App. A.5).

Weights only, no data. A weight is read as the matrix W ∈ R^{m×n} of the map y = W x, so m = out and
n = in (the ``nn.Linear`` layout). GPT-2's ``Conv1D`` stores (in, out) and is transposed; an N-D weight
(a convolution kernel, say) is reshaped to (shape[0], rest). Embedding tables are taken as stored
(rows = tokens), which is also the (out, in) of an output head tied to them.

With W = Σ_i σ_i u_i v_iᵀ (σ_1 ≥ σ_2 ≥ … ≥ 0) and k the rank kept:

- ũ = Σ_{i≤k} σ_i² u_i⊙u_i ∈ R^m, R_u = max ũ / median ũ (Sec. 6 (B)). ũ_j ≈ ‖W[j,:]‖², the quantity
  the 2-layer Hessian diagonal of App. G depends on, so R_u near 1 means uniform leading left vectors.
- ṽ = Σ_{i≤k} σ_i² v_i⊙v_i ∈ R^n, R_v = max ṽ / median ṽ (App. A.5), likewise for the right vectors.
- Medians of an even count are the mean of the two middle values (numpy's convention); a median of 0 makes
  the ratio ``inf`` (``null`` in JSON).
- ũ and ṽ are well defined when σ_k > σ_{k+1}; inside a block of equal singular values they depend on
  which basis the SVD returned.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError

OVERSAMPLE = 10
_TOLERANCE = 1e-12


def as_matrix(name: str, weight: Tensor, module: nn.Module | None) -> tuple[Tensor, str]:
    """The (out, in) matrix of a ≥2-D weight, and a note saying how it was read ("" when as stored).

    ``module`` is a model holding the parameter ``name`` (or the owning module itself, with ``name`` =
    ``"weight"``); the owner is found from the name. A ``transformers`` ``Conv1D`` weight is stored
    (in, out) and is transposed; an N-D weight is reshaped to (shape[0], Π shape[1:]).

    >>> w, note = as_matrix("0.weight", torch.zeros(4, 3, 2, 2), None)
    >>> tuple(w.shape), note
    ((4, 12), 'reshaped from (4, 3, 2, 2)')
    """
    if weight.ndim < 2:
        raise ValueError(f"{name} has shape {tuple(weight.shape)}: only weights with 2 or more dimensions are matrices")
    prefix, _, leaf = name.rpartition(".")
    if module is not None and leaf == "weight" and _is_conv1d(module.get_submodule(prefix)):
        return weight.mT, "transposed from Conv1D (in, out)"
    if weight.ndim > 2:
        return weight.reshape(weight.shape[0], -1), f"reshaped from {tuple(weight.shape)}"
    return weight, ""


def _is_conv1d(owner: nn.Module) -> bool:
    if type(owner).__name__ != "Conv1D":
        return False
    from transformers.pytorch_utils import Conv1D

    return isinstance(owner, Conv1D)


def effective_rank(singular_values: Tensor, energy: float, total: float) -> int | None:
    """The smallest k with Σ_{i≤k} σ_i² ≥ energy · total, or ``None`` when the values given do not reach it.

    ``total`` is Σ σ² over the whole spectrum (= ‖W‖_F²); a relative slack of 1e-12 absorbs rounding.

    >>> effective_rank(torch.tensor([3.0, 2.0, 1.0]), 0.9, 14.0)  # 9 < 12.6 ≤ 13
    2
    """
    cumulative = torch.cumsum(singular_values.double().square(), 0)
    reached = torch.nonzero(cumulative >= energy * total * (1 - _TOLERANCE))
    return int(reached[0]) + 1 if len(reached) else None


def _ratio_to_median(values: Tensor) -> float:
    """max / median (numpy's median); a median of 0 gives ``inf``."""
    a = values.cpu().numpy()
    median = float(np.median(a))
    return float("inf") if median == 0.0 else float(a.max()) / median


def _exact(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u, s, vh.mT


def _randomized(w: Tensor, q: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-q triplets by ``torch.svd_lowrank`` (4 power iterations), from a fixed seed: reports are reproducible."""
    with torch.random.fork_rng(devices=[w.device] if w.is_cuda else []):
        torch.manual_seed(0)
        return torch.svd_lowrank(w, q=q, niter=4)


def _triplets(w: Tensor, rank: int | None, energy: float, total: float,
              exact_max: int) -> tuple[Tensor, Tensor, Tensor, str]:
    """Exact SVD for small matrices; else randomized top k + 10, k = ``rank`` or grown (32, 64, …) until the top
    values hold ``energy`` of ‖W‖_F²; exact again when that would need half the spectrum or more."""
    p = min(w.shape)
    if p > exact_max:
        if rank is not None and rank + OVERSAMPLE < p:
            return *_randomized(w, rank + OVERSAMPLE), "randomized"
        q = 32
        while rank is None and q + OVERSAMPLE < p // 2:
            u, s, v = _randomized(w, q + OVERSAMPLE)
            if effective_rank(s[:q], energy, total) is not None:
                return u, s, v, "randomized"
            q *= 2
    return *_exact(w), "exact"


def spectrum_stats(matrix: Tensor, *, rank: int | None = None, energy: float = 0.9, top: int = 10,
                   exact_max: int = 4096) -> dict:
    """Singular-spectrum summary of one (out, in) matrix W ∈ R^{m×n}, computed in float64.

    - ``k``: ``rank`` if given (capped at min(m, n)), else the effective rank at ``energy``: the smallest k
      with Σ_{i≤k} σ_i² ≥ energy · ‖W‖_F².
    - ``energy_top_k`` = Σ_{i≤k} σ_i² / ‖W‖_F², the share of the energy the top k hold.
    - ``low_rank``: k ≤ ``threshold`` = max(1, ⌊0.1 · min(m, n)⌋), i.e. W is approximately rank k with
      k ≪ min(m, n) (Sec. 6 (A), Fig. 8).
    - ``r_u``, ``r_v``: max/median of ũ = Σ_{i≤k} σ_i² u_i⊙u_i and ṽ = Σ_{i≤k} σ_i² v_i⊙v_i (Sec. 6 (B), A.5).
    - ``stable_rank`` = ‖W‖_F² / σ_1²; ``top_singular_values``: σ_1 … σ_top.
    - ``method``: ``"exact"`` (``torch.linalg.svd``) when min(m, n) ≤ ``exact_max`` or when the whole spectrum
      is needed, else ``"randomized"`` (``torch.svd_lowrank``, q = k + 10, 4 power iterations, seeded);
      ‖W‖_F² is exact either way.

    Undefined values (a zero matrix) are ``inf`` or ``nan``.

    >>> u, v = torch.full((4, 1), 0.5), torch.full((3, 1), 3 ** -0.5)
    >>> s = spectrum_stats(2 * u @ v.T)
    >>> s["k"], s["low_rank"], round(s["r_u"], 12), round(s["r_v"], 12), round(s["stable_rank"], 12)
    (1, True, 1.0, 1.0, 1.0)
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(matrix.shape)}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if not 0 < energy <= 1:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    w = matrix.detach().to(torch.float64)
    m, n = w.shape
    p = min(m, n)
    total = float(w.square().sum())
    u, s, v, method = _triplets(w, rank, energy, total, exact_max)
    if method == "exact":
        total = float(torch.cumsum(s.square(), 0)[-1])
    k = min(rank, p) if rank is not None else effective_rank(s, energy, total)
    top_energy = s[:k].square()
    threshold = max(1, p // 10)
    s1 = float(s[0])
    return {
        "shape": [m, n],
        "method": method,
        "k": k,
        "energy_top_k": float(top_energy.sum()) / total if total > 0 else float("nan"),
        "threshold": threshold,
        "low_rank": k <= threshold,
        "r_u": _ratio_to_median(u[:, :k].square() @ top_energy),
        "r_v": _ratio_to_median(v[:, :k].square() @ top_energy),
        "stable_rank": total / s1 ** 2 if s1 > 0 else float("nan"),
        "top_singular_values": s[:top].tolist(),
    }


def model_spectra(model: nn.Module, names: Sequence[str], *, rank: int | None = None, energy: float = 0.9,
                  top: int = 10, exact_max: int = 4096,
                  on_layer: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """``spectrum_stats`` of each named ≥2-D parameter of ``model``, read as (out, in) by ``as_matrix``.

    Each entry holds the layer's ``name``, stored ``shape``, ``matrix_shape``, the ``note`` of ``as_matrix``
    and the statistics. ``on_layer(position, count, name)`` announces each layer. A weight holding NaN or inf
    is an ``InputError``.
    """
    params = dict(model.named_parameters())
    results = []
    for position, name in enumerate(names, 1):
        if on_layer:
            on_layer(position, len(names), name)
        weight = params[name]
        if not bool(torch.isfinite(weight).all()):
            raise InputError(f"the weight {name} holds non-finite values (NaN or inf): its spectrum is undefined")
        matrix, note = as_matrix(name, weight, model)
        stats = spectrum_stats(matrix, rank=rank, energy=energy, top=top, exact_max=exact_max)
        results.append({"name": name, "shape": list(weight.shape), "matrix_shape": stats.pop("shape"), "note": note,
                        **stats})
    return results
