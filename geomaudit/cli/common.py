"""The Typer app, the error wrapper and what every command shares (SPEC §4 exit codes)."""

import sys
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Audit the local loss geometry an optimizer leads a neural network into "
                       "(Jiang, Malik & Li, NeurIPS 2023).")
stderr = Console(stderr=True)
INTERNAL_ERROR = 4

JsonOption = Annotated[str | None, typer.Option("--json", metavar="PATH|-",
                                                help="Write the versioned JSON report to PATH (or stdout with -) "
                                                     "instead of printing tables.")]


@app.callback()
def _root(ctx: typer.Context,
          debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False):
    ctx.obj = {"debug": debug}


@contextmanager
def handle_errors(ctx: typer.Context):
    """Known errors become one sentence on stderr and their exit code; anything else is a bug (exit 4)."""
    from rich.markup import escape

    from ..errors import GeomauditError

    debug = bool(ctx.obj and ctx.obj.get("debug"))
    try:
        yield
    except GeomauditError as err:
        if debug:
            traceback.print_exc()
        stderr.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as err:  # a bug: say so, keep the traceback behind --debug
        if debug:
            traceback.print_exc()
        stderr.print(f"[bold red]internal error:[/] {type(err).__name__}: {escape(str(err))} "
                     "(rerun with --debug for the traceback)",
                     highlight=False, soft_wrap=True)
        raise typer.Exit(INTERNAL_ERROR) from None


def check_json_target(path: str | None) -> None:
    """Fail before the work, not after it, when the report cannot be written."""
    from ..errors import UsageError

    if path and path != "-" and not Path(path).parent.is_dir():
        raise UsageError(f"--json {path}: the folder {Path(path).parent} does not exist")


def emit(document: dict, json_path: str | None, render: Callable[[dict], list]) -> None:
    """The JSON document to a file or stdout, or the rendered tables to stdout."""
    import json

    from ..report.document import write_json

    if json_path == "-":
        sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")
    elif json_path:
        write_json(document, json_path)
        stderr.print(f"wrote {json_path}", markup=False, highlight=False, soft_wrap=True)
    else:
        console = Console() if sys.stdout.isatty() else Console(width=200)
        for table in render(document):
            console.print(table)


class progress_bars:
    """Rich progress on stderr: a bar over the layers and one over the current layer's coordinates."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ..pipeline import Progress as Callbacks

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=stderr, transient=True)
        self.bar.start()
        self.layers = self.bar.add_task("layers", total=None)
        self.coords = self.bar.add_task("", total=None, visible=False)

        def on_layer(position: int, count: int, name: str, work: int) -> None:
            self.bar.update(self.layers, total=count, completed=position - 1)
            self.bar.reset(self.coords, total=work, description=f"  {name}", visible=True)

        return Callbacks(on_status=lambda msg: stderr.print(msg, markup=False, highlight=False, soft_wrap=True),
                         on_layer=on_layer, on_chunk=lambda n: self.bar.advance(self.coords, n))

    def __exit__(self, *exc):
        self.bar.stop()
        return False
