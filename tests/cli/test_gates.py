"""CI gates that hold (issue 13, item 4): every offender listed, nothing compared is a failure, refused pairs fail,
and the baseline gate of an audit against an earlier report of the same coordinates and batch."""

import copy
import json

import pytest

from geomaudit import gates
from geomaudit.errors import InputError, ThresholdFailed, UsageError

from .invoke import report, run

FAST = ["--coords", "8", "--layers", "transformer.h.1.mlp.*", "--batch-size", "4"]
NAMES = ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.bias", "transformer.h.1.mlp.c_proj.weight",
         "transformer.h.1.mlp.c_proj.bias"]


def test_fail_above_lists_every_layer_above_and_still_writes_the_report(trainer_runs, tmp_path):
    a = str(trainer_runs["adam-0"])
    out = tmp_path / "r.json"
    result = run("rmed", a, *FAST, "--steps", "4,6", "--fail-above", "1", "--json", str(out), code=1)
    document = json.loads(out.read_text())
    values = {(c["step"], la["name"]): la["stats"]["r_med_stab"] for c in document["checkpoints"] for la in c["layers"]}
    above = {k: v for k, v in values.items() if v > 1}
    assert above and f"above --fail-above 1 in {len(above)} of 8 layers" in result.stderr
    for (step, name), value in above.items():
        assert f"{name} at step {step} ({value:.4g})" in result.stderr
    assert [line.startswith("error:") for line in result.stderr.splitlines()].count(True) == 1  # one reason
    highest = max(values.values())
    run("rmed", a, *FAST, "--steps", "4,6", "--fail-above", f"{highest * 1.01}")


def test_every_pair_below_is_listed(trainer_runs):
    a, b = str(trainer_runs["adam-0"]), str(trainer_runs["sgd-0"])
    result = run("compare", a, b, *FAST, "--fail-if-ratio-below", "1e9", code=1)
    assert "--fail-if-ratio-below 1e+09 fails on 3 of 3 pairs" in result.stderr
    assert all(f"step {s} has a geometric-mean ratio of" in result.stderr for s in (2, 4, 6))
    run("compare", a, b, *FAST, "--fail-if-ratio-below", "1e-9")


def test_nothing_compared_fails_the_gate(trainer_runs):
    """r_u with k = 2: no 16-wide weight is low rank, nothing is compared: the gate fails instead of passing."""
    a, b = str(trainer_runs["adam-0"]), str(trainer_runs["sgd-0"])
    args = ["compare", a, b, "--steps", "6", "--metric", "r_u", "--rank", "2", "--batch-size", "4"]
    assert "no layer to compare" in run(*args).stdout  # without a gate: a report, exit 0
    result = run(*args, "--fail-if-ratio-below", "1.5", code=1)
    assert "fails on 1 of 1 pairs: step 6 compared no layer" in result.stderr


def test_a_refused_pair_fails_the_gate(loss_runs):
    a, b = map(str, loss_runs)
    level = report("compare", a, b, "--match-loss", *FAST)["compare"]["pairs"][1]["level"]
    result = run("compare", a, b, "--match-loss", "--levels", f"{level},9.0", *FAST, "--fail-if-ratio-below", "1e-9",
                 code=1)
    assert "fails on 1 of 2 pairs: loss 9.000 was refused (no common loss near 9" in result.stderr


@pytest.fixture(scope="module")
def baseline(trainer_runs, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("baseline") / "adam.json"
    run("rmed", str(trainer_runs["adam-0"]), *FAST, "--steps", "6", "--json", str(path))
    return str(path)


def test_baseline_gate_per_layer(trainer_runs, baseline, tmp_path):
    adam, sgd = str(trainer_runs["adam-0"]), str(trainer_runs["sgd-0"])
    run("rmed", adam, *FAST, "--steps", "6", "--baseline", baseline, "--fail-if-increase", "1.0001")  # the same
    out = tmp_path / "sgd.json"
    result = run("rmed", sgd, *FAST, "--steps", "6", "--baseline", baseline, "--fail-if-increase", "1",
                 "--json", str(out), code=1)
    then = {la["name"]: la["stats"]["r_med_stab"] for la in json.loads(open(baseline).read())["checkpoints"][0]["layers"]}
    now = {la["name"]: la["stats"]["r_med_stab"] for la in json.loads(out.read_text())["checkpoints"][0]["layers"]}
    grew = [n for n in NAMES if now[n] / then[n] > 1]
    assert grew and f"grew more than ×1 over --baseline {baseline} in {len(grew)} of 4 layers" in result.stderr
    assert all((f"{n} at step 6 ({then[n]:.4g} → {now[n]:.4g}" in result.stderr) == (n in grew) for n in NAMES)
    both = run("rmed", sgd, *FAST, "--steps", "6", "--baseline", baseline, "--fail-if-increase", "1",
               "--fail-above", "1", code=1)
    assert "above --fail-above 1" in both.stderr and "; and r_med_stab grew more than ×1" in both.stderr


@pytest.mark.parametrize("extra, phrase, code", [
    (["--coords", "5"], "was audited with --coords 8, this audit with --coords 5", 3),
    (["--seed", "1"], "was audited with --seed 0, this audit with --seed 1", 3),
    (["--fail-if-increase", "0"], "--fail-if-increase is a factor above 0", 2),
])
def test_a_baseline_on_other_coordinates_is_refused_before_any_work(trainer_runs, baseline, extra, phrase, code):
    args = ["rmed", str(trainer_runs["adam-0"]), *FAST, "--steps", "6", "--baseline", baseline,
            "--fail-if-increase", "1.5", *extra]
    result = run(*args, code=code)
    assert phrase in result.stderr and "loading" not in result.stderr


def test_baseline_refusals(trainer_runs, loss_runs, baseline, tmp_path):
    adam = str(trainer_runs["adam-0"])
    gate = ["--baseline", baseline, "--fail-if-increase", "1.5"]
    assert "go together" in run("rmed", adam, *FAST, "--baseline", baseline, code=2).stderr
    assert "go together" in run("rmed", adam, *FAST, "--fail-if-increase", "2", code=2).stderr
    other = run("rmed", adam, *FAST[:4], "--batch-size", "2", "--steps", "6", *gate, code=3)
    assert "was audited on another batch" in other.stderr
    steps = run("rmed", adam, *FAST, "--steps", "4,6", *gate, code=3)
    assert "has no checkpoint at step 4 to compare with" in steps.stderr
    layers = run("rmed", adam, "--coords", "8", "--batch-size", "4", "--layers", "transformer.h.1.*", "--steps", "6",
                 *gate, code=3)
    assert "has no layer transformer.h.1.ln_1.weight at step 6" in layers.stderr
    a, b = map(str, loss_runs)
    compared = tmp_path / "c.json"
    run("compare", a, b, "--match-loss", *FAST, "--json", str(compared))
    assert "is a report of geomaudit compare, not of rmed" in run(
        "rmed", adam, *FAST, "--baseline", str(compared), "--fail-if-increase", "2", code=3).stderr


def test_gates_on_documents():
    """The reasons and refusals no audit on the command line reaches."""
    layer = {"name": "w", "indices": [0, 1], "stats": {"r_med_stab": None}}
    document = {"data": {"fingerprint": "sha256:0"}, "checkpoints": [{"path": "p", "step": 3, "layers": [layer]}]}
    assert gates.fail_above(document, 10, "r_med_stab") == ("r_med_stab is above --fail-above 10 in 1 of 1 layers: "
                                                            "w at step 3 (undefined)")
    with pytest.raises(UsageError, match="--metric s_med is not among this audit's statistics"):
        gates.fail_above(document, 10, "s_med")
    empty = {"data": {"fingerprint": "sha256:0"}, "checkpoints": [{"path": "p", "step": 3, "layers": []}]}
    assert "holds on nothing" in gates.fail_above(empty, 10, "r_med_stab")
    assert "holds on nothing" in gates.fail_if_increase(empty, empty, "b.json", 2, "r_med_stab")
    assert "holds on nothing" in gates.fail_if_ratio_below({"compare": {"pairs": []}}, 1.5)
    moved = copy.deepcopy(document)
    moved["checkpoints"][0]["layers"][0]["indices"] = [0, 2]
    with pytest.raises(InputError, match="sampled other coordinates of w"):
        gates.fail_if_increase(document, moved, "b.json", 2, "r_med_stab")
    assert "(undefined → undefined, ×undefined)" in gates.fail_if_increase(document, document, "b.json", 2,
                                                                         "r_med_stab")
    zero, sat = dict(layer, name="z", zero_hessian=True), dict(layer, name="s", saturated=True,
                                                               stats={"r_med_stab": 900.0, "r_med": 5000.0})
    old = {"data": {"fingerprint": "sha256:0"}, "checkpoints": [{"path": "p", "step": 3, "layers": [
        zero, dict(sat, saturated=False, stats={"r_med_stab": 800.0, "r_med": 900.0})]}]}
    new = copy.deepcopy(old)
    new["checkpoints"][0]["layers"] = [zero, sat]
    notes = []
    assert gates.fail_if_increase(new, old, "b.json", 2, "r_med_stab", notes.append) == (
        "r_med_stab grew more than ×2 over --baseline b.json in 1 of 1 layers: s at step 3 (900 → 5000, ×5.556, "
        "r_med: r_med_stab saturates)")  # R_med_stab, 800 → 900, would have hidden it
    assert notes == ["--fail-if-increase skips z: Hessian zero to round-off, no ratio"]
    with pytest.raises(ThresholdFailed, match="^a; and b$"):
        gates.conclude(["a", None, "b"])
    gates.conclude([None])
