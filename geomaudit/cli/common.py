"""The Typer app, the error wrapper and what every command shares (SPEC §4 exit codes)."""

import sys
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from enum import Enum
from typing import Annotated

import typer
from rich.console import Console

from .options import OUTPUT, Debug, Version


def _quiet_help(option):
    """``-h``/``--help`` in the Output panel, without a type: it takes no value."""
    if option is not None:
        option.metavar, option.rich_help_panel = "", OUTPUT
    return option


class Command(typer.core.TyperCommand):
    def get_help_option(self, ctx):
        return _quiet_help(super().get_help_option(ctx))


class Group(typer.core.TyperGroup):
    def get_help_option(self, ctx):
        return _quiet_help(super().get_help_option(ctx))

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """click's own errors (a bad option value, an unknown option, a missing argument) as one ``error:`` line
        and exit 2, like every other error, instead of a usage box."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as err:  # click's errors (typer vendors click)
            if type(err).__name__ != "NoArgsIsHelpError":  # that one has printed the help already, as typer does
                where = getattr(err, "ctx", None)
                hint = f" (see {where.command_path} -h)" if where is not None else ""
                _error_line("error:", err.format_message() + hint)
            sys.exit(getattr(err, "exit_code", 2))
        except typer.Abort:
            stderr.print("interrupted")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Audit the local loss geometry an optimizer leads a neural network into "
                       "(Jiang, Malik & Li, NeurIPS 2023).")
stderr = Console(stderr=True, emoji=False)  # a path or name with :smile: in it stays as it is
INTERNAL_ERROR = 4

JsonOption = Annotated[str | None, typer.Option("--json", metavar="PATH|-", rich_help_panel=OUTPUT,
                                                help="Write the versioned JSON report to PATH (or stdout with -) "
                                                     "instead of printing tables.")]


class TableFormat(str, Enum):
    table = "table"
    md = "md"
    csv = "csv"


FormatOption = Annotated[TableFormat | None, typer.Option(
    "--format", rich_help_panel=OUTPUT,
    help="How tables are printed: table (laid out to the terminal, never cropped), md (Markdown) or csv (full "
         "precision). With --json PATH, prints them too.")]
TableOption = Annotated[bool, typer.Option("--table", metavar="", rich_help_panel=OUTPUT,
                                           help="With --json PATH: print the tables to stdout too.")]


@app.callback()
def _root(ctx: typer.Context, debug: Debug = False, version: Version = False):
    ctx.obj = {"debug": debug}


@contextmanager
def handle_errors(ctx: typer.Context):
    """Known errors become one line on stderr and their exit code; anything else is a bug (exit 4)."""
    from ..errors import GeomauditError

    debug = bool(ctx.obj and ctx.obj.get("debug")) or bool(ctx.params.get("debug"))  # before or after the command
    try:
        yield
    except GeomauditError as err:
        if debug:
            traceback.print_exc()
        _error_line("error:", str(err))
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as err:  # a bug: say so, keep the traceback behind --debug
        if debug:
            traceback.print_exc()
        _error_line("internal error:", f"{type(err).__name__}: {err} (rerun with --debug for the traceback)")
        raise typer.Exit(INTERNAL_ERROR) from None


@contextmanager
def ranks():
    """Yields whether this process speaks: under torchrun only rank 0 prints and writes (the others' stderr is
    quiet); the process group is left when the block ends."""
    from ..distributed import leave, rank

    stderr.quiet = rank() != 0
    try:
        yield rank() == 0
    finally:
        leave()


def _error_line(label: str, message: str) -> None:
    """``label message`` as one line: the message as plain text (no markup, no emoji codes), its lines joined."""
    from rich.text import Text

    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    stderr.print(Text(label, style="bold red") + Text(" " + one_line), highlight=False, soft_wrap=True)


def check_json_target(path: str | None) -> None:
    """Fail before the work, not after it, when the report cannot be written: ``-`` is stdout (which must be open),
    anything else a regular file or a new path in a writable folder (``check_target``)."""
    from ..report.document import check_target

    if path == "-":
        _stdout()
    elif path is not None:
        check_target(path, "--json")


def _stdout():
    """``sys.stdout``, or an ``OutputError`` when the process was started with it closed."""
    from ..errors import OutputError

    if sys.stdout is None:
        raise OutputError("stdout is closed: nothing can be printed (give --json PATH)")
    return sys.stdout


def to_stdout(write: Callable[[object], None]) -> None:
    """Call ``write(stdout)`` and flush; a full disk, a closed pipe or a closed stdout is an ``OutputError``, and
    stdout is then pointed at the null device so that Python's exit does not complain about it again."""
    import os

    from ..errors import OutputError

    out = _stdout()
    try:
        try:
            write(out)
            out.flush()
        except SystemExit:  # a rich Console meeting a closed pipe points stdout at devnull and exits 1
            raise BrokenPipeError(32, "Broken pipe") from None
    except (OSError, ValueError) as err:  # ValueError: writing to a closed file
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        raise OutputError(f"cannot write to stdout: {getattr(err, 'strerror', None) or err}") from None


def check_tables(json_path: str | None, format: str | None, table: bool) -> None:
    """``--table`` and ``--format`` print to stdout, which ``--json -`` holds; tables need an open stdout."""
    from ..errors import UsageError

    if json_path == "-" and (table or format):
        raise UsageError(f"--json - writes the report to stdout, which cannot also hold "
                         f"{'--format ' + format if format else 'the table'}: give --json a file")
    if not json_path or table or format:
        _stdout()


def emit(document: dict, json_path: str | None, render: Callable[[dict], list], format: str | None = None,
         table: bool = False) -> None:
    """The JSON document to a file or stdout; the tables to stdout without ``--json``, or with ``--json PATH``
    when ``--table`` or ``--format`` asks for them too."""
    import json

    from ..report.document import write_json

    if json_path == "-":
        text = json.dumps(document, indent=2, allow_nan=False) + "\n"
        to_stdout(lambda out: out.write(text))
        return
    if json_path:
        write_json(document, json_path)
        stderr.print(f"wrote {json_path}", markup=False, highlight=False, soft_wrap=True)
    if not json_path or table or format:
        print_tables(render(document), format or "table")


def print_tables(grids: list, format: str = "table") -> None:
    """Tables to stdout, laid out to the terminal (or ``$COLUMNS``) without losing a value; or ``md``, ``csv``."""
    from ..report.layout import terminal_width, write

    to_stdout(lambda out: write(grids, out, format, terminal_width(out)))


def dry_run_tables(plan, format: str | None) -> None:
    """``--dry-run``: the plan's tables to stdout; nothing was computed and no report is written."""
    print_tables(plan.grids(), format or "table")
    stderr.print("dry run: no loss or Hessian computed, no report written", markup=False, highlight=False,
                 soft_wrap=True)


PROGRESS_INTERVAL_ENV = "GEOMAUDIT_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL = 5.0


def progress_interval() -> float:
    """Seconds between plain progress lines when stderr is not a terminal: ``$GEOMAUDIT_PROGRESS_INTERVAL``, else 5."""
    import math
    import os

    from ..errors import UsageError

    text = os.environ.get(PROGRESS_INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_PROGRESS_INTERVAL
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise UsageError(f"{PROGRESS_INTERVAL_ENV} is the number of seconds between progress lines, at least 0, "
                         f"got {text!r}")
    return seconds


class progress_bars:
    """Progress on stderr. Before an audit, its plan line (``pipeline``); once a tenth of it has run, an
    estimate of the total time. On a terminal, rich bars: the whole audit in HVPs with the time left, the
    checkpoint's layers, the current layer. Elsewhere (CI, SLURM, a pipe), where bars would vanish, a plain
    ``Tracker.line`` at most every ``progress_interval()`` seconds, as work completes."""

    def __enter__(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        from ..pipeline import Progress as Callbacks
        from ..progress import Tracker

        self.interval = progress_interval()
        self.tracker, self.live = Tracker(), stderr.is_terminal
        self.last, self.estimated = self.tracker.now(), False
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=stderr, transient=True, disable=not self.live)
        self.bar.start()
        self.whole = self.bar.add_task("", total=None, visible=False)
        self.layers = self.bar.add_task("layers", total=None)
        self.coords = self.bar.add_task("", total=None, visible=False)
        return Callbacks(on_status=self._print, on_layer=self._on_layer, on_chunk=self._on_chunk,
                         on_plan=self._on_plan, on_checkpoint=self._on_checkpoint)

    def _print(self, message: str) -> None:
        stderr.print(message, markup=False, highlight=False, soft_wrap=True)

    def _on_plan(self, plan) -> None:
        self.tracker.finish()
        self.tracker.start(plan)
        self.last, self.estimated = self.tracker.now(), False
        if plan is None:
            self.bar.update(self.whole, visible=False)
        else:
            self.bar.reset(self.whole, total=plan.hvps, description="audit", visible=plan.hessian)

    def _on_checkpoint(self, position: int, count: int) -> None:
        self.tracker.on_checkpoint(position, count)
        self.bar.update(self.whole, description=f"checkpoint {position} of {count}")
        self._estimate()

    def _on_layer(self, position: int, count: int, name: str, work: int) -> None:
        self.tracker.on_layer(position, count, name, work)
        self.bar.update(self.layers, total=count, completed=position - 1)
        self.bar.reset(self.coords, total=work, description=f"  {name}", visible=True)
        self._whole()
        self._estimate()
        self._line()

    def _on_chunk(self, n: int) -> None:
        self.tracker.on_chunk(n)
        self.bar.advance(self.coords, n)
        self._whole()
        self._line()

    def _whole(self) -> None:
        t = self.tracker
        self.bar.update(self.whole, total=max(t.total, t.done), completed=t.done)

    def _estimate(self) -> None:
        """The estimated total time, once per audit, at the first layer boundary after a tenth of its work (the
        first layers' rate alone misleads: the embedding's HVPs run through the whole network), while work is
        left. The bars and the progress lines show the time left from the first HVP on."""
        t = self.tracker
        if self.estimated or t.plan is None or t.layer_done or not 0 < 10 * t.done >= t.total > t.done:
            return
        text = t.estimate()
        if text:
            self.estimated = True
            self._print(text)

    def _line(self) -> None:
        if self.live:
            return
        now = self.tracker.now()
        if now - self.last >= self.interval:
            self.last = now
            self._print(self.tracker.line())

    def __exit__(self, *exc):
        self.bar.stop()
        return False
