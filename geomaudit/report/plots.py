"""Figures of a saved report (matplotlib, the optional ``plot`` extra; SPEC §4 ``geomaudit report --plot``).

- ``rmed`` over a trajectory: the metric of every layer against the step (the paper's Figures 1 and 2); one
  checkpoint: the metric per layer as sorted bars.
- ``compare``: the loss of every checkpoint of runs A and B with each pair joined, and the metric of every layer
  of the reference run against the other run's, one colour and marker per pair (Tables 1–2 as a picture).
- ``svd``: the top singular values σ_i / σ_1 of every weight matrix of the last checkpoint, with R_u (Figure 4).

matplotlib is imported inside :func:`plot_report` and used through its object API with the Agg canvas, so
neither ``import geomaudit`` nor a user's pyplot backend is touched.
"""

import os
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .document import atomic_write
from .tables import _fmt

DPI = 120
WIDE, TALL = (10, 4), (10, 8)
MAX_LINES = 12  # more layers than this: the median and interquartile band, plus the most extreme layers
EXTREME = 3
MAX_BARS = 30  # more layers than this: the highest and the lowest MAX_BARS // 2 bars


def plot_report(document: dict, path: str | os.PathLike, metric: str | None = None) -> None:
    """Draw the figure of ``document`` and write it to ``path`` as a PNG, atomically (temporary file, rename)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'geomaudit[plot]'") from None

    if "svd" in document:
        if metric is not None:
            raise UsageError("--metric applies to reports of geomaudit rmed; an svd report plots its spectra")
        fig = _svd_figure(Figure, document)
    elif "compare" in document:
        if metric is not None:
            raise UsageError(f"--metric applies to reports of geomaudit rmed; this compare report compared "
                             f"{document['compare']['metric']}")
        fig = _compare_figure(Figure, document)
    else:
        fig = _rmed_figure(Figure, document, metric or "r_med_stab")
    FigureCanvasAgg(fig)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


def _short(path: str | None) -> str:
    """A path's last two components: enough to tell runs apart in a title."""
    return "/".join(Path(path).parts[-2:]) if path else "?"


def _strip_prefix(names: list[str]) -> tuple[str, list[str]]:
    """The dotted prefix all layer names share, and the names without it (legends stay readable)."""
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[:prefix.rfind(".") + 1]
    return prefix, [n[len(prefix):] for n in names]


def _number(x) -> float:
    """A JSON value as a float for a log axis: undefined (``null``) or non-positive values are left out (NaN)."""
    return float(x) if x is not None and x > 0 else float("nan")


MARKERS = "os^vDP<>Xph*"  # one shape per line: lines at one value (several layers alike) stay told apart


def _style(i: int) -> dict:
    """Line ``i``'s look: its own colour and marker shape, hollow markers and slight transparency, so that a line
    drawn over another at the same values leaves the one below visible."""
    return dict(color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], ms=(7, 5.5, 4)[i % 3], mfc="none",
                alpha=0.8, ls="-" if i < 10 else "--")


def _lines(ax, x, series: dict[str, np.ndarray], score: dict[str, float], label) -> None:
    """A line per layer; beyond MAX_LINES layers, the median over layers with its interquartile band and the
    EXTREME layers of highest ``score``, which the legend says."""
    if len(series) <= MAX_LINES:
        for i, (name, y) in enumerate(series.items()):
            ax.plot(x, y, label=label(name), **_style(i))
        return
    values = np.array(list(series.values()))
    ax.fill_between(x, *np.nanpercentile(values, [25, 75], axis=0), color="0.8",
                    label=f"interquartile range of {len(series)} layers")
    ax.plot(x, np.nanmedian(values, axis=0), color="k", lw=2, label=f"median of {len(series)} layers")
    ranked = sorted(series, key=lambda n: np.nan_to_num(score[n], nan=-np.inf), reverse=True)
    for i, name in enumerate(ranked[:EXTREME]):
        ax.plot(x, series[name], label=label(name), **_style(i))


def _legend(ax, title: str | None = None) -> None:
    """The legend beside the axes, where it hides no data (constrained layout makes room for it)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", title=title,
                  title_fontsize="small", frameon=False)


def _rmed_figure(Figure, document: dict, metric: str):
    """The metric per layer over the steps of a trajectory (Figures 1–2), or sorted bars for one checkpoint."""
    checkpoints = document["checkpoints"]
    layers = [{la["name"]: la["stats"] for la in c["layers"]} for c in checkpoints]
    if not any(stats.get(metric) is not None for by_name in layers for stats in by_name.values()):
        raise UsageError(f"the report has no value of {metric}" + (
            ": audit with --smed" if metric.startswith(("s_med", "r_diag")) else ""))
    names = list(layers[0])
    prefix, short = _strip_prefix(names)
    label = dict(zip(names, short)).get
    where = f"layers {prefix}*" if prefix else "layers"
    source = _short(checkpoints[0]["run"] or checkpoints[0]["path"])
    if len(checkpoints) == 1:
        return _bars(Figure, checkpoints[0], layers[0], metric, label, where)
    steps = [c["step"] for c in checkpoints]
    x = steps if None not in steps else list(range(len(checkpoints)))
    series = {n: np.array([_number(by_name.get(n, {}).get(metric)) for by_name in layers]) for n in names}
    fig = Figure(figsize=WIDE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    _lines(ax, x, series, {n: np.nanmean(np.log(y)) for n, y in series.items()}, label)
    ax.set(yscale="log", xlabel="step" if None not in steps else "checkpoint", ylabel=metric,
           title=f"{metric} per layer over training: {source}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(ax, where + (f"\n(and the {EXTREME} highest on average)" if len(series) > MAX_LINES else ""))
    return fig


def _bars(Figure, checkpoint: dict, stats: dict, metric: str, label, where: str):
    ranked = sorted(stats, key=lambda n: np.nan_to_num(_number(stats[n].get(metric)), nan=-np.inf), reverse=True)
    note = ""
    if len(ranked) > MAX_BARS:
        ranked = ranked[:MAX_BARS // 2] + ranked[-(MAX_BARS // 2):]
        note = f" (the {MAX_BARS // 2} highest and lowest of {len(stats)})"
    fig = Figure(figsize=WIDE if len(ranked) <= 12 else TALL, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    values = [_number(stats[n].get(metric)) for n in ranked]
    ax.barh(range(len(ranked)), values, color="C0")
    ax.set_yticks(range(len(ranked)), [label(n) for n in ranked], fontsize="small")
    ax.invert_yaxis()
    step = "" if checkpoint["step"] is None else f" step {checkpoint['step']}"
    ax.set(xscale="log", xlabel=metric, ylabel=where + note,
           title=f"{metric} per layer: {_short(checkpoint['path'])}{step}")
    return fig


def _compare_figure(Figure, document: dict):
    """Top: the loss of every checkpoint whose loss was computed against its step, runs A and B (older reports:
    the paired ones), each pair ringed and joined by a dashed line. Bottom: per layer, the metric of the other run
    against the reference run's, one colour and marker shape per pair."""
    spec = document["compare"]
    metric, direction = spec["metric"], spec["direction"]
    fig = Figure(figsize=TALL, dpi=DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1)
    runs = {side: _runs(spec["runs"][side]) for side in ("a", "b")}
    for side, color, marker in (("a", "C0", "o"), ("b", "C1", "s")):
        points = {(p["run"], p["step"], p["loss"]) for pair in spec["pairs"] for p in pair[side]}
        points |= {(p["run"], p["step"], p["loss"]) for p in spec.get("losses", ()) if p["run"] in spec["runs"][side]}
        for i, run in enumerate(spec["runs"][side]):
            curve = sorted((s, loss) for r, s, loss in points if r == run)
            if curve:
                top.plot(*zip(*curve), color=color, marker=marker, ms=4, alpha=0.6,
                         label=f"run {side.upper()}" if i == 0 else None)
    reference, other = ("a", "b") if direction == "B/A" else ("b", "a")
    for i, pair in enumerate(spec["pairs"]):
        color = "0.6" if pair["refused"] else f"C{(i + 2) % 10}"
        joined = sorted((p["step"], p["loss"]) for p in pair["a"] + pair["b"])
        top.plot(*zip(*joined), ls="--", color=color, marker="o", ms=9, mfc="none",
                 label=pair["label"] + (" (refused)" if pair["refused"] else ""))
        if pair["refused"]:
            continue
        rows = [(_number(r[f"{reference}_mean"]), _number(r[f"{other}_mean"])) for r in pair["layers"]]
        s = pair["summary"]
        if rows:
            bottom.scatter(*zip(*rows), color=color, alpha=0.7, marker=MARKERS[i % len(MARKERS)],
                           label=pair["label"] + (
                f": geometric-mean {direction} {_fmt(s['geo_mean'])}, {s['frac_above_1']:.0%} of {s['n_layers']} "
                "layers > 1" if s["n_layers"] else ": no ratio defined"))
    fig.suptitle(f"A = {runs['a']}; B = {runs['b']}")
    top.set(xlabel="step", ylabel=f"loss ({spec['loss_source']})",
            title=f"loss of every checkpoint, the pairs at {'equal loss' if spec['mode'] == 'loss' else 'equal step'} "
                  "ringed")
    top.xaxis.get_major_locator().set_params(integer=True)
    _legend(top)
    if bottom.collections:
        low, high = _span(bottom)
        bottom.plot([low, high], [low, high], color="k", lw=0.8, label="y = x (ratio 1)")
        bottom.set(xlim=(low, high), ylim=(low, high))
    else:
        bottom.text(0.5, 0.5, "no layer to compare", transform=bottom.transAxes, ha="center")
    fallback = any(r.get("metric") not in (None, metric) for pair in spec["pairs"] for r in pair["layers"])
    shown = f"{metric} (r_med where it saturates)" if fallback else metric
    bottom.set(xscale="log", yscale="log", xlabel=f"{shown} of {reference.upper()}",
               ylabel=f"{shown} of {other.upper()}",
               title=f"{metric} per layer, ratio {direction}: above the line, {other.upper()} is larger")
    _legend(bottom)
    return fig


def _runs(paths: list[str]) -> str:
    short = [_short(p) for p in paths]
    return ", ".join(short) if len(short) <= 2 else f"{short[0]} and {len(short) - 1} more runs"


def _span(ax) -> tuple[float, float]:
    """The smallest and largest coordinate of the points drawn on ``ax``, for the y = x line."""
    xy = np.concatenate([c.get_offsets() for c in ax.collections])
    xy = xy[np.isfinite(xy)]
    return (float(xy.min()) / 1.2, float(xy.max()) * 1.2) if xy.size else (1.0, 10.0)


def _svd_figure(Figure, document: dict):
    """σ_i / σ_1 of the top singular values of every weight matrix of the last checkpoint, R_u in the legend."""
    checkpoint = document["svd"]["checkpoints"][-1]
    layers = {la["name"]: la for la in checkpoint["layers"]}
    prefix, short = _strip_prefix(list(layers))
    label = {n: f"{s}: R_u {_fmt(layers[n]['r_u'])}, k {layers[n]['k']}" for n, s in zip(layers, short)}
    top = max(len(la["top_singular_values"]) for la in layers.values())
    series = {}
    for name, la in layers.items():
        sigma = np.full(top, np.nan)
        sigma[:len(la["top_singular_values"])] = la["top_singular_values"]
        series[name] = sigma / sigma[0] if sigma[0] > 0 else sigma * np.nan
    fig = Figure(figsize=WIDE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    _lines(ax, np.arange(1, top + 1), series, {n: _number(la["r_u"]) for n, la in layers.items()}, label.get)
    step = "" if checkpoint["step"] is None else f" step {checkpoint['step']}"
    ax.set(yscale="log", xlabel="$i$", ylabel=r"$\sigma_i / \sigma_1$",
           title=f"top singular values: {_short(checkpoint['path'])}{step}")
    ax.set_xticks(np.arange(1, top + 1))
    _legend(ax, (f"layers {prefix}*" if prefix else "layers") + (
        f"\n(and the {EXTREME} of highest R_u)" if len(series) > MAX_LINES else "") + "\nk: effective rank")
    return fig
