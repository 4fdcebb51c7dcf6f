"""Command-line conventions (issue 13, item 5) and options checked before any work (item 3)."""

import re

import pytest

from geomaudit import __version__

from .invoke import run

COMMANDS = ["rmed", "compare", "svd", "report", "demo", "experiment"]
WIDE = {"COLUMNS": "200"}
FAST = ["--coords", "4", "--layers", "transformer.h.1.mlp.*", "--batch-size", "4"]


@pytest.mark.parametrize("where", [[], ["rmed"], ["svd"], ["report"]])
def test_version_before_or_after_the_command(where):
    assert run(*where, "--version").stdout == f"geomaudit {__version__}\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_panels_flags_and_choices(command):
    short, long = run(command, "-h", env=WIDE).stdout, run(command, "--help", env=WIDE).stdout
    assert short == long and "Usage:" in short
    assert "<bool>" not in short  # flags take no value
    panels = re.findall(r"╭─ (.+?) ─", short)
    assert "Output" in panels and "Options" not in panels  # every option has its panel, -h/--help included
    if command in ("rmed", "compare"):
        assert {"Input", "Sampling", "Statistics", "Precision and device", "Output", "Gates (CI)"} <= set(panels)


@pytest.mark.parametrize("args, message", [
    (["compare", "a", "b", "--reference", "c"], "Invalid value for '--reference'"),
    (["rmed", "x", "--coords", "abc"], "Invalid value for '--coords'"),
    (["rmed"], "Missing argument 'CKPT'"),
    (["rmed", "x", "--bogus"], "No such option: --bogus"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_a_malformed_command_line_is_one_error_line_and_exit_2(args, message):
    """click's own errors read like every other error (found by the fuzz suite: they were a usage box)."""
    lines = run(*args, code=2).stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}") and lines[0].endswith(" -h)"), lines


def test_choices_are_shown_and_rmed_lists_only_its_own_metrics():
    compare = run("compare", "-h", env=WIDE).stdout
    assert "<a|b>" in compare and "<audit|trainer_state>" in compare and "r_u|r_v>" in compare
    rmed = run("rmed", "-h", env=WIDE).stdout
    metric = next(line for line in rmed.splitlines() if line.startswith("│ --metric"))
    assert "<r_med|r_med_stab|r_topk|s_med|r_diag_mean|r_diag_median>" in metric


def test_debug_after_the_command_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "none")
    plain = run("rmed", missing, code=3)
    assert "Traceback" not in plain.stderr
    for args in (["--debug", "rmed", missing], ["rmed", missing, "--debug"]):
        from typer.testing import CliRunner

        from geomaudit.cli import app

        result = CliRunner().invoke(app, args)
        assert result.exit_code == 3 and "Traceback" in result.stderr and "does not exist" in result.stderr


@pytest.mark.parametrize("args, phrase", [
    (["rmed", "{gpt2}", "--metric", "s_med", "--fail-above", "1"], "--metric s_med is computed with --smed"),
    (["rmed", "{gpt2}", "--metric", "r_med"], "--metric r_med picks the statistic of a gate"),
    (["rmed", "{gpt2}", "--dense-max", "10"], "--dense-max chooses how --smed computes S_med"),
    (["rmed", "{gpt2}", "--alignment"], "--alignment needs the optimizer state of every audited checkpoint"),
    (["compare", "{adam}", "{sgd}", "--levels", "5.0"], "--levels applies only with --match-loss"),
    (["compare", "{adam}", "{sgd}", "--tolerance", "0.1"], "--tolerance applies only with --match-loss"),
    (["compare", "{adam}", "{sgd}", "--rank", "2"], "--rank applies only with --metric r_u|r_v"),
    (["compare", "{adam}", "{sgd}", "--energy", "0.5"], "--energy applies only with --metric r_u|r_v"),
    (["compare", "{adam}", "{sgd}", "--metric", "r_diag_mean"], "--metric r_diag_mean is computed with --smed"),
    (["compare", "{adam}", "{sgd}", "--metric", "r_u", "--smed"], "--smed would be ignored"),
    (["rmed", "{adam}", "--json", "-", "--table"], "--json - writes the report to stdout"),
])
def test_options_are_checked_before_any_work(trainer_runs, tiny_gpt2_dir, args, phrase):
    """Each refusal comes before a checkpoint is even loaded (no `loading` line), with one sentence."""
    paths = {"gpt2": str(tiny_gpt2_dir), "adam": str(trainer_runs["adam-0"]), "sgd": str(trainer_runs["sgd-0"])}
    code = 3 if "optimizer state" in phrase else 2
    result = run(*(a.format(**paths) for a in args), *FAST, code=code)
    assert phrase in result.stderr and "loading" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
