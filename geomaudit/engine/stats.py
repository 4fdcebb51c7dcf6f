"""Statistics of a sampled Hessian diagonal (SPEC §1; paper eq. (1), footnote 8, Figure 1).

Medians follow numpy's convention: for an even count, the mean of the two middle values.
A ratio whose denominator is 0 is ``inf`` (``null`` in JSON); 0/0 is ``nan`` (also ``null``).
"""

import numpy as np


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return float("nan") if num == 0.0 else float("inf")
    return num / den


def diagonal_stats(h_diag: np.ndarray, topk: int = 10) -> dict[str, float]:
    """R_med, R_med_stab, R_topk, zero_frac and the max/median/mean of |H_ii|.

    - ``r_med`` = max|H_ii| / median|H_ii| (eq. (1));
    - ``r_med_stab`` = max / (median + 0.001·max) (footnote 8, used for the paper's tables);
    - ``r_topk`` = k-th largest |H_ii| / median, with k = min(topk, number of coordinates);
    - ``zero_frac`` = share of |H_ii| exactly 0.

    >>> s = diagonal_stats(np.array([1.0, -2.0, 4.0, 0.0]), topk=2)
    >>> s["r_med"], s["r_topk"], s["zero_frac"]
    (2.6666666666666665, 1.3333333333333333, 0.25)
    """
    a = np.abs(np.asarray(h_diag, dtype=np.float64))
    if a.size == 0:
        raise ValueError("no coordinates to summarise")
    mx, med = float(a.max()), float(np.median(a))
    k = min(topk, a.size)
    kth = float(np.partition(a, a.size - k)[a.size - k])
    return {
        "r_med": _ratio(mx, med),
        "r_med_stab": _ratio(mx, med + 1e-3 * mx),
        "r_topk": _ratio(kth, med),
        "topk": k,
        "zero_frac": float(np.mean(a == 0.0)),
        "max_abs": mx,
        "median_abs": med,
        "mean_abs": float(a.mean()),
    }


GEOMETRY_KEYS = ("s_med", "eig_max_abs", "eig_median_abs", "r_diag_mean", "r_diag_median")


def geometry_stats(block: np.ndarray, diag: np.ndarray, sq_norms: np.ndarray) -> dict[str, float]:
    """S_med of a Hessian block (App. A.9) and r_diag of sampled columns (App. F).

    - ``s_med`` = max |λ| / median |λ| over the eigenvalues λ of the symmetric ``block`` (singular values of a
      symmetric matrix are |λ|; the paper's "max/max" is a typo for max/median), with ``eig_max_abs`` and
      ``eig_median_abs``;
    - r_diag,i = sqrt(‖H e_i‖² − H_ii²) / |H_ii| for each sampled i, from the squared column norms
      ``sq_norms``; ``r_diag_mean`` and ``r_diag_median`` over the i whose column is not all zero (a zero
      column has nothing to dominate); H_ii = 0 under a non-zero column gives inf.

    >>> s = geometry_stats(np.diag([4.0, 1.0, 1.0]), np.array([4.0, 1.0]), np.array([16.0, 2.0]))
    >>> s["s_med"], s["r_diag_mean"]
    (4.0, 0.5)
    """
    sym = (np.asarray(block, dtype=np.float64) + np.asarray(block, dtype=np.float64).T) / 2
    eig = np.abs(np.linalg.eigvalsh(sym))
    d, sq = np.abs(np.asarray(diag, dtype=np.float64)), np.asarray(sq_norms, dtype=np.float64)
    keep = sq > 0
    off = np.sqrt(np.clip(sq[keep] - d[keep] ** 2, 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(d[keep] > 0, off / d[keep], np.inf)
    return {
        "s_med": _ratio(float(eig.max()), float(np.median(eig))),
        "eig_max_abs": float(eig.max()),
        "eig_median_abs": float(np.median(eig)),
        "r_diag_mean": float(r.mean()) if r.size else float("nan"),
        "r_diag_median": float(np.median(r)) if r.size else float("nan"),
    }
