"""``geomaudit experiment`` and its preset ``geomaudit demo`` end to end, with a few steps."""

import json
import math

import jsonschema
import numpy as np
import pytest

from geomaudit.compare import verdict
from geomaudit.experiment import ExperimentConfig
from geomaudit.report.document import schema

from .invoke import report, run

LAYERS = ["--layers", "transformer.h.1.mlp.*", "--layers", "transformer.ln_f.weight"]
SHORT = ["--steps", "4", "--repeats", "2", "--coords", "3", *LAYERS]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "out"
    result = run("experiment", "--out", str(out), *SHORT)
    return out, result.stdout


def test_trains_the_repeats_and_writes_trainer_style_runs(experiment):
    out, stdout = experiment
    assert sorted(p.name for p in out.iterdir() if p.name[-2] == "-") == ["adam-0", "adam-1", "sgdm-0", "sgdm-1"]
    for run_dir in ("adam-0", "sgdm-1"):
        assert sorted(p.name for p in (out / run_dir).glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, 5)]
        log = json.loads((out / run_dir / "trainer_state.json").read_text())["log_history"]
        assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert "final training loss, Adam: " in stdout and "(std " in stdout and "over 2 repeats" in stdout
    assert "time: training " in stdout
    # the runs are ordinary inputs: Adam's optimizer.pt in the Trainer's order is read by --alignment
    aligned = report("rmed", str(out / "adam-0" / "checkpoint-4"), "--data", str(out / "audit-batch.safetensors"),
                     "--coords", "4", "--layers", "transformer.h.0.mlp.c_fc.weight", "--alignment")
    assert aligned["checkpoints"][0]["layers"][0]["alignment"]["spearman_step"] is not None


def test_tables_are_the_per_repeat_reports_mean_and_std(experiment):
    """Each cell against numbers computed by hand from `geomaudit rmed` reports of every run on its own."""
    out, stdout = experiment
    document = json.loads((out / "compare-adam-steps.json").read_text())
    jsonschema.validate(document, schema())
    assert document["compare"]["paired"] and document["experiment"]["repeats"] == 2
    assert document["experiment"]["compared"] == {"a": "adam", "b": "sgdm", "ratio": "R_SGDM/R_Adam"}
    assert [p["step"] for p in document["compare"]["pairs"]] == [2, 4]
    pair = document["compare"]["pairs"][1]
    per_run = {}
    for name in ("adam-0", "adam-1", "sgdm-0", "sgdm-1"):
        alone = report("rmed", str(out / name), "--steps", "4", "--data", str(out / "audit-batch.safetensors"),
                       "--batch-size", "16", "--coords", "3", *LAYERS, "--no-cache")
        per_run[name] = {la["name"]: la["stats"] for la in alone["checkpoints"][0]["layers"]}
    matrix = []
    for row in pair["layers"]:
        metric = row["metric"] or "r_med_stab"  # r_med where r_med_stab saturates
        adam = [per_run[f"adam-{r}"][row["name"]][metric] for r in (0, 1)]
        sgdm = [per_run[f"sgdm-{r}"][row["name"]][metric] for r in (0, 1)]
        ratios = [sgdm[r] / adam[r] for r in (0, 1)]
        matrix.append(ratios)
        assert (row["a_mean"], row["a_std"]) == pytest.approx((np.mean(adam), np.std(adam, ddof=1)), rel=1e-12)
        assert (row["b_mean"], row["b_std"]) == pytest.approx((np.mean(sgdm), np.std(sgdm, ddof=1)), rel=1e-12)
        assert (row["ratio_mean"], row["ratio_std"]) == pytest.approx((np.mean(ratios), np.std(ratios, ddof=1)),
                                                                      rel=1e-12)
        assert f"{row['ratio_mean']:.3g} ({row['ratio_std']:.2g})" in stdout
    assert len(matrix) + len(pair["left_out"]) == 5
    s = pair["summary"]
    assert s["geo_mean"] == pytest.approx(math.exp(np.mean(np.log(matrix))), rel=1e-12)
    assert s["n_repeats"] == 2 and s["ci_over"] == "repeats and layers"
    assert f"at step 4: {verdict(s, 'R_SGDM/R_Adam')}" in stdout
    assert "\nverdict, R_SGDM/R_Adam: " in stdout


def test_matched_loss_pairs_each_repeat_at_its_own_step(experiment):
    out, stdout = experiment
    document = json.loads((out / "compare-adam-loss.json").read_text())
    jsonschema.validate(document, schema())
    assert document["compare"]["mode"] == "loss" and document["compare"]["paired"]
    for pair in document["compare"]["pairs"]:
        assert [p["run"] for p in pair["a"]] == [str(out / "adam-0"), str(out / "adam-1")]
        assert [p["run"] for p in pair["b"]] == [str(out / "sgdm-0"), str(out / "sgdm-1")]
        said = f"not compared ({pair['refused']})" if pair["refused"] else verdict(pair["summary"], "R_SGDM/R_Adam")
        assert f"at matched {pair['label']}: {said}" in stdout
    assert (out / "compare-adam-loss.png").stat().st_size > 10_000
    again = run("report", str(out / "compare-adam-loss.json")).stdout
    assert "repeats with geometric-mean B/A > 1" in again


def test_demo_is_the_experiment_with_its_defaults():
    import typer.main

    from geomaudit.cli import app

    commands = typer.main.get_command(app).commands
    defaults = {p.name: p.default for p in commands["experiment"].params}
    config = ExperimentConfig()
    assert defaults["optimizers"] == ",".join(config.optimizers)
    for name in ("repeats", "steps", "coords", "seed", "device", "text", "switch_at", "blocks"):
        assert defaults[name] == getattr(config, name), name
    assert config.layers == () and defaults["layers"] is None
    assert defaults["targets"].value == config.targets
    demo = {p.name: p.default for p in commands["demo"].params}
    assert set(demo) == {"out", "steps", "device", "seed", "text", "coords", "debug", "version"}
    assert all(demo[k] == defaults[k] for k in demo if k != "out")


def test_errors(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "is not empty" in run("demo", "--out", str(tmp_path / "full"), code=2).stderr
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty-dir")
    for out in (tmp_path / "file", tmp_path / "link"):
        assert f"--out {out} is not a folder" in run("demo", "--out", str(out), code=2).stderr
    result = run("experiment", "--out", str(tmp_path / "d"), "--text", str(tmp_path / "none.txt"), code=3)
    assert "does not exist" in result.stderr
    (tmp_path / "short.txt").write_text("too short to train on\n")
    result = run("demo", "--out", str(tmp_path / "e"), "--text", str(tmp_path / "short.txt"), code=3)
    assert "too short to train on" in result.stderr
    (tmp_path / "medium.txt").write_text(" ".join(f"line {i} of the text" for i in range(2000)))
    result = run("experiment", "--out", str(tmp_path / "f"), "--text", str(tmp_path / "medium.txt"), "--blocks",
                 "5000", code=3)
    assert "--blocks 5000: the text gives only" in result.stderr
    assert "exactly one baseline" in run("experiment", "--optimizers", "adam,adamw", code=2).stderr
    assert "--steps must be at least 2" in run("demo", "--steps", "1", code=2).stderr
    assert not (tmp_path / "d").exists()


def test_the_overall_verdict_counts_the_compared_points():
    from geomaudit.cli.experiment import overall

    def s(effect, repeats=4):
        return {"effect": effect, "n_repeats": repeats}

    assert overall("R_SGDM/R_Adam", [s("above_1"), s("above_1"), s("none")]) == (
        "verdict, R_SGDM/R_Adam: 2 of 3 compared points above 1, 1 of 3 compared points with an interval that "
        "includes 1 (95% intervals over 4 repeats and the layers)")
    assert overall("B/A", [s("below_1"), s("none")]).startswith("verdict, B/A: 1 of 2 compared points below 1, ")
    assert overall("B/A", [s("none")] * 5) == (
        "verdict, B/A: no effect found: at each of the 5 compared points the interval includes 1")
    one = overall("B/A", [s("above_1", repeats=1)] * 2)
    assert "no effect can be told" in one and "above" not in one
