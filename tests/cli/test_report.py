"""``geomaudit report``: saved reports of every command printed again, drawn to PNG, and refused when they are not
geomaudit reports."""

import json
import sys

import pytest

from .invoke import run

FAST = ["--coords", "8", "--layers", "transformer.h.1.mlp.*", "--batch-size", "4"]
PNG = b"\x89PNG\r\n\x1a\n"
WIDE, TALL = (480, 1200), (960, 1200)  # pixels of a 10×4 and a 10×8 inch figure at 120 dpi


@pytest.fixture(scope="module")
def reports(trainer_runs, loss_runs, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """A real report of each kind and the tables its command printed: ``{kind: (json path, stdout)}``.

    The loss curves of ``trainer_runs`` do not overlap, so --match-loss gets ``loss_runs``.
    """
    folder = tmp_path_factory.mktemp("reports")
    cache = ["--cache-dir", str(folder / "cache")]
    adam, sgd = loss_runs
    commands = {"rmed-run": ["rmed", str(trainer_runs["adam-0"]), *FAST, *cache],
                "rmed-checkpoint": ["rmed", str(trainer_runs["adam-0"] / "checkpoint-6"), *FAST, *cache],
                "compare": ["compare", str(adam), str(sgd), "--match-loss", *FAST, *cache],
                "svd": ["svd", str(trainer_runs["sgd-0"]), "--steps", "6"]}
    saved = {}
    for kind, args in commands.items():
        path = str(folder / f"{kind}.json")
        printed = run(*args).stdout
        run(*args, "--json", path)
        saved[kind] = (path, printed)
    return saved


@pytest.mark.parametrize("kind", ["rmed-run", "rmed-checkpoint", "compare", "svd"])
def test_report_prints_the_tables_of_the_command_that_saved_it(reports, kind):
    path, printed = reports[kind]
    assert "layer" in printed
    assert run("report", path).stdout == printed


@pytest.mark.parametrize("kind, pixels", [("rmed-run", WIDE), ("rmed-checkpoint", WIDE), ("compare", TALL),
                                          ("svd", WIDE)])
def test_plot_writes_a_png_of_the_expected_size(reports, kind, pixels, tmp_path):
    from matplotlib import image

    out = tmp_path / f"{kind}.png"
    result = run("report", reports[kind][0], "--plot", str(out))
    assert f"wrote {out}" in result.stderr and result.stdout == ""
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000
    pixels_read = image.imread(out)
    assert pixels_read.shape[:2] == pixels and pixels_read.std() > 0
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the temporary file was renamed, nothing left


def test_compare_plot_draws_the_loss_of_every_checkpoint_not_only_the_paired_ones(reports, loss_runs):
    from matplotlib.figure import Figure

    from geomaudit.report.plots import _compare_figure

    document = json.loads(open(reports["compare"][0]).read())
    losses = document["compare"]["losses"]
    assert sorted((p["run"], p["step"]) for p in losses) == sorted(
        (str(run), int(c.name.split("-")[1])) for run in loss_runs for c in run.glob("checkpoint-*"))
    paired = {(p["run"], p["step"]) for pair in document["compare"]["pairs"] for side in "ab" for p in pair[side]}
    assert len(paired) < len(losses)
    top = _compare_figure(Figure, document).axes[0]
    drawn = {(line.get_label(), x, y) for line in top.lines[:2] for x, y in zip(*line.get_data())}
    assert drawn == {(f"run {'A' if p['run'] == str(loss_runs[0]) else 'B'}", p["step"], p["loss"]) for p in losses}


def test_plot_metric_is_a_statistic_of_an_rmed_report(reports, tmp_path):
    out = str(tmp_path / "r.png")
    run("report", reports["rmed-run"][0], "--plot", out, "--metric", "r_topk")
    assert "audit with --smed" in run("report", reports["rmed-run"][0], "--plot", out, "--metric", "s_med",
                                      code=2).stderr
    assert "compared r_med_stab" in run("report", reports["compare"][0], "--plot", out, "--metric", "r_med",
                                        code=2).stderr
    assert "plots its spectra" in run("report", reports["svd"][0], "--plot", out, "--metric", "r_med", code=2).stderr


def test_plot_of_a_compare_without_comparable_layers(reports, tmp_path):
    """A pair with no layer (r_u over weights none of which is low rank) or with no defined ratio still plots."""
    from matplotlib import image

    document = json.loads(open(reports["compare"][0]).read())
    first, second = document["compare"]["pairs"][:2]
    first["layers"], first["summary"]["n_layers"] = [], 0
    for row in second["layers"]:
        row["a_mean"] = row["ratio"] = None
    second["summary"] = dict.fromkeys(second["summary"], None) | {
        "n_layers": 0, "n_repeats": second["summary"]["n_repeats"], "layers_clearly_above_1": 0,
        "layers_clearly_below_1": 0}
    path, out = tmp_path / "c.json", tmp_path / "c.png"
    path.write_text(json.dumps(document))
    run("report", str(path), "--plot", str(out))
    assert image.imread(out).shape[:2] == TALL


def test_plot_without_matplotlib_names_the_extra(reports, tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    out = tmp_path / "r.png"
    result = run("report", reports["svd"][0], "--plot", str(out), code=2)
    assert "pip install 'geomaudit[plot]'" in result.stderr and not out.exists()


def test_plot_into_a_missing_folder_is_a_usage_error(reports, tmp_path):
    result = run("report", reports["svd"][0], "--plot", str(tmp_path / "nowhere" / "r.png"), code=2)
    assert "does not exist" in result.stderr


@pytest.mark.parametrize("content, phrase", [
    (None, "does not exist"),
    ("{not json", "is not valid JSON"),
    ("[" * 100_000, "nested too deeply"),
    ('{"schema": "geomaudit.report/1", "x": NaN}', "NaN is not a JSON number"),
    ('{"schema": "geomaudit.report/1", "x": 1e999}', "1e999 is too large for a float"),
    (b"\xff\xfe", "is not UTF-8 text"),
    ("[1, 2]", "is not a geomaudit report"),
    ('{"schema": "geomaudit.report/1", "command": "x\\ud800"}', "holds a lone surrogate (U+D800)"),  # fuzz case
    ('{"schema": "lm-eval/1", "results": {}}', "is not a geomaudit report"),
    ('{"schema": "geomaudit.report/2", "command": "rmed", "checkpoints": [{}]}', "from a newer geomaudit"),
    ('{"schema": "geomaudit.report/1", "command": "rmed", "checkpoints": []}', "'data' is a required property"),
])
def test_a_file_that_is_not_a_readable_report_is_an_input_error(tmp_path, content, phrase):
    path = tmp_path / "result.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = run("report", str(path), code=3)
    assert phrase in result.stderr and result.stderr.count("\n") == 1



@pytest.mark.parametrize("edit, phrase", [
    (lambda d: d["checkpoints"][0]["layers"][0].update(h_diag="x" * 10_000), "layers[0].h_diag: 'xxxx"),
    (lambda d: d["checkpoints"][0].pop("layers"), "checkpoints[0]: 'layers' is a required property"),
    (lambda d: d.update(command="plot"), "command: 'plot' is not one of"),
    (lambda d: d["checkpoints"][0]["layers"][0]["stats"].update(r_med="big"), "stats.r_med: 'big' is not of type"),
    (lambda d: d.update(checkpoints=[{}] * 3), "'path' is a required property"),
])
def test_a_report_that_breaks_the_schema_is_an_input_error_saying_where(reports, tmp_path, edit, phrase):
    document = json.loads(open(reports["rmed-run"][0]).read())
    edit(document)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(document))
    result = run("report", str(path), code=3)
    assert f"{path} is not a valid geomaudit report: " in result.stderr and phrase in result.stderr
    assert result.stderr.count("\n") == 1 and len(result.stderr) < 400


def test_a_device_is_not_read_as_a_report():
    assert "is not a regular file" in run("report", "/dev/zero", code=3).stderr


def test_a_valid_report_without_results_is_an_input_error(reports, tmp_path):
    document = json.loads(open(reports["rmed-run"][0]).read()) | {"checkpoints": []}
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(document))
    assert "holds no results" in run("report", str(path), code=3).stderr
