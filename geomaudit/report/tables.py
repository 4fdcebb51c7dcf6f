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
