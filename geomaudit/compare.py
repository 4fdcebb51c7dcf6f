"""Pair the checkpoints of two sets of runs and compare a per-layer metric (SPEC §4; paper Sec. 4, A.3).

A run is one training trajectory, a list of :class:`Point` (one per audited checkpoint). Side A and side B
each hold one run per seed. Pairing is by equal step (the paper's Tables 1-2) or by equal training loss
(Table 7: Adam at step t against SGD+M at the step t' with the same loss, which rules out "Adam merely got
further"). Each layer then gets mean (std) over seeds per side and the ratio of the means; with *paired* runs
(the paper's repeats: run i of A and run i of B share the initialisation and the batch order), also the mean
(std) of the per-repeat ratios, as the paper's tables print them.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class Point:
    """One audited checkpoint: its run (path), step, training loss and the metric per layer."""

    run: str
    step: int | None
    loss: float
    values: Mapping[str, float]  # may hold inf or nan: an undefined ratio
    excluded: Mapping[str, str] = field(default_factory=dict)  # layer -> why it cannot be compared (zero Hessian)
    saturated: frozenset[str] = frozenset()  # layers whose metric saturates: their rows use ``fallback``
    fallback: Mapping[str, float] = field(default_factory=dict)  # the unsaturated statistic (R_med) per layer
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # per-layer interval of the metric
    fallback_bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # ... and of the fallback


@dataclass(frozen=True)
class Pairing:
    """One point per run of each side (same order as the runs), matched at a step or a loss level."""

    mode: str  # "step" or "loss"
    step: int | None
    level: float | None
    a: tuple[Point, ...]
    b: tuple[Point, ...]
    refused: str | None  # why this pairing is not compared; None when it is

    @property
    def label(self) -> str:
        return f"step {self.step}" if self.mode == "step" else f"loss {self.level:.3f}"


def _check(runs_a: Sequence[Sequence[Point]], runs_b: Sequence[Sequence[Point]], losses: bool = False) -> None:
    for side, runs in (("A", runs_a), ("B", runs_b)):
        if not runs or not all(runs):
            raise ValueError(f"side {side} needs at least one run with at least one checkpoint")
        bad = [p for run in runs for p in run if math.isnan(p.loss)] if losses else []
        if bad:
            raise ValueError(f"cannot pair by loss: {bad[0].run} has no loss (nan) at step {bad[0].step}")


def pair_by_step(runs_a: Sequence[Sequence[Point]], runs_b: Sequence[Sequence[Point]]) -> list[Pairing]:
    """One pairing per step present in every run of both sides, ascending."""
    _check(runs_a, runs_b)
    runs = [*runs_a, *runs_b]
    common = set.intersection(*({p.step for p in run if p.step is not None} for run in runs))
    if not common:
        raise ValueError("the runs share no step; pair them by training loss instead")

    def at(run: Sequence[Point], step: int) -> Point:
        return next(p for p in run if p.step == step)

    return [Pairing("step", s, None, tuple(at(r, s) for r in runs_a), tuple(at(r, s) for r in runs_b), None)
            for s in sorted(common)]


def auto_levels(runs_a: Sequence[Sequence[Point]], runs_b: Sequence[Sequence[Point]], n: int = 3) -> list[float]:
    """``n`` loss levels evenly spaced over the range every run covers, from high to low (as training goes).

    >>> run = lambda *losses: [Point("r", i, x, {}) for i, x in enumerate(losses)]
    >>> auto_levels([run(3.0, 2.0, 1.0)], [run(2.5, 1.5)])
    [2.5, 2.0, 1.5]
    """
    _check(runs_a, runs_b, losses=True)
    if n < 1:
        raise ValueError(f"need at least one loss level, got n={n}")
    runs = [*runs_a, *runs_b]
    lo = max(min(p.loss for p in run) for run in runs)
    hi = min(max(p.loss for p in run) for run in runs)
    if not lo <= hi:
        raise ValueError(f"the loss curves do not overlap: the highest of the runs' lowest losses ({lo:.4g}) "
                         f"is above the lowest of their highest losses ({hi:.4g})")
    return list(dict.fromkeys(float(x) for x in np.linspace(hi, lo, n)))


def _closest(run: Sequence[Point], level: float) -> Point:
    return min(run, key=lambda p: (abs(p.loss - level), math.inf if p.step is None else p.step))


def pair_by_loss(runs_a: Sequence[Sequence[Point]], runs_b: Sequence[Sequence[Point]],
                 levels: Sequence[float] | None, tolerance: float = 0.02) -> list[Pairing]:
    """For each loss level, the point of each run whose loss is closest (ties: the earlier step).

    A pairing is refused when a picked loss is more than ``tolerance`` (relative) from the level: the runs
    never reached the same loss there, so their geometry is not comparable on that basis.
    """
    _check(runs_a, runs_b, losses=True)
    if tolerance < 0:
        raise ValueError(f"the tolerance must be >= 0, got {tolerance}")
    levels = auto_levels(runs_a, runs_b) if levels is None else [float(x) for x in levels]
    if any(not x > 0 for x in levels):
        raise ValueError(f"loss levels must be > 0, got {levels}")
    pairings = []
    for level in levels:
        a, b = (tuple(_closest(run, level) for run in runs) for runs in (runs_a, runs_b))
        worst = max((*a, *b), key=lambda p: abs(p.loss - level))
        off = abs(worst.loss - level) / level
        refused = None
        if not off <= tolerance:
            found = ", ".join(f"{p.loss:.4g} (step {p.step})" for p in (*a, *b))
            refused = (f"no common loss near {level:.4g}: the closest losses are {found}, and {worst.run} is "
                       f"{off:.1%} off, beyond the tolerance of {tolerance:.1%}")
        pairings.append(Pairing("loss", None, level, a, b, refused))
    return pairings


@dataclass(frozen=True)
class LayerRow:
    """One layer of a pairing: mean (std, ddof=1; 0.0 for one run) over the runs of each side, ratio of means;
    for paired runs, the per-repeat ratios and their mean (std)."""

    name: str
    a_mean: float
    a_std: float
    b_mean: float
    b_std: float
    ratio: float  # mean of the other side / mean of the reference side
    ratios: tuple[float, ...] | None = None  # paired runs: other / reference, one per repeat
    ratio_mean: float | None = None
    ratio_std: float | None = None
    metric: str | None = None  # the statistic used instead of the pairing's (R_med where R_med_stab saturates)
    apart: str | None = None  # "above" / "below": every interval of one side above every one of the reference
    # side (the ratio is above / below 1 beyond the choice of coordinates); "overlap"; None without intervals


def intervals_apart(ref: Sequence[tuple[float, float]], other: Sequence[tuple[float, float]]) -> str | None:
    """"above" when every interval of ``other`` lies above every interval of ``ref``, "below" for the reverse,
    "overlap" otherwise; None when an interval is missing (nan). Apart intervals of 95% each put the ratio
    other/ref above (below) 1 beyond the sampling of coordinates, at least at the 95% level.

    >>> intervals_apart([(1.0, 2.0)], [(2.5, 9.0)]), intervals_apart([(1.0, 2.0)], [(1.5, 9.0)])
    ('above', 'overlap')
    """
    if not ref or not other or any(not (lo <= hi) for lo, hi in (*ref, *other)):
        return None
    if min(lo for lo, _ in other) > max(hi for _, hi in ref):
        return "above"
    if max(hi for _, hi in other) < min(lo for lo, _ in ref):
        return "below"
    return "overlap"


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    with np.errstate(invalid="ignore"):  # inf values: the mean is inf, the row is dropped anyway
        return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def _ratio(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.float64(num) / np.float64(den)  # x/0 -> inf, 0/0 -> nan, as elsewhere


def compare_layers(pairing: Pairing, reference: str = "a", paired: bool = False,
                   fallback_metric: str = "r_med") -> tuple[list[LayerRow], list[dict]]:
    """Rows for the layers every point has, in the order of the first point of side A, and the layers left out.

    ``reference="a"`` gives ratio = B/A (second run over first), ``"b"`` gives A/B. A layer is left out, with
    its name and the reason, when a point excludes it (a Hessian zero to round-off) or when its mean is not
    finite on a side (an undefined metric in some run). A layer whose metric saturates in any point of either
    side is compared on ``fallback_metric`` in every point, so that both sides use the same statistic.
    ``paired``: run i of A goes with run i of B (both sides hold the same number of runs), and each row also
    gets the per-repeat ratios with their mean (std, ddof=1; 0.0 for one repeat).
    """
    if reference not in ("a", "b"):
        raise ValueError(f"reference must be 'a' or 'b', got {reference!r}")
    if paired and len(pairing.a) != len(pairing.b):
        raise ValueError(f"paired runs need as many runs on each side, got {len(pairing.a)} and {len(pairing.b)}")
    points = (*pairing.a, *pairing.b)
    rows, left_out = [], []
    for name in pairing.a[0].values:
        if not all(name in p.values for p in points):
            continue
        why = {p.excluded[name] for p in points if name in p.excluded}
        if why:
            sides = [side for side, pts in (("A", pairing.a), ("B", pairing.b)) if any(name in p.excluded for p in pts)]
            left_out.append({"name": name, "reason": f"{'; '.join(sorted(why))} ({' and '.join(sides)})"})
            continue
        switch = any(name in p.saturated for p in points)
        a, b = (np.array([p.fallback[name] if switch else p.values[name] for p in side], dtype=np.float64)
                for side in (pairing.a, pairing.b))
        (am, asd), (bm, bsd) = _mean_std(a), _mean_std(b)
        if not (math.isfinite(am) and math.isfinite(bm)):
            used = fallback_metric if switch else "the metric"
            left_out.append({"name": name, "reason": f"{used} undefined (median |H_ii| = 0) in "
                                                     f"{'A' if not math.isfinite(am) else 'B'}"})
            continue
        num, den = (bm, am) if reference == "a" else (am, bm)
        bounds = [(p.fallback_bounds if switch else p.bounds).get(name) for p in points]
        apart = None
        if all(bounds):
            sides = bounds[:len(pairing.a)], bounds[len(pairing.a):]
            apart = intervals_apart(*(sides if reference == "a" else sides[::-1]))
        row = LayerRow(name, am, asd, bm, bsd, float(_ratio(num, den)), metric=fallback_metric if switch else None,
                       apart=apart)
        if paired:
            per = _ratio(b, a) if reference == "a" else _ratio(a, b)
            with np.errstate(invalid="ignore"):
                row = replace(row, ratios=tuple(map(float, per)), ratio_mean=float(per.mean()),
                              ratio_std=float(per.std(ddof=1)) if per.size > 1 else 0.0)
        rows.append(row)
    return rows, left_out


def layer_rows(pairing: Pairing, reference: str = "a", paired: bool = False) -> list[LayerRow]:
    """The compared rows of ``compare_layers`` (without the list of layers left out)."""
    return compare_layers(pairing, reference, paired)[0]


def summarize(ratios, seed: int = 0, n_boot: int = 2000, confidence: float = 0.95) -> dict:
    """Summary of ratios, one per layer (one run per side) or a repeats × layers array (paired repeats).

    Layers with a ratio that is not finite or <= 0 (in any repeat) are dropped first.

    - ``frac_above_1``: share of layers whose ratio exceeds 1 (with repeats: the layer's geometric mean over
      them);
    - ``geo_mean``: exp(mean log ratio) over layers and repeats. Ratios are multiplicative (2 and 1/2 are
      opposite and equal effects), so their centre is a geometric mean, which the arithmetic mean would bias
      upwards;
    - ``ci_low``/``ci_high``: percentile bootstrap of the geometric mean (``numpy.random.default_rng(seed)``,
      ``n_boot`` resamples). Each resample draws layers with replacement (``integers(0, n, (n_boot, n))``)
      and, with several repeats, repeats with replacement (``integers(0, R, (n_boot, R))``, drawn next), and
      takes the mean log ratio over the drawn repeats × drawn layers: repeats and layers are crossed random
      factors (the "pigeonhole" bootstrap, Owen 2007), so the interval holds the run-to-run variation, not
      only the layer-to-layer one. ``ci_over`` says which (``layers`` or ``repeats and layers``);
    - ``sign_p``: two-sided exact sign test over layers of "ratio > 1" against "ratio < 1" (ties dropped);
    - ``n_repeats``, ``repeats_above_1``: how many repeats, and in how many the geometric mean over layers
      exceeds 1 (``None`` for one);
    - ``effect``: ``above_1`` when the interval lies above 1, ``below_1`` below 1, else ``none``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    r = np.asarray(ratios, dtype=np.float64)
    r = r.reshape(1, -1) if r.ndim == 1 else r
    with np.errstate(invalid="ignore"):
        r = r[:, np.all(np.isfinite(r) & (r > 0), axis=0)]
    repeats, n = r.shape
    if n == 0:
        return dict(n_layers=0, frac_above_1=None, geo_mean=None, ci_low=None, ci_high=None, sign_p=None,
                    n_repeats=repeats, repeats_above_1=None, ci_over=None, effect=None)
    logs = np.log(r)
    rng = np.random.default_rng(seed)
    layers = rng.integers(0, n, size=(n_boot, n))
    rows = rng.integers(0, repeats, size=(n_boot, repeats)) if repeats > 1 else np.zeros((n_boot, 1), dtype=int)
    boot = np.exp(logs[rows[:, :, None], layers[:, None, :]].mean(axis=(1, 2)))
    tail = 50 * (1 - confidence)
    ci_low, ci_high = (float(x) for x in np.percentile(boot, [tail, 100 - tail]))
    per_layer = logs.mean(axis=0)
    above, below = int((per_layer > 0).sum()), int((per_layer < 0).sum())
    m = above + below
    sign_p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(min(above, below) + 1)) / 2**m)
    effect = "above_1" if ci_low > 1 else "below_1" if ci_high < 1 else "none"
    return dict(n_layers=n, frac_above_1=above / n, geo_mean=float(np.exp(logs.mean())), ci_low=ci_low,
                ci_high=ci_high, sign_p=float(sign_p), n_repeats=repeats,
                repeats_above_1=int((logs.mean(axis=1) > 0).sum()) if repeats > 1 else None,
                ci_over="repeats and layers" if repeats > 1 else "layers", effect=effect)


def verdict(summary: dict | None, ratio: str = "B/A") -> str:
    """One sentence on what ``summary`` supports about ``ratio`` (e.g. ``R_SGDM/R_Adam``), never more than its
    interval does: an effect only where the interval excludes 1 *and* holds the run-to-run variation.

    >>> s = summarize([[2.0, 4.0, 3.0], [2.5, 3.0, 1.5]])
    >>> verdict(s, "R_SGDM/R_Adam").split(":")[0], s["repeats_above_1"]
    ('effect, R_SGDM/R_Adam above 1', 2)
    """
    if not summary or not summary["n_layers"]:
        return "nothing to compare: no layer has a defined ratio"
    s, n, repeats = summary, summary["n_layers"], summary["n_repeats"]
    over = f"{repeats} repeats × {n} layers" if repeats > 1 else f"{n} layers"
    centre = f"geometric-mean {ratio} {s['geo_mean']:.3g} (95% CI {s['ci_low']:.3g}–{s['ci_high']:.3g} over {over})"
    layers = f"above 1 on {round(s['frac_above_1'] * n)} of {n} layers (sign test p = {s['sign_p']:.2g})"
    if repeats > 1:
        layers += f" and in {s['repeats_above_1']} of {repeats} repeats"
    if "layers_clearly_above_1" in s:
        layers += (f"; per-layer 95% R_med intervals apart: above 1 on {s['layers_clearly_above_1']}, below on "
                   f"{s['layers_clearly_below_1']} of {n} layers")
    if s["effect"] == "none":
        return f"no clear effect: {centre}, an interval that includes 1; {layers}"
    side = "above" if s["effect"] == "above_1" else "below"
    if repeats == 1:
        return (f"{ratio} {side} 1 in this one run per side: {centre}; {layers}. The interval does not hold the "
                "run-to-run variation: repeat the runs to tell whether this is an effect")
    return f"effect, {ratio} {side} 1: {centre}; {layers}"
