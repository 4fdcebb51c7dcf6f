"""CI gates: thresholds that turn a report into exit status 1 with a one-line reason (SPEC §4)."""

from collections.abc import Callable

from .errors import ThresholdFailed, UsageError

# the statistics an audit computes only when asked, and the flag that asks (the AuditConfig field, the option)
NEEDS = {"s_med": ("geometry", "--smed"), "r_diag_mean": ("geometry", "--smed"),
         "r_diag_median": ("geometry", "--smed")}


def check_metric(metric: str, config) -> None:
    """Refuse, before any work, a ``metric`` the audit of ``config`` (an ``AuditConfig``) will not compute."""
    field, flag = NEEDS.get(metric, (None, None))
    if field and not getattr(config, field):
        raise UsageError(f"--metric {metric} is computed with {flag}: add {flag}")


def fail_above(document: dict, threshold: float, metric: str, on_skip: Callable[[str], None] | None = None) -> None:
    """Fail when any audited layer's ``metric`` exceeds ``threshold`` (an undefined, infinite ratio counts).

    Layers whose Hessian is zero to round-off have no ratio and are skipped; where R_med_stab saturates
    (R_med ≥ 1000), ``--metric r_med_stab`` is judged on R_med, since R_med_stab never exceeds 1000.
    ``on_skip`` receives one sentence naming the skipped layers.
    """
    if metric not in document["checkpoints"][0]["layers"][0]["stats"]:
        raise UsageError(f"--metric {metric} is not among this audit's statistics (r_u, r_v: geomaudit compare; "
                         "s_med, r_diag_*: --smed)")
    worst, skipped = None, []
    for ckpt in document["checkpoints"]:
        for layer in ckpt["layers"]:
            if layer.get("zero_hessian"):
                skipped.append(layer["name"])
                continue
            used = "r_med" if metric == "r_med_stab" and layer.get("saturated") else metric
            value = layer["stats"][used]
            value = float("inf") if value is None else value
            if value > threshold and (worst is None or value > worst[0]):
                worst = (value, layer["name"], ckpt["path"], used)
    if skipped and on_skip:
        names = ", ".join(dict.fromkeys(skipped))
        on_skip(f"--fail-above skips {names}: Hessian zero to round-off, no ratio")
    if worst:
        value, name, path, used = worst
        why = "" if used == metric else " (r_med_stab saturates there, so r_med is judged)"
        raise ThresholdFailed(f"{used} of {name} in {path} is {value:.4g}, above --fail-above {threshold:g}{why}")


def fail_if_ratio_below(document: dict, threshold: float) -> None:
    """Fail when a compared pair's geometric-mean ratio is below ``threshold``."""
    for pair in document["compare"]["pairs"]:
        geo = pair["summary"]["geo_mean"] if pair["summary"] else None
        if geo is not None and geo < threshold:
            raise ThresholdFailed(f"the geometric-mean ratio at {pair['label']} is {geo:.4g}, "
                                  f"below --fail-if-ratio-below {threshold:g}")
