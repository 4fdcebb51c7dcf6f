"""CI gates: thresholds that turn a report into exit status 1 with a one-line reason (SPEC §4)."""

from .errors import ThresholdFailed, UsageError


def fail_above(document: dict, threshold: float, metric: str) -> None:
    """Fail when any audited layer's ``metric`` exceeds ``threshold`` (an undefined, infinite ratio counts)."""
    if metric not in document["checkpoints"][0]["layers"][0]["stats"]:
        raise UsageError(f"--metric {metric} is not among this audit's statistics (r_u, r_v: geomaudit compare; "
                         "s_med, r_diag_*: --smed)")
    worst = None
    for ckpt in document["checkpoints"]:
        for layer in ckpt["layers"]:
            value = layer["stats"][metric]
            value = float("inf") if value is None else value
            if value > threshold and (worst is None or value > worst[0]):
                worst = (value, layer["name"], ckpt["path"])
    if worst:
        value, name, path = worst
        raise ThresholdFailed(f"{metric} of {name} in {path} is {value:.4g}, above --fail-above {threshold:g}")


def fail_if_ratio_below(document: dict, threshold: float) -> None:
    """Fail when a compared pair's geometric-mean ratio is below ``threshold``."""
    for pair in document["compare"]["pairs"]:
        geo = pair["summary"]["geo_mean"] if pair["summary"] else None
        if geo is not None and geo < threshold:
            raise ThresholdFailed(f"the geometric-mean ratio at {pair['label']} is {geo:.4g}, "
                                  f"below --fail-if-ratio-below {threshold:g}")
