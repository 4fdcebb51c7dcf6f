"""The tables of a report document, as :class:`~geomaudit.report.layout.Grid` objects (laid out by ``layout``)."""

from .layout import Cell, Column, Grid, Value, fmt, number

_fmt = fmt  # the plots' name for it

LAYER = Column("layer", right=False)
ZERO_NOTE = ("zero H: the sampled H_ii are zero to round-off (they change by more than 1% when recomputed in "
             "the other precision): no ratio, left out of comparisons and gates")
SATURATED_NOTE = "sat.: R_med_stab saturated (R_med ≥ 1000, R_med_stab < 1000 always): compare and gates use R_med"
MEDIAN_NOTE = "median≈0: the median |H_ii| is zero to round-off, so R_med is undefined"


CI_NOTE = ("R_med 95% CI: over the choice of coordinates, for this layer's R_med at this number of coordinates "
           "(see the README); ∞: the median may be 0; exact: every entry was sampled")


def _interval_cell(layer: dict, notes: set) -> Cell:
    """The layer's R_med interval, ``low–high``; ``exact`` for a layer sampled in full."""
    s = layer["stats"]
    low, high = s.get("r_med_ci_low"), s.get("r_med_ci_high")
    if layer.get("zero_hessian") or low is None:
        return Value("", "")
    notes.add(CI_NOTE)
    if layer["coords"] == layer["numel"]:
        return Value("exact", f"{low!r}–{high!r}")
    return Value(f"{fmt(low)}–{'∞' if high is None else fmt(high)}", f"{low!r}–{'inf' if high is None else repr(high)}")


def _ratio_cells(layer: dict, notes: set) -> list[Cell]:
    """R_med, R_med_stab and R_topk of a layer, marked where the tool cannot stand behind them (notes explain)."""
    s = layer["stats"]
    if layer.get("zero_hessian"):
        notes.add(ZERO_NOTE)
        return [Value("zero H", "zero_hessian")] * 3
    cells = [number(s["r_med"]), number(s["r_med_stab"]), number(s["r_topk"])]
    if (layer.get("roundoff") or {}).get("median_zero"):
        notes.add(MEDIAN_NOTE)
        cells[0] = Value("median≈0", "")
    if layer.get("saturated"):
        notes.add(SATURATED_NOTE)
        cells[1] = Value(f"{cells[1].text} sat.", cells[1].raw)
    return cells


def rmed_tables(document: dict) -> list[Grid]:
    """One table per audited checkpoint: a row per layer with the R_med family (SPEC §1)."""
    data, settings = document["data"], document["settings"]
    geometry, alignment = settings.get("geometry", False), settings.get("alignment", False)
    ci = settings.get("ci", False)
    heads = ["R_med", *(["R_med 95% CI"] if ci else []), "R_med_stab", f"R_top{settings['topk']}", "zero_frac",
             "median |H_ii|"]
    heads += ["S_med", "S_med from", "r_diag mean", "r_diag median"] if geometry else []
    heads += ["ρ(|g|, |H_ii|)", "ρ(|Adam step|, |H_ii|)"] if alignment else []
    grids = []
    for ckpt in document["checkpoints"]:
        step = "" if ckpt["step"] is None else f" step {ckpt['step']}"
        title = (f"{ckpt['path']}{step}: loss {ckpt['loss']:.4g} on {data['examples']} examples of {data['source']} "
                 f"({data['fingerprint'][:19]}…)")
        columns = [Column("shape", right=False), Column("coords")] + [
            Column(h, right=h != "S_med from") for h in heads]
        grid = Grid(title, [LAYER], columns, context={"checkpoint": ckpt["path"], "step": _text(ckpt["step"])},
                    label=f"{ckpt['path']}{step}")
        notes = set()
        for layer in ckpt["layers"]:
            s = layer["stats"]
            cells = [*_ratio_cells(layer, notes), number(s["zero_frac"], ".2f"), number(s["median_abs"])]
            if ci:
                cells.insert(1, _interval_cell(layer, notes))
            if geometry:
                cells += [number(s["s_med"]), layer["s_med_method"] or "", number(s["r_diag_mean"]),
                          number(s["r_diag_median"])]
            if alignment:
                cells += [number(layer["alignment"][k], ".2f") for k in ("spearman_grad", "spearman_step")]
            grid.add_row(layer["name"], "×".join(map(str, layer["shape"])), number(layer["coords"], "d"), *cells)
        if ckpt["across"]:
            a = ckpt["across"]
            notes.add(f"r_diag across {', '.join(a['layers'])}: mean {fmt(a['r_diag_mean'])}, "
                      f"median {fmt(a['r_diag_median'])}")
        if document["model"].get("float32_modules"):
            notes.add(f"not fp64 throughout, numbers only float32-accurate: "
                      f"{', '.join(document['model']['float32_modules'])} computed below float64")
        grid.caption = "\n".join(sorted(notes))
        grids.append(grid)
    return grids


def _text(x) -> str:
    return "" if x is None else str(x)


def _mean_std(mean: float | None, std: float | None, runs: int) -> Cell:
    if runs == 1 or mean is None:
        return number(mean)
    return Value(f"{fmt(mean)} ({fmt(std, '.2g')})", f"{mean!r} ({std!r})")


APART = {"above": "▲", "below": "▼"}


def _marked(cell: Cell, row: dict) -> Cell:
    """A ratio cell, marked ▲ / ▼ when the per-layer intervals put it above / below 1, and † when it compares
    another statistic than the table's (R_med for R_med_stab)."""
    mark = APART.get(row.get("apart"), "") + ("†" if row.get("metric") else "")
    return cell if not mark else Value(f"{cell}{mark}", cell.raw if isinstance(cell, Value) else str(cell))


def compare_tables(document: dict) -> list[Grid]:
    """The paper's shape (Tables 1, 2, 7): layers as rows, one column group (A, B, ratio) per pair of checkpoints,
    the pairs' losses on top and their summaries below; refused pairs are listed under the table. Laid out to a
    narrow screen, the pairs go to panels of their own."""
    spec = document["compare"]
    metric, direction = spec["metric"], spec["direction"]
    pairs = [p for p in spec["pairs"] if not p["refused"]]
    paired = spec.get("paired", False)
    columns = [Column(head, group=pair["label"]) for pair in pairs for head in ("A", "B", f"ratio {direction}")]
    grid = Grid(f"{metric}: A = {', '.join(spec['runs']['a'])}; B = {', '.join(spec['runs']['b'])}; "
                f"ratio {direction}" + (", mean (std) over paired runs" if paired else ""), [LAYER], columns,
                label=f"{metric}, ratio {direction}")

    def losses(pair, side) -> str:
        return ", ".join(f"{p['loss']:.4g}" + ("" if spec["mode"] == "step" else f" @{p['step']}") for p in pair[side])

    grid.add_row(f"loss ({spec['loss_source']})", *[c for p in pairs for c in (losses(p, "a"), losses(p, "b"), "")],
                 end_section=True)
    names = [row["name"] for row in pairs[0]["layers"]] if pairs else []
    rows = [{row["name"]: row for row in pair["layers"]} for pair in pairs]
    n_a, n_b = len(spec["runs"]["a"]), len(spec["runs"]["b"])
    for name in names:
        cells = []
        for by_name in rows:
            r = by_name.get(name)
            cells += ["", "", ""] if r is None else [_mean_std(r["a_mean"], r["a_std"], n_a),
                                                     _mean_std(r["b_mean"], r["b_std"], n_b),
                                                     _marked(_mean_std(r["ratio_mean"], r["ratio_std"], n_a)
                                                             if paired else number(r["ratio"]), r)]
        grid.add_row(name, *cells, end_section=name == names[-1])
    summaries = [p["summary"] for p in pairs]
    for label, cell in ((f"share of layers with {direction} > 1", lambda s: number(s["frac_above_1"], ".0%")),
                        (f"geometric-mean {direction}", lambda s: number(s["geo_mean"])),
                        ("95% bootstrap CI" + (" (repeats × layers)" if paired else ""),
                         lambda s: Value(f"{fmt(s['ci_low'])}–{fmt(s['ci_high'])}",
                                         f"{s['ci_low']!r}–{s['ci_high']!r}")),
                        ("sign test p", lambda s: number(s["sign_p"], ".2g")),
                        ("layers ▲ / ▼ (R_med intervals apart)",
                         lambda s: f"{s.get('layers_clearly_above_1', '')} / {s.get('layers_clearly_below_1', '')}"),
                        *(((f"repeats with geometric-mean {direction} > 1",
                            lambda s: f"{s['repeats_above_1']} of {s['n_repeats']}" if s["n_repeats"] > 1 else ""),)
                          if paired else ())):
        grid.add_row(label, *[c for s in summaries for c in ("", "", cell(s) if s["n_layers"] else "")])
    notes = [f"refused {p['label']}: {p['refused']}" for p in spec["pairs"] if p["refused"]]
    notes += [f"left out at {p['label']}: " + ", ".join(f"{x['name']} ({x['reason']})" for x in p["left_out"])
              for p in pairs if p.get("left_out")]
    if any(r.get("apart") for p in pairs for r in p["layers"]):
        notes.append(f"▲ / ▼: the 95% intervals of the layer's {metric} over the sampled coordinates (R_med 95% CI) "
                     f"lie apart in every run, {direction} above / below 1")
    if any(r.get("metric") for p in pairs for r in p["layers"]):
        notes.append("†: R_med_stab saturates (R_med ≥ 1000) in a run of this layer, so both sides are compared on "
                     "R_med")
    if pairs and not names:
        notes.append("no layer to compare" + (": r_u and r_v compare only weights that are approximately low rank "
                                              "in every run (see geomaudit svd)" if metric in ("r_u", "r_v") else ""))
    grid.caption = "; ".join(notes)
    return [grid]


def svd_tables(document: dict) -> list[Grid]:
    """One table per checkpoint: a row per weight matrix with its spectrum summary, R_u and R_v (Sec. 6)."""
    settings = document["settings"]
    chosen = f"k = --rank {settings['rank']}" if settings["rank"] else f"k at {settings['energy']:g} of Σσ²"
    grids = []
    for ckpt in document["svd"]["checkpoints"]:
        step = "" if ckpt["step"] is None else f" step {ckpt['step']}"
        transposed = any(layer["note"].startswith("transposed") for layer in ckpt["layers"])
        convention = "matrices as (out, in)" + (", GPT-2 Conv1D weights transposed" if transposed else "")
        columns = [Column("matrix (out×in)", right=False), Column("method", right=False)] + [
            Column(h) for h in ("k", "energy", "low-rank", "R_u", "R_v", "stable rank", "σ_1")]
        grid = Grid(f"{ckpt['path']}{step}: singular spectra, {convention}; {chosen}", [LAYER], columns,
                    caption=(f"energy: share of Σσ² in the top k; low-rank: k ≤ max(1, 10% of min(out, in)); "
                             f"{ckpt['skipped_1d']} tensors with fewer than 2 dimensions skipped"),
                    context={"checkpoint": ckpt["path"], "step": _text(ckpt["step"])}, label=f"{ckpt['path']}{step}")
        for layer in ckpt["layers"]:
            grid.add_row(layer["name"], "×".join(map(str, layer["matrix_shape"])), layer["method"],
                         number(layer["k"], "d"), number(layer["energy_top_k"], ".2f"),
                         "yes" if layer["low_rank"] else "no", number(layer["r_u"]), number(layer["r_v"]),
                         number(layer["stable_rank"]), number(layer["top_singular_values"][0]))
        grids.append(grid)
    return grids
