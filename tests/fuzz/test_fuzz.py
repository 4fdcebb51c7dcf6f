"""The command line under fuzzing (issue 10): hundreds of corrupted inputs of every kind, each run as a user would
run it, each judged by the promises of SPEC §4 — exit 0, 2 or 3 (5 for an output fault), one error line,
no traceback, no output file on failure, no device or link replaced, no code from a checkpoint executed, no hang,
at most 3 GiB. ``benchmarks/fuzz.py`` runs the same generator for longer."""

import pytest

from .cases import KINDS, Builder, custom_code_case, generate
from .harness import INPUT_CODES, MARKER, Case, Fuzzer, Outcome, node, problems, run_cases
from .seeds import build_seeds, warm_up_commands

CASES = 600  # about a minute on 2 cores
SEED = 0


@pytest.fixture(scope="module")
def fuzzing(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    seeds = build_seeds(work / "seeds")
    with Fuzzer(seeds, warm_up_commands(seeds), work / "worker.log") as fuzzer:
        yield fuzzer, seeds, work
        fuzzer.close()


def test_every_input_kind_keeps_the_promises(fuzzing):
    fuzzer, seeds, work = fuzzing
    tally = run_cases(fuzzer, generate(seeds, work / "cases", CASES, SEED), work)
    print(tally.summary())
    assert not tally.failures, f"{tally.summary()}\n\n{tally.details()}"
    assert set(tally.kinds) == set(KINDS) and min(tally.kinds.values()) >= 10
    assert {0, 2, 3, 5} <= set(tally.codes)  # the cases reach success, usage, input and output outcomes


def test_an_auto_map_checkpoint_never_runs_its_code(fuzzing):
    """transformers runs a checkpoint's Python files for ``auto_map`` once told to trust them, and asks on stdout
    when not told: geomaudit never lets it, even when stdin answers "y", and never prompts."""
    import random

    fuzzer, seeds, work = fuzzing
    seen = set()
    for i in range(40):
        case = custom_code_case(Builder(seeds, work / "auto_map" / str(i), random.Random(i)))
        seen.add(case.what)
        outcome = fuzzer.run(case)
        assert not list(case.cwd.rglob(f"{MARKER}*")), case.what
        assert "[y/N]" not in outcome.stdout + outcome.stderr and "custom code" not in outcome.stdout
        assert outcome.code in INPUT_CODES and not outcome.timed_out, (case.what, outcome.stderr)
    assert {f"{name} with auto_map in {where}" for name in ("gpt2", "bert")
            for where in ("config", "tokenizer", "both")} <= seen


def _outcome(code=3, stderr="error: the data is bad\n", **changes) -> Outcome:
    return Outcome(code=code, timed_out=False, seconds=0.1, max_rss_mib=400, stdout="", stderr=stderr) \
        if not changes else Outcome(**({"code": code, "timed_out": False, "seconds": 0.1, "max_rss_mib": 400,
                                        "stdout": "", "stderr": stderr} | changes))


def test_the_judge_catches_every_broken_promise(tmp_path):
    """``problems`` is what the fuzz tests rest on: each broken promise must be reported."""
    case = Case("data", "x", ["rmed"], tmp_path, out=tmp_path / "out.json")
    assert problems(case, _outcome(), tmp_path, {}) == []
    assert problems(case, _outcome(0, "loading x\nwrote out.json\n"), tmp_path, {}) == []
    found = {
        "exit-4": _outcome(4, "internal error: KeyError\n"),
        "exit code 1": _outcome(1, "error: gate\n"),
        "hang": _outcome(timed_out=True, code=-9),
        "memory": _outcome(max_rss_mib=4000),
        "stderr noise": _outcome(stderr="Traceback (most recent call last)\nerror: x\n"),
        "stderr is not one error line": _outcome(stderr="error: x\nerror: y\n"),
    }
    for category, outcome in found.items():
        assert any(p.startswith(category) for p in problems(case, outcome, tmp_path, {})), category
    (tmp_path / ".out.json.abc.tmp").write_text("partial")
    assert any(p.startswith("output file left") for p in problems(case, _outcome(), tmp_path, {}))
    (tmp_path / ".out.json.abc.tmp").unlink()
    (tmp_path / f"{MARKER}-evil").write_text("ran")
    assert any(p.startswith("code execution") for p in problems(case, _outcome(), tmp_path, {}))
    device = tmp_path / "dev"
    device.write_text("")
    before = {device: ("a character device", 0, 0)}
    assert any(p.startswith("replaced") for p in problems(case, _outcome(2), tmp_path, before))
    assert node(device) is not None
