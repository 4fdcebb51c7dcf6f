"""CI gates: thresholds that turn a report into exit status 1 with a one-line reason (SPEC §4).

Each gate returns the reason it fails (every offender listed) or ``None``; :func:`conclude` turns the reasons of
all the gates a command ran into one ``ThresholdFailed``. A gate that had nothing to check fails: it has not held.
"""

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


def _where(ckpt: dict) -> str:
    return ckpt["path"] if ckpt["step"] is None else f"step {ckpt['step']}"


def _listed(items: list[str]) -> str:
    return "; ".join(items)


def _value(x: float | None) -> float:
    """A statistic as a number; an undefined ratio (JSON ``null``: a median of 0) is infinite."""
    return float("inf") if x is None else x


def _shown(x: float) -> str:
    return f"{x:.4g}" if x == x and x != float("inf") else "undefined"


def _has_metric(document: dict, metric: str) -> None:
    layers = [la for c in document["checkpoints"] for la in c["layers"]]
    if layers and metric not in layers[0]["stats"]:
        raise UsageError(f"--metric {metric} is not among this audit's statistics (r_u, r_v: geomaudit compare; "
                         "s_med, r_diag_*: --smed)")


def _judged(layers: list[dict], metric: str) -> str | None:
    """The statistic a gate reads for a layer seen in ``layers`` (one per audit): none (``None``) when its Hessian
    is zero to round-off in one of them (no ratio); R_med where R_med_stab saturates in one of them (R_med ≥ 1000,
    while R_med_stab never exceeds 1000); else ``metric``."""
    if any(la.get("zero_hessian") for la in layers):
        return None
    return "r_med" if metric == "r_med_stab" and any(la.get("saturated") for la in layers) else metric


def _skipped(option: str, names: list[str], on_skip: Callable[[str], None] | None) -> None:
    if names and on_skip:
        on_skip(f"{option} skips {', '.join(dict.fromkeys(names))}: Hessian zero to round-off, no ratio")


def fail_above(document: dict, threshold: float, metric: str,
               on_skip: Callable[[str], None] | None = None) -> str | None:
    """Fail when an audited layer's ``metric`` is above ``threshold`` (an undefined, infinite ratio counts), or
    when no layer was audited; the reason lists every offender. Layers zero to round-off are skipped (``on_skip``
    gets one sentence naming them); saturated ones are judged on R_med (``_judged``)."""
    _has_metric(document, metric)
    layers = [(ckpt, la) for ckpt in document["checkpoints"] for la in ckpt["layers"]]
    _skipped("--fail-above", [la["name"] for _, la in layers if _judged([la], metric) is None], on_skip)
    judged = [(ckpt, la, _judged([la], metric)) for ckpt, la in layers if _judged([la], metric)]
    if not judged:
        return f"--fail-above {threshold:g} holds on nothing: no layer with a ratio was audited"
    above = [(c, la, used) for c, la, used in judged if _value(la["stats"][used]) > threshold]
    if above:
        return (f"{metric} is above --fail-above {threshold:g} in {len(above)} of {len(judged)} layers: "
                + _listed([f"{la['name']} at {_where(c)} ({_shown(_value(la['stats'][used]))}"
                           + ("" if used == metric else f", {used}: {metric} saturates there") + ")"
                           for c, la, used in above]))


def fail_if_ratio_below(document: dict, threshold: float) -> str | None:
    """Fail when a pair's geometric-mean ratio is below ``threshold``, and when a pair could not be checked (it was
    refused, or no layer had a ratio): a gate that compared nothing has not held. The reason lists every pair."""
    pairs = document["compare"]["pairs"]
    failed = []
    for pair in pairs:
        s = pair["summary"]
        if pair["refused"]:
            failed.append(f"{pair['label']} was refused ({pair['refused']})")
        elif not s or not s["n_layers"]:
            failed.append(f"{pair['label']} compared no layer")
        elif s["geo_mean"] < threshold:
            failed.append(f"{pair['label']} has a geometric-mean ratio of {s['geo_mean']:.4g}")
    if not pairs:
        return f"--fail-if-ratio-below {threshold:g} holds on nothing: no pair was compared"
    if failed:
        return f"--fail-if-ratio-below {threshold:g} fails on {len(failed)} of {len(pairs)} pairs: " + _listed(failed)


def check_baseline(baseline: dict, path: str, config, metric: str) -> None:
    """Before any work: ``baseline`` must be an ``rmed`` report with ``metric``, audited with the coordinates
    (``coords``, ``seed``) that ``config`` (an ``AuditConfig``) will sample."""
    from .errors import InputError

    if baseline.get("command") != "rmed":
        raise InputError(f"--baseline {path} is a report of geomaudit {baseline.get('command')}, not of rmed")
    _has_metric(baseline, metric)
    settings = baseline["settings"]
    for key in ("coords", "seed"):
        if settings.get(key) != getattr(config, key):
            raise InputError(f"--baseline {path} was audited with --{key} {settings.get(key)}, this audit with "
                             f"--{key} {getattr(config, key)}: its coordinates are not these")


def fail_if_increase(document: dict, baseline: dict, path: str, factor: float, metric: str,
                     on_skip: Callable[[str], None] | None = None) -> str | None:
    """Fail when a layer's ``metric`` grew by more than ``factor`` over ``baseline`` (an ``rmed`` report of an
    earlier audit): per layer, on the same coordinates and the same batch, checkpoints matched by step (a lone
    checkpoint on either side is matched with the other's lone checkpoint). A baseline audited on other indices
    or other data, or lacking a layer or a step, is refused (an input error); the reason lists every offender.
    Layers zero to round-off on either side are skipped, saturated ones judged on R_med (``_judged``)."""
    from .errors import InputError

    if baseline["data"]["fingerprint"] != document["data"]["fingerprint"]:
        old, new = baseline["data"]["fingerprint"][:19], document["data"]["fingerprint"][:19]
        raise InputError(f"--baseline {path} was audited on another batch (data fingerprint {old}…, this one "
                         f"{new}…)")
    before = baseline["checkpoints"]
    single = len(before) == 1 and len(document["checkpoints"]) == 1
    by_step = {c["step"]: c for c in before}
    grew, skipped, compared = [], [], 0
    for ckpt in document["checkpoints"]:
        old = before[0] if single else by_step.get(ckpt["step"])
        if old is None:
            raise InputError(f"--baseline {path} has no checkpoint at {_where(ckpt)} to compare with")
        old_layers = {la["name"]: la for la in old["layers"]}
        for layer in ckpt["layers"]:
            was = old_layers.get(layer["name"])
            if was is None:
                raise InputError(f"--baseline {path} has no layer {layer['name']} at {_where(old)}")
            if was["indices"] != layer["indices"]:
                raise InputError(f"--baseline {path} sampled other coordinates of {layer['name']}: its values "
                                 "are not comparable")
            used = _judged([layer, was], metric)
            if used is None:
                skipped.append(layer["name"])
                continue
            compared += 1
            now, then = _value(layer["stats"][used]), _value(was["stats"][used])
            ratio = now / then if then else float("inf")
            if not ratio <= factor:
                grew.append(f"{layer['name']} at {_where(ckpt)} ({_shown(then)} → {_shown(now)}, "
                            f"×{_shown(ratio)}" + ("" if used == metric else f", {used}: {metric} saturates") + ")")
    _skipped("--fail-if-increase", skipped, on_skip)
    if not compared:
        return f"--fail-if-increase {factor:g} holds on nothing: no layer was audited"
    if grew:
        return (f"{metric} grew more than ×{factor:g} over --baseline {path} in {len(grew)} of {compared} layers: "
                + _listed(grew))


def conclude(reasons: list[str | None]) -> None:
    """Exit status 1 (``ThresholdFailed``) with every failing gate's reason, when there is one."""
    failed = [r for r in reasons if r]
    if failed:
        raise ThresholdFailed("; and ".join(failed))
