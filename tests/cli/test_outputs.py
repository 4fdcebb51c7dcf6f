"""Where reports, tables and plots go: never onto a device, a pipe, a folder or through a link; a failure to write
is exit 5 with one sentence, and leaves no file."""

import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys

import pytest

from .invoke import run

FAST = ["--coords", "2", "--layers", "transformer.h.0.ln_1.*", "--batch-size", "2", "--no-cache"]


def device_node(folder) -> str:
    """A character device like /dev/null (as root, a copy in ``folder``; otherwise the real one, which a user
    who is not root cannot replace anyway)."""
    try:
        os.mknod(folder / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        return str(folder / "null")
    except PermissionError:
        return "/dev/null"


def kinds(folder) -> dict[str, tuple[str, str]]:
    """Targets that are not regular files, with what the message calls them."""
    (folder / "real.json").write_text("keep me")
    (folder / "link.json").symlink_to(folder / "real.json")
    (folder / "dangling.json").symlink_to(folder / "nowhere.json")
    os.mkfifo(folder / "fifo")
    (folder / "dir").mkdir()
    return {"device": (device_node(folder), "is a device"), "link": (str(folder / "link.json"), "is a symbolic link"),
            "dangling link": (str(folder / "dangling.json"), "is a symbolic link"),
            "pipe": (str(folder / "fifo"), "is not a regular file"), "folder": (str(folder / "dir"), "is a folder")}


def snapshot(path: str) -> tuple:
    st = os.lstat(path)
    return st.st_mode, st.st_ino, st.st_rdev


@pytest.mark.parametrize("kind", ["device", "link", "dangling link", "pipe", "folder"])
def test_json_onto_a_device_link_pipe_or_folder_is_refused_before_the_work(tiny_gpt2_dir, tmp_path, kind):
    target, phrase = kinds(tmp_path)[kind]
    before = snapshot(target)
    result = run("rmed", str(tiny_gpt2_dir), *FAST, "--json", target, code=2)
    assert f"--json {target} {phrase}: give a regular file or a new path" in result.stderr
    assert "loading" not in result.stderr  # refused before the checkpoint was read
    assert snapshot(target) == before and (tmp_path / "real.json").read_text() == "keep me"
    assert not (tmp_path / "nowhere.json").exists()


@pytest.mark.parametrize("kind", ["device", "link", "pipe", "folder"])
def test_plot_onto_a_device_link_pipe_or_folder_is_refused(tmp_path, kind):
    target, phrase = kinds(tmp_path)[kind]
    before = snapshot(target)
    result = run("report", str(tmp_path / "missing.json"), "--plot", target, code=2)
    assert f"--plot {target} {phrase}" in result.stderr and snapshot(target) == before


def test_an_existing_regular_file_is_replaced_and_a_new_path_created(tiny_gpt2_dir, tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text("previous report")
    run("rmed", str(tiny_gpt2_dir), *FAST, "--json", str(old))
    run("rmed", str(tiny_gpt2_dir), *FAST, "--json", str(new))
    assert json.loads(old.read_text())["schema"] == json.loads(new.read_text())["schema"] == "geomaudit.report/1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "old.json"]


def test_a_link_put_in_place_during_the_work_is_not_replaced(tmp_path):
    """``atomic_write`` checks the target again right before the rename."""
    from geomaudit.errors import UsageError
    from geomaudit.report.document import atomic_write

    target = tmp_path / "r.json"

    def write(f):
        f.write(b"{}")
        target.symlink_to(tmp_path / "elsewhere")

    with pytest.raises(UsageError, match="is a symbolic link"):
        atomic_write(target, write)
    assert target.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def full_disk():
    """In the child process: files larger than 64 bytes cannot be written (RLIMIT_FSIZE), EFBIG instead of the
    signal that kills. A child, so pytest's own output (a file in CI) is never under the limit."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


WRITE = """
import sys
from geomaudit.errors import OutputError
from geomaudit.report.document import write_json
try:
    write_json({"values": list(range(100))}, sys.argv[1])
except OutputError as error:
    print(error.exit_code, error)
"""


def test_a_full_disk_is_an_output_error_and_leaves_no_file(tmp_path):
    child = subprocess.run(
        [sys.executable, "-c", WRITE, str(tmp_path / "r.json")],
        capture_output=True, text=True, preexec_fn=full_disk, check=True,
    )
    assert re.fullmatch(r"5 cannot write .*r.json: File too large\n", child.stdout), child
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder_is_an_output_error_before_the_work(tiny_gpt2_dir, tmp_path):
    if os.geteuid() == 0:  # root writes into any folder: a folder on a read-only file system stands in
        folder = "/proc/self"
    else:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o555)
    result = run("rmed", str(tiny_gpt2_dir), *FAST, "--json", f"{folder}/r.json", code=5)
    assert f"the folder {folder} is not writable" in result.stderr and "loading" not in result.stderr


class Closed:
    """A stdout that fails like a closed pipe."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        raise OSError("no file descriptor")


def test_stdout_faults_are_output_errors(monkeypatch):
    from geomaudit.cli.common import check_tables, to_stdout
    from geomaudit.errors import OutputError

    monkeypatch.setattr(sys, "stdout", Closed())
    with pytest.raises(OutputError, match="cannot write to stdout: Broken pipe"):
        to_stdout(lambda out: out.write("table"))
    monkeypatch.setattr(sys, "stdout", None)  # what Python gives a process started with stdout closed
    with pytest.raises(OutputError, match="stdout is closed"):
        check_tables(None, None, False)
    with pytest.raises(OutputError, match="stdout is closed"):
        to_stdout(lambda out: out.write("{}"))


def test_error_text_is_printed_as_it_is(tmp_path):
    """No emoji codes, no markup, one line: the message names the path the user typed."""
    result = run("rmed", str(tmp_path / "run:smile:[bold]"), code=3)
    assert result.stderr == f"error: checkpoint or run {tmp_path}/run:smile:[bold] does not exist\n"
