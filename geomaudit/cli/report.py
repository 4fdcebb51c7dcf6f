"""``geomaudit report``: re-render a saved JSON report as its tables, or draw it (``--plot``; SPEC §4)."""

from pathlib import Path
from typing import Annotated

import typer

from .common import FormatOption, app, emit, handle_errors, stderr
from .options import Metric

SCHEMA_PREFIX = "geomaudit.report/"
READS_MAJOR = 1


@app.command()
def report(
    ctx: typer.Context,
    result: Annotated[str, typer.Argument(help="A JSON report written by geomaudit rmed, compare or svd --json.")],
    plot: Annotated[str | None, typer.Option("--plot", metavar="OUT.png", help="Draw the report to a PNG instead "
                                             "of printing tables (needs matplotlib: pip install "
                                             "'geomaudit\\[plot]').")] = None,
    metric: Annotated[Metric | None, typer.Option("--metric", help="With --plot, for rmed reports: the statistic "
                                                  "drawn (default r_med_stab).")] = None,
    format: FormatOption = None,
):
    """Print a saved report's tables again, or plot it: R_med per layer over steps, matched losses, spectra."""
    with handle_errors(ctx):
        from ..errors import UsageError
        from ..report.tables import compare_tables, rmed_tables, svd_tables

        if plot and not Path(plot).parent.is_dir():
            raise UsageError(f"--plot {plot}: the folder {Path(plot).parent} does not exist")
        document = read_report(result)
        if plot:
            from ..report.plots import plot_report

            plot_report(document, plot, metric and metric.value)
            stderr.print(f"wrote {plot}", markup=False, highlight=False, soft_wrap=True)
        else:
            render = svd_tables if "svd" in document else compare_tables if "compare" in document else rmed_tables
            emit(document, None, render, format and format.value)


def read_report(path: str) -> dict:
    """The document at ``path``, checked only for being a geomaudit report this version can read: its
    ``schema`` field names ``geomaudit.report/N`` with N at most the major version written here, and it holds
    the section it is rendered from (``svd``, ``compare`` or ``checkpoints``)."""
    import json

    from ..errors import InputError

    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path} is not a JSON report ({err})") from None
    schema = document.get("schema") if isinstance(document, dict) else None
    major = schema.removeprefix(SCHEMA_PREFIX).split(".")[0] if isinstance(schema, str) else ""
    if not (isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX) and major.isdigit()):
        raise InputError(f"{path} is not a geomaudit report: its schema field is {schema!r}, not "
                         f"{SCHEMA_PREFIX}{READS_MAJOR}")
    if int(major) > READS_MAJOR:
        raise InputError(f"{path} is a {schema} report from a newer geomaudit; this version reads "
                         f"{SCHEMA_PREFIX}{READS_MAJOR}: upgrade geomaudit")
    if not any(isinstance(document.get(k), list | dict) and document[k] for k in ("svd", "compare", "checkpoints")):
        raise InputError(f"{path} holds no results: none of its svd, compare or checkpoints sections has any")
    return document
