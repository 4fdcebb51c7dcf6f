"""Stochastic Lanczos quadrature (SLQ): max and median |eigenvalue| of a symmetric operator from matvecs alone.

For a probe v (Rademacher, normalised), m Lanczos steps give a tridiagonal T_m whose eigenpairs (θ_k, u_k) are the
nodes and weights (u_k[0]²) of a Gaussian quadrature of the spectral measure vᵀ δ(H − λ) v: averaged over probes,
an estimate of the eigenvalue density (Golub & Meurant; Ghorbani, Krishnan & Xiao 2019). The median of |λ| is the
weighted median of the pooled |θ_k|; the largest |λ| is the largest |θ_k|, where Lanczos converges first.
"""

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


def lanczos(matvec: Callable[[Tensor], Tensor], v0: Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values and quadrature weights of ``steps`` Lanczos steps from ``v0`` (full reorthogonalisation)."""
    q = v0 / v0.norm()
    basis, alpha, beta = [q], [], []
    for _ in range(steps):
        w = matvec(q)
        if beta:
            w = w - beta[-1] * basis[-2]
        alpha.append(float(w @ q))
        for b in basis:  # full reorthogonalisation: keeps the Ritz values from repeating
            w = w - (w @ b) * b
        norm = float(w.norm())
        if len(alpha) == steps or norm <= 1e-10 * max(abs(a) for a in alpha) or len(basis) == v0.numel():
            break
        beta.append(norm)
        q = w / norm
        basis.append(q)
    t = np.diag(alpha) + np.diag(beta[:len(alpha) - 1], 1) + np.diag(beta[:len(alpha) - 1], -1)
    theta, vectors = np.linalg.eigh(t)
    return theta, vectors[0] ** 2


def slq_abs_stats(matvec: Callable[[Tensor], Tensor], dim: int, *, probes: int = 8, steps: int = 40, seed: int = 0,
                  dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> dict[str, float]:
    """``{"max_abs", "median_abs"}`` of the eigenvalues of the symmetric operator ``matvec`` on R^dim.

    >>> h = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> s = slq_abs_stats(lambda v: h @ v, 100, probes=16, steps=30)
    >>> round(s["max_abs"], 2), abs(s["median_abs"] - 50.5) < 5
    (100.0, True)
    """
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(probes):
        v = (torch.randint(0, 2, (dim,), generator=gen) * 2 - 1).to(device=device, dtype=dtype)
        theta, w = lanczos(matvec, v, min(steps, dim))
        nodes.append(np.abs(theta))
        weights.append(w / probes)
    nodes, weights = np.concatenate(nodes), np.concatenate(weights)
    order = np.argsort(nodes)
    cdf = np.cumsum(weights[order]) / weights.sum()
    return {"max_abs": float(nodes.max()), "median_abs": float(nodes[order][np.searchsorted(cdf, 0.5)])}
