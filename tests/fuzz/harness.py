"""Run fuzz cases through the command line and judge each outcome against the promises of SPEC §4 and issue 10.

Every case, whatever its input:
- exits 0, 2 (usage) or 3 (input) — or what the case expects (5 for an output fault) — never 4 (a bug), never a
  signal, never past its time limit (a hang);
- on failure prints exactly one ``error:`` line, as the last line of stderr, and no traceback or warning;
- leaves no output file (nor temporary file) when it fails, replaces no device, pipe, folder or link;
- executes nothing from a checkpoint (a marker file would appear) and stays under the memory bound.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MEMORY_BOUND_MIB = 3 * 1024
TIMEOUT_S = 60
INPUT_CODES = frozenset({0, 2, 3})
STATUS_PREFIXES = ("loading ", "checkpoint ", "note: ", "auditing ", "ignoring a corrupt cache entry", "wrote ",
                   "audit batch: ", "plan: ", "estimate: ", "audited ", "dry run: ")
MARKER = "EXECUTED"  # a file whose name starts with this, anywhere in the work folder: a checkpoint's code ran


@dataclass
class Case:
    """One run of the command line on a corrupted input."""

    kind: str  # the input kind (a key of ``cases.KINDS``)
    what: str  # the corruption, for the report
    args: list[str]
    cwd: Path
    expect: frozenset[int] = INPUT_CODES
    stdout_mode: str = "file"  # file | closed | full | broken-pipe
    stdin: str = ""
    fsize: int | None = None  # bytes any written file may reach (a full disk)
    out: Path | None = None  # the output file that must not exist after a failure
    nodes: tuple[Path, ...] = ()  # paths (devices, links …) that must be the same node afterwards
    check: Callable[["Outcome"], str | None] | None = None  # a case-specific check: the problem, or None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    code: int
    timed_out: bool
    seconds: float
    max_rss_mib: float
    stdout: str
    stderr: str


def node(path: Path) -> tuple | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_mode, st.st_ino, st.st_rdev


class Fuzzer:
    """A warm worker process (``tests.fuzz.worker``) that runs cases in forked children."""

    def __init__(self, seeds: dict[str, Path], warm_up: list[list[str]], log: Path):
        env = os.environ | {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200",
                            "GEOMAUDIT_CACHE_DIR": str(log.parent / "default-cache")}
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.worker"], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self._send(warm_up)
        ready = self._receive()
        self.address_space = ready["vm_bytes"] + MEMORY_BOUND_MIB * 2**20
        self.seeds = seeds

    def _send(self, message) -> None:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def _receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fuzz worker stopped; see {self.log.name}")
        return json.loads(line)

    def run(self, case: Case) -> Outcome:
        out, err = case.cwd / ".stdout", case.cwd / ".stderr"
        self._send({"args": case.args, "cwd": str(case.cwd), "stdout": str(out), "stderr": str(err),
                    "stdout_mode": case.stdout_mode, "stdin": case.stdin, "fsize": case.fsize, "env": case.env,
                    "timeout": TIMEOUT_S, "address_space": self.address_space})
        r = self._receive()
        read = (lambda p: p.read_text(errors="replace") if p.is_file() else "")
        outcome = Outcome(r["code"], r["timed_out"], r["seconds"], r["max_rss_mib"], read(out), read(err))
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        return outcome

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return False


def problems(case: Case, outcome: Outcome, work: Path, before: dict[Path, tuple | None]) -> list[str]:
    """What went wrong with ``case``, as (category, detail) strings; empty when it kept every promise."""
    found = []
    lines = [ln for ln in outcome.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "internal error:"))]
    if outcome.timed_out:
        found.append(f"hang: still running after {TIMEOUT_S} s")
    elif outcome.code == 4 or outcome.code >= 97 or outcome.code < 0:
        found.append(f"exit-{outcome.code}: {(errors or lines or ['(no stderr)'])[-1][:300]}")
    elif outcome.code not in case.expect:
        found.append(f"exit code {outcome.code}, expected one of {sorted(case.expect)}: "
                     f"{(errors or lines or ['(no stderr)'])[-1][:300]}")
    if outcome.max_rss_mib > MEMORY_BOUND_MIB:
        found.append(f"memory: {outcome.max_rss_mib:.0f} MiB")
    if any(w in outcome.stderr for w in ("Traceback", "Warning", "warn(", "Exception ignored")):
        found.append(f"stderr noise: {outcome.stderr[-300:]!r}")
    if not outcome.timed_out and outcome.code not in (0, 1):
        stray = [ln for ln in lines[:-1] if not ln.startswith(STATUS_PREFIXES)]
        if len(errors) != 1 or not lines or lines[-1] != errors[0] or stray:
            found.append(f"stderr is not one error line: {outcome.stderr[-300:]!r}")
    if case.out is not None and outcome.code not in (0, 1):
        left = [p.name for p in case.out.parent.glob(f"*{case.out.name}*") if p not in before]
        if left:
            found.append(f"output file left after a failure: {left}")
    for path, was in before.items():
        if node(path) != was:
            found.append(f"replaced: {path} was {was}, now {node(path)}")
    executed = [p for p in work.rglob(f"{MARKER}*")]
    if executed:
        found.append(f"code execution: {executed[0]}")
        for p in executed:
            p.unlink()
    if case.check and not found:
        extra = case.check(outcome)
        if extra:
            found.append(extra)
    return found


@dataclass
class Tally:
    """What a fuzz run found, by category, and the exit codes it saw."""

    cases: int = 0
    codes: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    failures: list[tuple[int, Case, list[str]]] = field(default_factory=list)
    slowest: tuple[float, str] = (0.0, "")
    biggest: tuple[float, str] = (0.0, "")
    seconds: float = 0.0

    def add(self, number: int, case: Case, outcome: Outcome, found: list[str]) -> None:
        self.cases += 1
        self.codes[outcome.code] += 1
        self.kinds[case.kind] += 1
        self.seconds += outcome.seconds
        if outcome.max_rss_mib > self.biggest[0]:
            self.biggest = (outcome.max_rss_mib, f"case {number} ({case.kind}: {case.what})")
        if outcome.seconds > self.slowest[0]:
            self.slowest = (outcome.seconds, f"case {number} ({case.kind}: {case.what})")
        if found:
            self.failures.append((number, case, found))

    def categories(self) -> Counter:
        return Counter(p.split(":")[0] for _, _, found in self.failures for p in found)

    def summary(self) -> str:
        cats = self.categories()
        return "\n".join([
            f"{self.cases} cases ({', '.join(f'{k} {n}' for k, n in sorted(self.kinds.items()))})",
            f"exit codes: {', '.join(f'{c}: {n}' for c, n in sorted(self.codes.items()))}",
            f"code execution: {cats['code execution']}, devices/links replaced: {cats['replaced']}, "
            f"exit 4: {sum(n for c, n in cats.items() if c.startswith('exit-'))}, hangs: {cats['hang']}, "
            f"over {MEMORY_BOUND_MIB // 1024} GiB: {cats['memory']}, other failures: "
            f"{sum(n for c, n in cats.items() if not c.startswith(('exit-', 'code execution', 'replaced', 'hang', 'memory')))}",
            f"slowest case {self.slowest[0]:.1f} s: {self.slowest[1]}",
            f"peak memory {self.biggest[0]:.0f} MiB: {self.biggest[1]}; {self.seconds:.0f} s in the cases",
        ])

    def details(self, limit: int = 40) -> str:
        return "\n".join(f"case {n} [{c.kind}] {c.what}\n  geomaudit {' '.join(c.args)[:400]}\n  " + "\n  ".join(f)
                         for n, c, f in self.failures[:limit])


def run_cases(fuzzer: Fuzzer, cases, work: Path, on_case: Callable | None = None) -> Tally:
    """Run every case of the iterable ``cases`` (each made on demand, so its files are fresh) and judge it."""
    tally = Tally()
    for number, case in enumerate(cases):
        before = {p: node(p) for p in case.nodes}
        if case.out is not None:
            before |= {p: node(p) for p in case.out.parent.glob(f"*{case.out.name}*")}
        outcome = fuzzer.run(case)
        found = problems(case, outcome, work, before)
        tally.add(number, case, outcome, found)
        if on_case:
            on_case(number, case, outcome, found)
    return tally
