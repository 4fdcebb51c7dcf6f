"""``geomaudit compare`` and trajectories on real Trainer runs; the result cache; the CI gates."""

import json
import math
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from .invoke import report, run

FAST = ["--coords", "8", "--layers", "transformer.h.1.mlp.*", "--batch-size", "8"]


def stats_by_checkpoint(document: dict, metric: str = "r_med_stab") -> dict:
    return {(c["run"], c["step"]): {la["name"]: la["stats"][metric] for la in c["layers"]}
            for c in document["checkpoints"]}


def test_rmed_on_a_run_audits_every_picked_checkpoint_on_one_batch(trainer_runs):
    adam = trainer_runs["adam-0"]
    document = report("rmed", str(adam), *FAST)
    assert [c["step"] for c in document["checkpoints"]] == [2, 4, 6]
    assert document["trajectories"][0]["steps"] == [2, 4, 6]
    state = json.loads((adam / "trainer_state.json").read_text())
    logged = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    for ckpt in document["checkpoints"]:
        assert ckpt["logged_loss"] == logged[ckpt["step"]] and ckpt["run"] == str(adam)
        first = document["checkpoints"][0]["layers"]
        assert [la["indices"] for la in ckpt["layers"]] == [la["indices"] for la in first]
    assert [c["step"] for c in report("rmed", str(adam), *FAST, "--steps", "2,6")["checkpoints"]] == [2, 6]
    assert [c["step"] for c in report("rmed", str(adam), *FAST, "--every", "4")["checkpoints"]] == [4]
    table = run("rmed", str(adam), *FAST).stdout
    assert all(f"step {s}" in table for s in (2, 4, 6))


def test_compare_at_equal_steps(trainer_runs):
    a, b = trainer_runs["adam-0"], trainer_runs["sgd-0"]
    document = report("compare", str(a), str(b), *FAST)
    spec = document["compare"]
    assert spec["mode"] == "step" and spec["direction"] == "B/A" and spec["loss_source"] == "audit"
    assert [p["label"] for p in spec["pairs"]] == ["step 2", "step 4", "step 6"]
    values = stats_by_checkpoint(document)
    for pair in spec["pairs"]:
        va, vb = values[(str(a), pair["step"])], values[(str(b), pair["step"])]
        ratios = [vb[r["name"]] / va[r["name"]] for r in pair["layers"]]
        assert [r["ratio"] for r in pair["layers"]] == pytest.approx(ratios)
        assert pair["summary"]["frac_above_1"] == pytest.approx(np.mean(np.array(ratios) > 1))
        assert pair["summary"]["geo_mean"] == pytest.approx(math.exp(np.mean(np.log(ratios))))
        assert pair["summary"]["ci_low"] <= pair["summary"]["geo_mean"] <= pair["summary"]["ci_high"]
        bounds = {(c["run"], la["name"]): (la["stats"]["r_med_stab_ci_low"], la["stats"]["r_med_stab_ci_high"])
                  for c in document["checkpoints"] if c["step"] == pair["step"] for la in c["layers"]}
        for r in pair["layers"]:  # per-layer claims only where the R_med_stab intervals of A and B lie apart
            (a_lo, a_hi), (b_lo, b_hi) = bounds[(str(a), r["name"])], bounds[(str(b), r["name"])]
            assert r["apart"] == ("above" if b_lo > a_hi else "below" if b_hi < a_lo else "overlap")
        assert pair["summary"]["layers_clearly_above_1"] == sum(r["apart"] == "above" for r in pair["layers"])
    inverted = report("compare", str(a), str(b), *FAST, "--reference", "b")["compare"]["pairs"][0]
    expected = [1 / r["ratio"] for r in spec["pairs"][0]["layers"]]
    assert [r["ratio"] for r in inverted["layers"]] == pytest.approx(expected)
    assert "ratio B/A" in run("compare", str(a), str(b), *FAST).stdout


def test_several_seeds_give_mean_and_std(trainer_runs):
    parent = trainer_runs["adam-0"].parent
    document = report("compare", str(parent / "adam-*"), str(parent / "sgd-*"), *FAST, "--steps", "6")
    values = stats_by_checkpoint(document)
    pair = document["compare"]["pairs"][0]
    assert [p["run"] for p in pair["a"]] == [str(parent / "adam-0"), str(parent / "adam-1")]
    for row in pair["layers"]:
        a = [values[(str(parent / f"adam-{s}"), 6)][row["name"]] for s in (0, 1)]
        b = [values[(str(parent / f"sgd-{s}"), 6)][row["name"]] for s in (0, 1)]
        assert row["a_mean"] == pytest.approx(np.mean(a)) and row["a_std"] == pytest.approx(np.std(a, ddof=1))
        assert row["b_mean"] == pytest.approx(np.mean(b)) and row["b_std"] == pytest.approx(np.std(b, ddof=1))
        assert row["ratio"] == pytest.approx(np.mean(b) / np.mean(a))
    again = report("compare", str(parent / "adam-0"), str(parent / "sgd-0"), "--a", str(parent / "adam-1"),
                   "--b", str(parent / "sgd-1"), *FAST, "--steps", "6")
    assert again["compare"]["pairs"][0]["layers"] == pair["layers"]


def test_paired_runs_give_per_repeat_ratios_and_an_interval_over_repeats(trainer_runs):
    parent = trainer_runs["adam-0"].parent
    document = report("compare", str(parent / "adam-*"), str(parent / "sgd-*"), "--paired", *FAST, "--steps", "6")
    values = stats_by_checkpoint(document)
    pair = document["compare"]["pairs"][0]
    assert document["compare"]["paired"] is True
    matrix = []
    for row in pair["layers"]:
        per_repeat = [values[(str(parent / f"sgd-{s}"), 6)][row["name"]] / values[(str(parent / f"adam-{s}"), 6)][
            row["name"]] for s in (0, 1)]
        matrix.append(per_repeat)
        assert row["ratios"] == pytest.approx(per_repeat)
        assert row["ratio_mean"] == pytest.approx(np.mean(per_repeat))
        assert row["ratio_std"] == pytest.approx(np.std(per_repeat, ddof=1))
    s = pair["summary"]
    assert s["n_repeats"] == 2 and s["ci_over"] == "repeats and layers"
    assert s["geo_mean"] == pytest.approx(math.exp(np.mean(np.log(matrix))))
    assert s["repeats_above_1"] == sum(np.mean(np.log(col)) > 0 for col in np.array(matrix).T)
    table = run("compare", str(parent / "adam-*"), str(parent / "sgd-*"), "--paired", *FAST, "--steps", "6").stdout
    assert "repeats with geometric-mean B/A > 1" in table and f"{s['repeats_above_1']} of 2" in table
    assert f"{pair['layers'][0]['ratio_mean']:.3g} ({pair['layers'][0]['ratio_std']:.2g})" in table
    uneven = run("compare", str(parent / "adam-*"), str(parent / "sgd-0"), "--paired", *FAST, code=2)
    assert "--paired needs as many runs in A as in B, got 2 and 1" in uneven.stderr


def test_match_loss_pairs_within_tolerance_and_refuses_beyond(loss_runs):
    a, b = map(str, loss_runs)
    document = report("compare", a, b, "--match-loss", *FAST)
    pairs = document["compare"]["pairs"]
    assert len(pairs) == 3 and all(p["refused"] is None for p in pairs)
    for pair in pairs:
        for point in pair["a"] + pair["b"]:
            assert abs(point["loss"] - pair["level"]) / pair["level"] <= 0.02
    losses = {(c["run"], c["step"]): c["loss"] for c in document["checkpoints"]}
    assert all(losses[(p["run"], p["step"])] == p["loss"] for pair in pairs for p in pair["a"] + pair["b"])
    given = report("compare", a, b, "--match-loss", "--levels", f"{pairs[1]['level']},9.0", *FAST)["compare"]["pairs"]
    assert given[0]["refused"] is None and given[0]["layers"] == pairs[1]["layers"]
    assert "no common loss near 9" in given[1]["refused"] and "beyond the tolerance" in given[1]["refused"]
    assert given[1]["layers"] == [] and given[1]["summary"] is None
    table = run("compare", a, b, "--match-loss", "--levels", f"{pairs[1]['level']},9.0", *FAST).stdout
    assert "refused loss 9.000: no common loss near 9" in table
    none = run("compare", a, b, "--match-loss", "--tolerance", "1e-9", *FAST, code=3)
    assert "nothing was compared" in none.stderr


def test_losses_from_trainer_state(loss_runs):
    a, b = map(str, loss_runs)
    document = report("compare", a, b, "--match-loss", "--loss-from", "trainer_state", *FAST)
    assert document["compare"]["loss_source"] == "trainer_state"
    logged = {}
    for run_dir in loss_runs:
        state = json.loads((run_dir / "trainer_state.json").read_text())
        logged |= {(str(run_dir), e["step"]): e["loss"] for e in state["log_history"] if "loss" in e}
    for pair in document["compare"]["pairs"]:
        for point in pair["a"] + pair["b"]:
            assert point["loss"] == logged[(point["run"], point["step"])]


def test_a_second_compare_is_served_from_the_cache(trainer_runs, cache_dir):
    a, b = str(trainer_runs["adam-0"]), str(trainer_runs["sgd-0"])
    first = report("compare", a, b, *FAST)
    assert not any(la["cached"] for c in first["checkpoints"] for la in c["layers"])
    second = report("compare", a, b, *FAST)
    assert all(la["cached"] for c in second["checkpoints"] for la in c["layers"])
    assert second["compare"]["pairs"] == first["compare"]["pairs"]
    fresh = report("compare", a, b, *FAST, "--no-cache")
    assert not any(la["cached"] for c in fresh["checkpoints"] for la in c["layers"])
    for entry in cache_dir.glob("*.json"):
        entry.write_text('{"key": {}, "loss": 1.0, "layers": ')
    result = run("compare", a, b, *FAST, "--json", "-")
    assert "corrupt cache entry" in result.stderr
    recomputed = json.loads(result.stdout)
    assert not any(la["cached"] for c in recomputed["checkpoints"] for la in c["layers"])
    assert recomputed["compare"]["pairs"] == first["compare"]["pairs"]


INTERRUPTING = textwrap.dedent("""
    import os
    import torch
    from torch import nn

    calls = 0

    def build():
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    def mse(model, batch):
        global calls
        calls += 1
        if calls == int(os.environ.get("STOP_AT_CALL", "0")):
            raise KeyboardInterrupt
        # + a term in a weight outside the output: no Hessian backpropagation, HVPs layer by layer (interruptible)
        return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean() + 0 * model[0].weight.sum()
""")


def test_an_interrupted_audit_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stopper.py").write_text(INTERRUPTING)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    (tmp_path / "run").mkdir()
    save_file(net.state_dict(), tmp_path / "run" / "step_5.safetensors")
    save_file({"x": torch.randn(10, 3), "y": torch.randn(10)}, tmp_path / "data.safetensors")
    args = ["rmed", "run", "--model", "stopper:build", "--loss", "stopper:mse", "--data", "data.safetensors"]
    # call 1: the loss; 2: the Hessian backpropagation's check (refused); 3, 4: layers 0.weight, 0.bias; 5: 2.weight
    monkeypatch.setenv("STOP_AT_CALL", "5")
    run(*args, code=130)
    monkeypatch.setenv("STOP_AT_CALL", "0")
    resumed = report(*args)["checkpoints"][0]["layers"]
    assert [la["cached"] for la in resumed] == [True, True, False, False]
    fresh = report(*args, "--no-cache")["checkpoints"][0]["layers"]
    assert [la["h_diag"] for la in resumed] == [la["h_diag"] for la in fresh]


def test_compare_errors(trainer_runs, tmp_path):
    a, b = str(trainer_runs["adam-0"]), str(trainer_runs["sgd-0"])
    assert "matches no file" in run("compare", a, str(tmp_path / "nothing-*"), *FAST, code=3).stderr
    assert "is not one of" in run("compare", a, b, "--reference", "c", *FAST, code=2).stderr
    assert "is not one of" in run("compare", a, b, "--loss-from", "x", *FAST, code=2).stderr
    assert "comma-separated numbers" in run("compare", a, b, "--match-loss", "--levels", "low", *FAST, code=2).stderr
    for option, value, phrase in (("--tolerance", "-1", "--tolerance is a relative distance, at least 0"),
                                  ("--tolerance", "nan", "--tolerance is a relative distance"),
                                  ("--levels", "0.5,-1", "--levels takes positive losses, got 0.5,-1.0"),
                                  ("--levels", "inf", "--levels takes positive losses"),
                                  ("--energy", "0", "--energy is a share"), ("--rank", "0", "--rank must be")):
        metric = ["--metric", "r_u"] if option in ("--energy", "--rank") else []
        result = run("compare", a, b, "--match-loss", *metric, option, value, *FAST, code=2)
        assert phrase in result.stderr and "loading" not in result.stderr  # before any checkpoint is read
    from geomaudit.errors import UsageError
    from geomaudit.pipeline import AuditConfig, CompareConfig

    with pytest.raises(UsageError, match="--reference must be a or b"):
        CompareConfig((a,), (b,), reference="c").validate(AuditConfig(a))
    with pytest.raises(UsageError, match="--loss-from must be one of"):
        AuditConfig(a, loss_from="x").validate()
    with pytest.raises(UsageError, match="--levels applies only with --match-loss"):
        CompareConfig((a,), (b,), levels=(1.0,)).validate(AuditConfig(a))


def test_runs_without_a_common_step(trainer_runs, tiny_gpt2_dir):
    result = run("compare", str(trainer_runs["adam-0"]), str(tiny_gpt2_dir), *FAST, code=3)
    assert "share no step" in result.stderr


def test_a_lone_checkpoint_has_a_step_only_when_its_name_says_so(trainer_runs, tiny_gpt2_dir):
    from geomaudit.io.trajectory import discover

    assert discover(tiny_gpt2_dir).checkpoints[0].step is None  # the folder is named tiny-gpt2<n>
    assert discover(trainer_runs["adam-0"] / "checkpoint-4").checkpoints[0].step == 4


def test_smed_and_r_diag_through_rmed_compare_and_the_cache(trainer_runs):
    a, b = str(trainer_runs["adam-0"]), str(trainer_runs["sgd-0"])
    args = ["--coords", "12", "--layers", "transformer.h.1.ln_2.*", "--layers", "transformer.h.1.mlp.c_fc.weight",
            "--batch-size", "8", "--steps", "6", "--smed", "--dense-max", "100"]
    first = report("rmed", a, *args)
    layers = first["checkpoints"][0]["layers"]
    assert [la["s_med_method"] for la in layers] == ["dense", "dense", "submatrix"]
    assert all(la["stats"]["s_med"] >= 1 and la["stats"]["r_diag_median"] >= 0 for la in layers)
    second = report("rmed", a, *args)
    assert all(la["cached"] for la in second["checkpoints"][0]["layers"])
    assert [la["stats"] for la in second["checkpoints"][0]["layers"]] == [la["stats"] for la in layers]
    assert "S_med" in run("rmed", a, *args).stdout
    pair = report("compare", a, b, *args, "--metric", "s_med")["compare"]["pairs"][0]
    values = {la["name"]: la["stats"]["s_med"] for la in layers}
    assert [r["a_mean"] for r in pair["layers"]] == pytest.approx([values[r["name"]] for r in pair["layers"]])


def test_r_diag_across_layers_on_the_command_line(trainer_runs):
    args = ["rmed", str(trainer_runs["adam-0"]), "--steps", "6", "--coords", "6", "--batch-size", "4",
            "--layers", "transformer.h.1.*", "--smed", "--across", "transformer.h.1.mlp.c_*.weight"]
    document = report(*args)
    across = document["checkpoints"][0]["across"]
    assert across["layers"] == ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"]
    joint = [la for la in document["checkpoints"][0]["layers"] if la["name"] in across["layers"]]
    assert all(la["stats"]["r_diag_across_mean"] >= la["stats"]["r_diag_mean"] for la in joint)
    assert "r_diag across transformer.h.1.mlp.c_fc.weight" in run(*args).stdout


def test_compare_r_u_of_low_rank_weights_matches_geomaudit_svd(trainer_runs):
    parent = trainer_runs["adam-0"].parent
    args = ["--steps", "6", "--layers", "transformer.h.*.weight", "--rank", "1"]
    pair = report("compare", str(parent / "adam-*"), str(parent / "sgd-*"), *args, "--batch-size", "4",
                  "--metric", "r_u")["compare"]["pairs"][0]
    r_u = {}
    for run_dir in sorted(parent.glob("*-[01]")):
        svd = report("svd", str(run_dir), *args)["svd"]["checkpoints"][0]["layers"]
        r_u[run_dir.name] = {la["name"]: la["r_u"] for la in svd}
    assert len(pair["layers"]) == 8
    for row in pair["layers"]:
        a = [r_u[f"adam-{s}"][row["name"]] for s in (0, 1)]
        b = [r_u[f"sgd-{s}"][row["name"]] for s in (0, 1)]
        assert row["a_mean"] == pytest.approx(np.mean(a)) and row["b_mean"] == pytest.approx(np.mean(b))
    # with k = 2 no 16-wide weight is low rank (k <= max(1, 10% of 16)): nothing is compared, as the table says
    table = run("compare", str(parent / "adam-0"), str(parent / "sgd-0"), "--steps", "6", "--rank", "2",
                "--metric", "r_u", "--batch-size", "4").stdout
    assert "no layer to compare" in table
    gate = run("rmed", str(parent / "adam-0"), *FAST, "--steps", "6", "--metric", "r_u", "--fail-above", "2", code=2)
    assert "is not one of" in gate.stderr  # rmed --metric lists only what rmed computes
