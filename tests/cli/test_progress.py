"""The plan line, progress without a terminal, ``--dry-run`` and one ``loading`` line per checkpoint (issue 13.2)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from .invoke import run

REPO = Path(__file__).resolve().parents[2]
FAST = ["--coords", "3", "--layers", "transformer.h.1.mlp.*", "--batch-size", "4"]
PLAN = ("plan: 2 checkpoints × 4 layers, 12 coordinates per checkpoint, 1 micro-batch: 48 HVPs in all "
        "(24 for the coordinates, up to 24 to check round-off)")
LINE = re.compile(r"audited ([\d,]+) of ([\d,]+) HVPs \(checkpoint (\d) of 2, (?:layer \d of 4|round-off check of "
                  r"\d layers)\), \d+:\d\d elapsed(, about \d+:\d\d left)?")


def test_without_a_terminal_progress_comes_as_plain_lines_with_counts(trainer_runs, tmp_path):
    env = os.environ | {"GEOMAUDIT_PROGRESS_INTERVAL": "0", "GEOMAUDIT_CACHE_DIR": str(tmp_path / "cache"),
                        "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-m", "geomaudit", "rmed", str(trainer_runs["adam-0"]), "--steps", "2,4",
                            *FAST, "--json", str(tmp_path / "r.json")], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert child.returncode == 0, child.stderr
    lines = child.stderr.splitlines()
    assert PLAN in lines
    progress = [LINE.fullmatch(line) for line in lines if line.startswith("audited ")]
    assert progress and all(progress), lines
    done = [int(m[1].replace(",", "")) for m in progress]
    assert done == sorted(done) and {m[3] for m in progress} == {"1", "2"}
    assert done[-1] == int(progress[-1][2].replace(",", "")) and 24 < done[-1] <= 48  # the real round-off count
    assert any(m[4] for m in progress)  # the time left, once an HVP has run
    assert lines.index(PLAN) < lines.index(next(line for line in lines if line.startswith("audited ")))


def test_a_bad_progress_interval_is_a_usage_error(tiny_gpt2_dir):
    result = run("rmed", str(tiny_gpt2_dir), *FAST, code=2, env={"GEOMAUDIT_PROGRESS_INTERVAL": "soon"})
    assert "GEOMAUDIT_PROGRESS_INTERVAL is the number of seconds between progress lines" in result.stderr


def test_dry_run_prints_the_plan_and_computes_nothing(trainer_runs, cache_dir, tmp_path):
    out = tmp_path / "r.json"
    result = run("rmed", str(trainer_runs["adam-0"]), "--steps", "2,4", *FAST, "--json", str(out), "--dry-run",
                 "--fail-above", "0.5")
    assert PLAN in result.stderr.splitlines() and "dry run: no loss or Hessian computed" in result.stderr
    assert "checkpoint-2" in result.stdout and "checkpoint-4" in result.stdout and "checkpoint-6" not in result.stdout
    assert "transformer.h.1.mlp.c_fc.weight" in result.stdout and "16×64" in result.stdout
    assert not out.exists() and list(cache_dir.iterdir()) == []  # no report, no loss nor Hessian cached
    assert "loading" in result.stderr and result.stderr.count("loading") == 1  # the first checkpoint only


def test_compare_dry_run_plans_the_paired_checkpoints(trainer_runs, loss_runs, cache_dir):
    a, b = str(trainer_runs["adam-0"]), str(trainer_runs["sgd-0"])
    result = run("compare", a, b, *FAST, "--dry-run")
    assert "plan: 6 checkpoints × 4 layers" in result.stderr
    assert list(cache_dir.iterdir()) == []
    # by audit loss, the pairs are not known before the losses: every checkpoint, said to be an upper bound
    adam, sgd = map(str, loss_runs)
    result = run("compare", adam, sgd, *FAST, "--match-loss", "--dry-run", "--format", "csv")
    assert "plan: 14 checkpoints × 4 layers" in result.stderr and "at most" in result.stderr
    assert "transformer.h.1.mlp.c_proj.bias,16,3,3" in result.stdout and list(cache_dir.iterdir()) == []
    # by logged loss, they are
    result = run("compare", adam, sgd, *FAST, "--match-loss", "--loss-from", "trainer_state", "--dry-run")
    planned = int(re.search(r"plan: (\d+) checkpoints", result.stderr)[1])
    assert 2 <= planned <= 6 and "at most" not in result.stderr


def test_each_checkpoint_is_announced_once(trainer_runs):
    """compare loads a checkpoint for its loss and again to audit it: one ``loading`` line all the same."""
    a, b = str(trainer_runs["adam-0"]), str(trainer_runs["sgd-0"])
    result = run("compare", a, b, *FAST, "--steps", "2,4", "--json", "-")
    loading = [line for line in result.stderr.splitlines() if line.startswith("loading ")]
    assert sorted(loading) == sorted(f"loading {run}/checkpoint-{step}" for run in (a, b) for step in (2, 4))
    assert [line.split(" (")[1] for line in result.stderr.splitlines() if line.startswith("auditing ")] == [
        f"checkpoint {i} of 4)" for i in (1, 2, 3, 4)]
