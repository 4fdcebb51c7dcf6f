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
        geometry = document["settings"].get("geometry", False)
        alignment = document["settings"].get("alignment", False)
        extra = (("S_med", "S_med from", "r_diag mean", "r_diag median") if geometry else ()) + (
            ("ρ(|g|, |H_ii|)", "ρ(|Adam step|, |H_ii|)") if alignment else ())
        for col in ("R_med", "R_med_stab", f"R_top{topk}", "zero_frac", "median |H_ii|", *extra):
            table.add_column(col, justify="right")
        for layer in ckpt["layers"]:
            s = layer["stats"]
            cells = [_fmt(s["r_med"]), _fmt(s["r_med_stab"]), _fmt(s["r_topk"]), _fmt(s["zero_frac"], ".2f"),
                     _fmt(s["median_abs"])]
            if geometry:
                cells += [_fmt(s["s_med"]), layer["s_med_method"], _fmt(s["r_diag_mean"]), _fmt(s["r_diag_median"])]
            if alignment:
                cells += [_fmt(layer["alignment"][k], ".2f") for k in ("spearman_grad", "spearman_step")]
            table.add_row(layer["name"], "×".join(map(str, layer["shape"])), str(layer["coords"]), *cells)
        if ckpt["across"]:
            a = ckpt["across"]
            table.caption = (f"r_diag across {', '.join(a['layers'])}: mean {_fmt(a['r_diag_mean'])}, "
                             f"median {_fmt(a['r_diag_median'])}")
        tables.append(table)
    return tables


def _mean_std(mean: float | None, std: float | None, runs: int) -> str:
    return _fmt(mean) if runs == 1 or mean is None else f"{_fmt(mean)} ({_fmt(std, '.2g')})"


def compare_tables(document: dict) -> list[Table]:
    """The paper's shape (Tables 1, 2, 7): layers as rows, one column group (A, B, ratio) per pair of checkpoints,
    the pairs' losses on top and their summaries below; refused pairs are listed under the table."""
    spec = document["compare"]
    metric, direction = spec["metric"], spec["direction"]
    pairs = [p for p in spec["pairs"] if not p["refused"]]
    table = Table(title=f"{metric}: A = {', '.join(spec['runs']['a'])}; B = {', '.join(spec['runs']['b'])}; "
                        f"ratio {direction}", title_justify="left")
    table.add_column("layer", overflow="fold", min_width=24)
    for pair in pairs:
        for head in ("A", "B", f"ratio {direction}"):
            table.add_column(f"{pair['label']}\n{head}", justify="right")

    def group(cells) -> list[str]:
        return [cell for pair in pairs for cell in cells(pair)]

    def losses(pair, side) -> str:
        return ", ".join(f"{p['loss']:.4g}" + ("" if spec["mode"] == "step" else f" @{p['step']}") for p in pair[side])

    table.add_row(f"loss ({spec['loss_source']})", *group(lambda p: (losses(p, "a"), losses(p, "b"), "")),
                  end_section=True)
    names = [row["name"] for row in pairs[0]["layers"]] if pairs else []
    rows = [{row["name"]: row for row in pair["layers"]} for pair in pairs]
    n_a, n_b = len(spec["runs"]["a"]), len(spec["runs"]["b"])
    for name in names:
        cells = []
        for by_name in rows:
            r = by_name.get(name)
            cells += ["", "", ""] if r is None else [_mean_std(r["a_mean"], r["a_std"], n_a),
                                                     _mean_std(r["b_mean"], r["b_std"], n_b), _fmt(r["ratio"])]
        table.add_row(name, *cells, end_section=name == names[-1])
    summaries = [p["summary"] for p in pairs]
    for label, cell in ((f"share of layers with {direction} > 1", lambda s: f"{s['frac_above_1']:.0%}"),
                        (f"geometric-mean {direction}", lambda s: _fmt(s["geo_mean"])),
                        ("95% bootstrap CI", lambda s: f"{_fmt(s['ci_low'])}–{_fmt(s['ci_high'])}"),
                        ("sign test p", lambda s: _fmt(s["sign_p"], ".2g"))):
        table.add_row(label, *[c for s in summaries for c in ("", "", cell(s) if s["n_layers"] else "")])
    notes = [f"refused {p['label']}: {p['refused']}" for p in spec["pairs"] if p["refused"]]
    if pairs and not names:
        notes.append("no layer to compare" + (": r_u and r_v compare only weights that are approximately low rank "
                                              "in every run (see geomaudit svd)" if metric in ("r_u", "r_v") else ""))
    if notes:
        table.caption = "; ".join(notes)
    return [table]


def svd_tables(document: dict) -> list[Table]:
    """One table per checkpoint: a row per weight matrix with its spectrum summary, R_u and R_v (Sec. 6)."""
    settings = document["settings"]
    chosen = f"k = --rank {settings['rank']}" if settings["rank"] else f"k at {settings['energy']:g} of Σσ²"
    tables = []
    for ckpt in document["svd"]["checkpoints"]:
        step = "" if ckpt["step"] is None else f" step {ckpt['step']}"
        transposed = any(layer["note"].startswith("transposed") for layer in ckpt["layers"])
        convention = "matrices as (out, in)" + (", GPT-2 Conv1D weights transposed" if transposed else "")
        table = Table(title=f"{ckpt['path']}{step}: singular spectra, {convention}; {chosen}", title_justify="left")
        table.add_column("layer", overflow="fold", min_width=24)
        for col in ("matrix (out×in)", "method"):
            table.add_column(col)
        for col in ("k", "energy", "low-rank", "R_u", "R_v", "stable rank", "σ_1"):
            table.add_column(col, justify="right")
        for layer in ckpt["layers"]:
            table.add_row(layer["name"], "×".join(map(str, layer["matrix_shape"])), layer["method"], str(layer["k"]),
                          _fmt(layer["energy_top_k"], ".2f"), "yes" if layer["low_rank"] else "no",
                          _fmt(layer["r_u"]), _fmt(layer["r_v"]), _fmt(layer["stable_rank"]),
                          _fmt(layer["top_singular_values"][0]))
        table.caption = (f"energy: share of Σσ² in the top k; low-rank: k ≤ max(1, 10% of min(out, in)); "
                         f"{ckpt['skipped_1d']} tensors with fewer than 2 dimensions skipped")
        tables.append(table)
    return tables
