"""The fuzz worker: imports geomaudit once, warms it up, then runs every case in a forked child.

Started by ``tests.fuzz.harness.Fuzzer`` as ``python -m tests.fuzz.worker``; reads one JSON request a line on
stdin and answers one JSON line on stdout. A child runs ``geomaudit ARGS`` in-process exactly as the command
line would (``app(args)``), with its own stdin, stdout and stderr (a file, a closed descriptor, ``/dev/full`` or
a pipe nobody reads), an address-space limit (an allocation beyond it fails instead of taking the machine's
memory) and optionally a file-size limit (a full disk). The worker kills a child that runs past its time limit
and reports the child's exit code, its peak resident memory and its time.

Forking a warm process makes a case cost a few tens of milliseconds instead of the seconds of a fresh
``python -m geomaudit``, so hundreds of cases fit in the CI budget.
"""

import json
import os
import resource
import signal
import sys
import time
import traceback

STDOUT_MODES = ("file", "closed", "full", "broken-pipe")


def _child(request: dict) -> None:
    """Runs in the forked child; never returns."""
    code = 97
    try:
        os.chdir(request["cwd"])
        os.setpgid(0, 0)
        limit = request.get("address_space")
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if request.get("fsize") is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, as on a full disk, instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
        stdin_r, stdin_w = os.pipe()
        os.write(stdin_w, request.get("stdin", "").encode())
        os.close(stdin_w)
        os.dup2(stdin_r, 0)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(err, 2)
        mode = request.get("stdout_mode", "file")
        sys.stdout = os.fdopen(1, "w", encoding="utf-8", closefd=False)  # the worker's own is its protocol pipe
        if mode == "file":
            os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
        elif mode == "full":
            os.dup2(os.open("/dev/full", os.O_WRONLY), 1)
        elif mode == "broken-pipe":
            r, w = os.pipe()
            os.close(r)
            os.dup2(w, 1)
        elif mode == "closed":
            os.close(1)
            sys.stdout = None  # what Python gives a process started with stdout closed
        for key, value in request.get("env", {}).items():
            os.environ[key] = value
        sys.argv = ["geomaudit", *request["args"]]
        from geomaudit.cli import app

        try:
            app(args=request["args"], prog_name="geomaudit")
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:  # noqa: B902  (what the command line would show as a traceback)
            traceback.print_exc()
            code = 99
        if sys.stdout is not None:
            try:
                sys.stdout.flush()  # what the interpreter does at exit
            except Exception as err:  # noqa: BLE001
                sys.stderr.write(f"Exception ignored at exit: {err!r}\n")
                code = 98
        sys.stderr.flush()
    except BaseException:  # noqa: B902
        traceback.print_exc()
    finally:
        os._exit(code)


def run(request: dict) -> dict:
    """Fork a child for ``request`` and wait for it at most ``request["timeout"]`` seconds."""
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _child(request)
    timed_out = False
    deadline = start + request.get("timeout", 60)
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() > deadline:
            timed_out = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.005)
    code = os.waitstatus_to_exitcode(status)
    return {"code": code, "timed_out": timed_out, "seconds": time.perf_counter() - start,
            "max_rss_mib": usage.ru_maxrss / 1024}


def warm_up(commands: list[list[str]]) -> None:
    """Run ``commands`` in this process (their outputs are the seeds' reports), so that every lazy import
    (transformers' model classes, tokenizers, matplotlib) is done once here and shared by every child."""
    from typer.testing import CliRunner

    from geomaudit.cli import app

    runner = CliRunner()
    for args in commands:
        result = runner.invoke(app, args)
        if result.exit_code != 0:
            raise RuntimeError(f"warm-up geomaudit {' '.join(args)} failed ({result.exit_code}): {result.output}")


def main() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no fork warning from tokenizers in the children
    import torch

    torch.set_num_threads(1)
    protocol = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not break the protocol
    warm_up(json.loads(sys.stdin.readline()))
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    protocol.write(json.dumps({"ready": True, "vm_bytes": vm}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        protocol.write(json.dumps(run(request)) + "\n")
        protocol.flush()


if __name__ == "__main__":
    main()
