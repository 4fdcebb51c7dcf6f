"""Statistics of a sampled Hessian diagonal (SPEC §1; paper eq. (1), footnote 8, Figure 1).

Medians follow numpy's convention: for an even count, the mean of the two middle values.
A ratio whose denominator is 0 is ``inf`` (``null`` in JSON); 0/0 is ``nan`` (also ``null``).
"""

import numpy as np

from .interval import r_med_interval, stabilised


def ratio(num: float, den: float) -> float:
    """num / den, with inf for x / 0 and nan for 0 / 0."""
    if den == 0.0:
        return float("nan") if num == 0.0 else float("inf")
    return num / den


SATURATION = 1000.0  # R_med at which R_med_stab = R / (1 + R/1000) has lost half its sensitivity to R_med


def diagonal_stats(h_diag: np.ndarray, topk: int = 10, *, zero_hessian: bool = False,
                   median_zero: bool = False, full: bool = False) -> dict[str, float]:
    """R_med, R_med_stab, R_topk, zero_frac and the max/median/mean of |H_ii|.

    - ``r_med`` = max|H_ii| / median|H_ii| (eq. (1));
    - ``r_med_stab`` = max / (median + 0.001·max) (footnote 8, used for the paper's tables);
    - ``r_topk`` = k-th largest |H_ii| / median, with k = min(topk, number of coordinates);
    - ``zero_frac`` = share of |H_ii| exactly 0.

    - ``r_med_ci_low``/``r_med_ci_high``: the 95% interval of ``engine.interval`` for R_med at this number of
      coordinates (the point R_med when ``full``: every entry of the layer was sampled), and
      ``r_med_stab_ci_low``/``_high`` its image under R ↦ R/(1 + R/1000).

    ``zero_hessian`` (the values are round-off, ``engine.roundoff``) makes every ratio undefined (nan);
    ``median_zero`` (the median is round-off) computes them with a median of 0, as an exact zero median would,
    and leaves the interval undefined.

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
    den = 0.0 if median_zero else med
    nan = float("nan")
    low, high = (nan, nan) if zero_hessian or median_zero else r_med_interval(a, full)
    return {
        "r_med": nan if zero_hessian else ratio(mx, den),
        "r_med_stab": nan if zero_hessian else ratio(mx, den + 1e-3 * mx),
        "r_topk": nan if zero_hessian else ratio(kth, den),
        "topk": k,
        "zero_frac": float(np.mean(a == 0.0)),
        "max_abs": mx,
        "median_abs": med,
        "mean_abs": float(a.mean()),
        "r_med_ci_low": low,
        "r_med_ci_high": high,
        "r_med_stab_ci_low": stabilised(low),
        "r_med_stab_ci_high": stabilised(high),
    }


def saturated(stats: dict) -> bool:
    """R_med_stab is saturated when R_med ≥ 1000 (R_med_stab ≥ 500): R_med_stab = R/(1 + R/1000) < 1000 always,
    and from there on a tenfold R_med moves it by less than twofold, so its ratios understate real differences."""
    r = stats.get("r_med")
    return r is not None and not np.isnan(r) and r >= SATURATION


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
    r = r_diag_values(diag, sq_norms)
    return {
        "s_med": ratio(float(eig.max()), float(np.median(eig))),
        "eig_max_abs": float(eig.max()),
        "eig_median_abs": float(np.median(eig)),
        "r_diag_mean": float(r.mean()) if r.size else float("nan"),
        "r_diag_median": float(np.median(r)) if r.size else float("nan"),
    }


def r_diag_values(diag: np.ndarray, sq_norms: np.ndarray) -> np.ndarray:
    """r_diag,i = sqrt(‖H e_i‖² − H_ii²) / |H_ii| for the i whose column is not all zero (App. F)."""
    d, sq = np.abs(np.asarray(diag, dtype=np.float64)), np.asarray(sq_norms, dtype=np.float64)
    keep = sq > 0
    off = np.sqrt(np.clip(sq[keep] - d[keep] ** 2, 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d[keep] > 0, off / d[keep], np.inf)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's on the ranks (ties get their average rank); nan if a side is constant.

    >>> spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0]))
    0.5
    """
    def ranks(x: np.ndarray) -> np.ndarray:  # 0-based; tied values share the mean of their positions
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        starts = np.cumsum(counts) - counts
        return (starts + (counts - 1) / 2)[inverse]

    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def alignment_stats(h_diag: np.ndarray, grad: np.ndarray, step: np.ndarray) -> dict:
    """How |g_i| and Adam's |g_adapt,i| line up with |H_ii| (App. A.6, Figs. 10–12).

    ``spearman_grad`` and ``spearman_step`` are the rank correlations of |g| and |g_adapt| with |H_ii|; the
    ``curves`` hold the three magnitudes with the coordinates sorted by |H_ii| ascending, as the figures plot them.
    """
    h, g, s = (np.abs(np.asarray(x, dtype=np.float64)) for x in (h_diag, grad, step))
    order = np.argsort(h, kind="stable")
    return {"spearman_grad": spearman(g, h), "spearman_step": spearman(s, h),
            "curves": {"h_abs": h[order].tolist(), "grad_abs": g[order].tolist(), "step_abs": s[order].tolist()}}
