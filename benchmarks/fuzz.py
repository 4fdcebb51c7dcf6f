"""A long fuzz of the command line (issue 10): every input kind corrupted at random, every outcome judged.

    python benchmarks/fuzz.py --cases 5000            # about 40 min on 2 cores
    python benchmarks/fuzz.py --cases 200 --kinds config,index --seed 7 --verbose

Prints a tally: cases per input kind, exit codes, and the cases that broke a promise (code execution, a device
or link replaced, exit 4, a hang, more than 3 GiB, stderr that is not one error line, an output file left
after a failure, an exit code other than the case expects). Exits 1 when any case did. The test suite runs
the same generator on fewer cases (``tests/fuzz/test_fuzz.py``); a case number with ``--start N --cases 1``
reproduces one case of a seed.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz.cases import KINDS, generate  # noqa: E402
from tests.fuzz.harness import Fuzzer, run_cases  # noqa: E402
from tests.fuzz.seeds import build_seeds, warm_up_commands  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start", type=int, default=0, help="first case number (to reproduce one case)")
    parser.add_argument("--kinds", help=f"comma-separated subset of {', '.join(KINDS)}")
    parser.add_argument("--keep", help="keep the work folder here (the cases' files) instead of a temporary one")
    parser.add_argument("--verbose", action="store_true", help="one line per case")
    args = parser.parse_args()
    kinds = args.kinds.split(",") if args.kinds else None
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="geomaudit-fuzz-"))
    start = time.perf_counter()
    seeds = build_seeds(work / "seeds")
    print(f"seeds built in {time.perf_counter() - start:.0f} s; work folder {work}", flush=True)

    def show(number, case, outcome, found):
        if args.verbose or found:
            status = "FAIL " + " | ".join(found) if found else "ok"
            print(f"{number:5d} {case.kind:12s} exit {outcome.code:3d} {outcome.seconds:5.1f}s "
                  f"{case.what[:90]}: {status}", flush=True)
        if not found and not args.keep:
            shutil.rmtree(case.cwd, ignore_errors=True)

    try:
        with Fuzzer(seeds, warm_up_commands(seeds), work / "worker.log") as fuzzer:
            print(f"worker ready after {time.perf_counter() - start:.0f} s", flush=True)
            tally = run_cases(fuzzer, generate(seeds, work / "cases", args.cases, args.seed, kinds, args.start),
                              work, on_case=show)
            fuzzer.close()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\npython benchmarks/fuzz.py --cases {args.cases} --seed {args.seed}"
          f"{' --kinds ' + args.kinds if args.kinds else ''}: {time.perf_counter() - start:.0f} s in all")
    print(tally.summary())
    if tally.failures:
        print("\n" + tally.details())
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
