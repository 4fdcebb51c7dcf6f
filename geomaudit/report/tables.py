"""Rich tables of a report document."""

from rich.table import Table


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "undefined" if x is None else format(x, spec)


def rmed_tables(document: dict) -> list[Table]:
    """One table per audited checkpoint: a row per layer with the R_med family (SPEC §1)."""
    data = document["data"]
    tables = []
    for ckpt in document["checkpoints"]:
        step = "" if ckpt["step"] is None else f" step {ckpt['step']}"
        topk = document["settings"]["topk"]
        title = (f"{ckpt['path']}{step}: loss {ckpt['loss']:.4g} on {data['examples']} examples of {data['source']} "
                 f"({data['fingerprint'][:19]}…)")
        table = Table(title=title, title_justify="left")
        table.add_column("layer", overflow="fold", min_width=24)
        for col in ("shape", "coords"):
            table.add_column(col)
        for col in ("R_med", "R_med_stab", f"R_top{topk}", "zero_frac", "median |H_ii|"):
            table.add_column(col, justify="right")
        for layer in ckpt["layers"]:
            s = layer["stats"]
            table.add_row(layer["name"], "×".join(map(str, layer["shape"])), str(layer["coords"]),
                          _fmt(s["r_med"]), _fmt(s["r_med_stab"]), _fmt(s["r_topk"]),
                          _fmt(s["zero_frac"], ".2f"), _fmt(s["median_abs"]))
        tables.append(table)
    return tables


def _mean_std(mean: float | None, std: float | None, runs: int) -> str:
    return _fmt(mean) if runs == 1 or mean is None else f"{_fmt(mean)} ({_fmt(std, '.2g')})"


def compare_tables(document: dict) -> list[Table]:
    """The paper's shape: a table per pair of checkpoints, layers as rows, then a summary row per pair."""
    spec = document["compare"]
    metric, direction = spec["metric"], spec["direction"]
    runs_a, runs_b = spec["runs"]["a"], spec["runs"]["b"]
    tables = []
    for pair in spec["pairs"]:
        where = "; ".join(f"{side.upper()} step {p['step']} loss {p['loss']:.4g}"
                          for side in ("a", "b") for p in pair[side])
        table = Table(title=f"{pair['label']} ({spec['loss_source']} loss): {where}", title_justify="left")
        if pair["refused"]:
            table.add_column("refused")
            table.add_row(pair["refused"])
            tables.append(table)
            continue
        table.add_column("layer", overflow="fold", min_width=24)
        table.add_column(f"{metric} A", justify="right")
        table.add_column(f"{metric} B", justify="right")
        table.add_column(f"ratio {direction}", justify="right")
        for row in pair["layers"]:
            table.add_row(row["name"], _mean_std(row["a_mean"], row["a_std"], len(runs_a)),
                          _mean_std(row["b_mean"], row["b_std"], len(runs_b)), _fmt(row["ratio"]))
        s = pair["summary"]
        if s["n_layers"]:
            table.caption = (f"{direction} > 1 on {s['frac_above_1']:.0%} of {s['n_layers']} layers; geometric-mean "
                             f"ratio {s['geo_mean']:.3g} (95% bootstrap CI {s['ci_low']:.3g}–{s['ci_high']:.3g}); "
                             f"sign test p = {s['sign_p']:.2g}")
        tables.append(table)
    return tables
