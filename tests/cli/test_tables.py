"""Tables never lose a value: every cell of every report kind is printed whole at 100 and 80 columns, in a pipe,
as Markdown and as CSV (``geomaudit.report.layout``)."""

import csv
import io
import json

import pytest

from geomaudit.report.layout import Column, Grid, number, panels, write
from geomaudit.report.tables import compare_tables, rmed_tables, svd_tables

from .invoke import run

FAST = ["--coords", "8", "--batch-size", "4"]
RENDER = {"rmed": rmed_tables, "compare": compare_tables, "svd": svd_tables}


@pytest.fixture(scope="module")
def saved(trainer_runs, loss_runs, tmp_path_factory) -> dict[str, str]:
    """A report of each kind with as many columns as it gets: rmed with --smed and --alignment over two
    checkpoints, compare --match-loss (three pairs), svd."""
    folder = tmp_path_factory.mktemp("tables")
    adam, sgd = map(str, loss_runs)
    commands = {"rmed": ["rmed", str(trainer_runs["adam-0"]), "--steps", "4,6", "--smed", "--alignment",
                         "--layers", "transformer.h.1.*", *FAST],
                "compare": ["compare", adam, sgd, "--match-loss", *FAST],
                "svd": ["svd", str(trainer_runs["sgd-0"]), "--steps", "6"]}
    paths = {}
    for kind, args in commands.items():
        paths[kind] = str(folder / f"{kind}.json")
        run(*args, "--json", paths[kind])
    return paths


def printed_rows(text: str) -> dict[str, list[list[str]]]:
    """The cells of every table row printed, by the row's first cell, one list per panel it appears in."""
    rows: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows.setdefault(cells[0], []).append(cells[1:])
    return rows


@pytest.mark.parametrize("columns", [100, 80])
@pytest.mark.parametrize("kind", ["rmed", "compare", "svd"])
def test_every_value_is_printed_whole_at_the_terminal_width(saved, kind, columns):
    document = json.loads(open(saved[kind]).read())
    out = run("report", saved[kind], env={"COLUMNS": str(columns)}).stdout
    assert max(map(len, out.splitlines())) <= columns
    assert "…" not in out.replace("…)", "")  # the data fingerprint in rmed titles is shortened on purpose
    printed = printed_rows(out)
    seen: dict[str, int] = {}  # rows of that key consumed by earlier grids (the checkpoints of a run)
    for grid in RENDER[kind](document):
        count = len(panels(grid, columns))
        assert (count > 1) == (kind != "compare" or columns < 140)  # the wide ones were split
        for row in grid.rows:
            key, *cells = [str(c) for c in row]
            start = seen.get(key, 0)
            assert sum(printed[key][start:start + count], []) == cells, key
            seen[key] = start + count
        heads = " ".join(line for line in out.splitlines() if line.startswith("┃"))
        assert all(col.header in heads for col in grid.columns)
        assert grid.title.split()[0] in out
        assert not grid.caption or " ".join(grid.caption.split(";")[0].split()) in " ".join(out.split())


def test_the_issue_s_lost_values_are_there_at_100_columns(saved):
    """compare --match-loss kept its third pair, summaries and whole intervals; rmed its median |H_ii|; svd its
    stable rank and σ_1 (issue 13, item 1)."""
    compare = json.loads(open(saved["compare"]).read())["compare"]
    out = run("report", saved["compare"], env={"COLUMNS": "100"}).stdout
    rows = printed_rows(out)
    for pair in compare["pairs"]:
        assert pair["label"] in out
        s = pair["summary"]
        assert f"{s['ci_low']:.3g}–{s['ci_high']:.3g}" in [c for p in rows["95% bootstrap CI"] for c in p]
        for layer in pair["layers"]:
            mark = "†" if layer.get("metric") else ""  # compared on R_med: R_med_stab saturates (c_attn)
            assert f"{layer['ratio']:.3g}{mark}" in [c for p in rows[layer["name"]] for c in p]
    rmed = json.loads(open(saved["rmed"]).read())
    rows = printed_rows(run("report", saved["rmed"], env={"COLUMNS": "100"}).stdout)
    for layer in rmed["checkpoints"][-1]["layers"]:
        assert f"{layer['stats']['median_abs']:.3g}" in [c for p in rows[layer["name"]] for c in p]
    svd = json.loads(open(saved["svd"]).read())
    rows = printed_rows(run("report", saved["svd"], env={"COLUMNS": "100"}).stdout)
    for layer in svd["svd"]["checkpoints"][0]["layers"]:
        cells = [c for p in rows[layer["name"]] for c in p]
        assert f"{layer['stable_rank']:.3g}" in cells and f"{layer['top_singular_values'][0]:.3g}" in cells


def test_a_pipe_gets_every_column_in_one_table_however_wide(monkeypatch, saved):
    monkeypatch.delenv("COLUMNS", raising=False)
    grid = Grid("wide", [Column("layer", right=False)], [Column(f"column {i}") for i in range(40)])
    grid.add_row("a.weight", *(number(1000.5 + i, ".6g") for i in range(40)))
    out = io.StringIO()
    write([grid], out)
    rows = [line for line in out.getvalue().splitlines() if line.startswith("│")]
    assert len(rows) == 1 and len(rows[0]) > 200
    assert [c.strip() for c in rows[0].strip("│").split("│")] == ["a.weight", *(f"{1000.5 + i}" for i in range(40))]
    compare = run("report", saved["compare"]).stdout
    assert sum(line.startswith("┃") for line in compare.splitlines()) == 2  # one table: one two-line header


def test_a_panel_narrower_than_its_cells_folds_them_instead_of_cutting(monkeypatch):
    grid = Grid("narrow", [Column("layer", right=False)], [Column("ratio")])
    grid.add_row("bert.encoder.layer.5.attention.output.LayerNorm.weight", number(0.123456, ".6f"))
    out = io.StringIO()
    write([grid], out, width=30)
    lines = out.getvalue().splitlines()
    assert max(map(len, lines)) <= 30
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in lines if line.startswith("│")]
    assert "".join(c[0] for c in cells) == "bert.encoder.layer.5.attention.output.LayerNorm.weight"
    assert all(c[0].endswith(".") for c in cells[:-1])  # broken after dots
    assert "".join(c[1] for c in cells) == "0.123456"


@pytest.mark.parametrize("kind", ["rmed", "compare", "svd"])
def test_markdown_and_csv(saved, kind):
    document = json.loads(open(saved[kind]).read())
    grids = RENDER[kind](document)
    md = run("report", saved[kind], "--format", "md").stdout
    table_rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table_rows) == sum(len(g.rows) + 1 for g in grids)
    assert all(f"| {g.rows[-1][0]} |" in md for g in grids)
    rows = list(csv.reader(io.StringIO(run("report", saved[kind], "--format", "csv").stdout)))
    assert len(rows) == 1 + sum(len(g.rows) for g in grids) and len({len(r) for r in rows}) == 1
    header = rows[0]
    if kind == "rmed":
        first = document["checkpoints"][0]
        row = next(r for r in rows if r[header.index("layer")] == first["layers"][0]["name"])
        assert row[header.index("step")] == str(first["step"]) and row[header.index("checkpoint")] == first["path"]
        assert float(row[header.index("median |H_ii|")]) == first["layers"][0]["stats"]["median_abs"]
        assert float(row[header.index("r_diag median")]) == first["layers"][0]["stats"]["r_diag_median"]
    elif kind == "compare":
        pair = document["compare"]["pairs"][-1]
        row = next(r for r in rows if r[0] == pair["layers"][0]["name"])
        assert float(row[header.index(f"{pair['label']} ratio B/A")]) == pair["layers"][0]["ratio"]
        summary = next(r for r in rows if r[0] == "geometric-mean B/A")
        assert float(summary[header.index(f"{pair['label']} ratio B/A")]) == pair["summary"]["geo_mean"]
    else:
        layer = document["svd"]["checkpoints"][0]["layers"][0]
        row = next(r for r in rows if r[header.index("layer")] == layer["name"])
        assert float(row[header.index("σ_1")]) == layer["top_singular_values"][0]


def test_json_with_the_table_too(trainer_runs, tmp_path):
    args = ["svd", str(trainer_runs["sgd-0"]), "--steps", "6"]
    path = tmp_path / "s.json"
    both = run(*args, "--json", str(path), "--table")
    assert "stable rank" in both.stdout and path.is_file()
    assert json.loads(path.read_text())["command"] == "svd"
    assert run(*args, "--json", str(tmp_path / "t.json"), "--format", "csv").stdout.startswith("checkpoint,step,layer")
    assert run(*args, "--json", str(tmp_path / "u.json")).stdout == ""
    refused = run(*args, "--json", "-", "--table", code=2)
    assert "--json - writes the report to stdout" in refused.stderr


def test_layout_refuses_what_it_cannot_lay_out():
    grid = Grid("g", [Column("layer")], [Column("x")])
    with pytest.raises(ValueError, match="a row of 3 cells in a grid of 2 columns"):
        grid.add_row("a", "1", "2")
    other = Grid("h", [Column("layer")], [Column("y")])
    with pytest.raises(ValueError, match="different columns cannot share one CSV"):
        write([grid, other], io.StringIO(), "csv")
    with pytest.raises(ValueError, match="format must be one of table, md, csv"):
        write([grid], io.StringIO(), "html")
