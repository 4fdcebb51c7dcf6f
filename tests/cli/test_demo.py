"""``geomaudit demo`` end to end with a reduced number of steps."""

import json

import jsonschema
from typer.testing import CliRunner

from geomaudit.cli import app
from geomaudit.report.document import schema

runner = CliRunner()


def test_demo_trains_both_runs_audits_and_compares(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--steps", "10", "--coords", "4"])
    assert result.exit_code == 0, result.output
    for run in ("adam", "sgd"):
        assert sorted(int(p.name.split("-")[1]) for p in (out / run).glob("checkpoint-*")) == list(range(1, 11))
        assert (out / run / "checkpoint-10" / "optimizer.pt").is_file()
        log = json.loads((out / run / "trainer_state.json").read_text())["log_history"]
        assert [e["step"] for e in log] == list(range(1, 11))
    for name in ("compare-steps", "rmed-adam", "rmed-sgd", "svd-adam", "svd-sgd"):
        jsonschema.validate(json.loads((out / f"{name}.json").read_text()), schema())
    steps = json.loads((out / "compare-steps.json").read_text())
    assert [p["step"] for p in steps["compare"]["pairs"]] == [4, 7, 10]  # a third, two thirds, the end
    assert steps["compare"]["runs"] == {"a": [str(out / "adam")], "b": [str(out / "sgd")]}
    last = steps["compare"]["pairs"][-1]["summary"]
    smaller = round(last["frac_above_1"] * last["n_layers"])
    assert f"at step 10: Adam's R_med is smaller on {smaller} of {last['n_layers']} layers" in result.stdout
    assert "final training loss: Adam" in result.stdout and "plots: " in result.stdout
    matched = json.loads((out / "compare-loss.json").read_text())
    jsonschema.validate(matched, schema())
    assert matched["compare"]["mode"] == "loss" and "at matched loss" in result.stdout
    assert (out / "compare-steps.png").stat().st_size > 10_000
    again = runner.invoke(app, ["demo", "--out", str(out), "--steps", "10"])
    assert again.exit_code == 2 and "is not empty" in again.stderr


def test_demo_errors(tmp_path):
    assert runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--steps", "1"]).exit_code == 2
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--text", str(tmp_path / "none.txt")])
    assert result.exit_code == 3 and "does not exist" in result.stderr
    (tmp_path / "short.txt").write_text("too short to train on\n")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "e"), "--text", str(tmp_path / "short.txt")])
    assert result.exit_code == 3 and "too short to train on" in result.stderr
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "empty-dir")
    (tmp_path / "empty-dir").mkdir()
    for out in (tmp_path / "file", tmp_path / "link"):
        result = runner.invoke(app, ["demo", "--out", str(out)])
        assert result.exit_code == 2 and f"--out {out} is not a folder" in result.stderr


def test_summary_sentences():
    from geomaudit.cli.demo import _summary

    pair = {"label": "step 300", "refused": None,
            "summary": {"n_layers": 28, "frac_above_1": 0.75, "geo_mean": 1.5, "ci_low": 1.1, "ci_high": 2.0,
                        "sign_p": 0.01}}
    reports = {"compare-steps": {"compare": {"pairs": [pair]}},
               "compare-loss": {"compare": {"pairs": [{"label": "loss 5.386", "refused": "too far", "summary": None}]}}}
    lines = _summary(reports, {"adam": [{"loss": 4.5}], "sgd": [{"loss": 4.75}]})
    assert lines == ["final training loss: Adam 4.500, SGD+M 4.750",
                     "at step 300: Adam's R_med is smaller on 21 of 28 layers; geometric-mean R_SGDM/R_Adam 1.50 "
                     "(95% CI 1.10–2.00), sign test p = 0.01",
                     "at matched loss 5.386: not compared (too far)"]
