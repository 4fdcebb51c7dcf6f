"""``geomaudit report``: re-render a saved JSON report as its tables, or draw it (``--plot``; SPEC §4)."""

from typing import Annotated

import typer

from .common import Command, FormatOption, app, emit, handle_errors, stderr
from .options import OUTPUT, Debug, RmedMetric, Version

SCHEMA_PREFIX = "geomaudit.report/"
READS_MAJOR = 1


@app.command(cls=Command)
def report(
    ctx: typer.Context,
    results: Annotated[list[str], typer.Argument(metavar="RESULT.json", show_default=False,
                                                 help="A JSON report written by geomaudit rmed, compare or svd "
                                                      "--json; several rmed reports of one audit at different "
                                                      "steps (GeometryCallback's geomaudit-step-*.json) are "
                                                      "merged into one trajectory.")],
    plot: Annotated[str | None, typer.Option("--plot", metavar="OUT.png", rich_help_panel=OUTPUT,
                                             help="Draw the report to a PNG instead of printing tables (needs "
                                                  "matplotlib: pip install 'geomaudit\\[plot]').")] = None,
    metric: Annotated[RmedMetric | None, typer.Option("--metric", rich_help_panel=OUTPUT,
                                                      help="With --plot, for rmed reports: the statistic drawn "
                                                           "(default r_med_stab).")] = None,
    format: FormatOption = None,
    debug: Debug = False,
    version: Version = False,
):
    """Print a saved report's tables again, or plot it: R_med per layer over steps, matched losses, spectra.
    Several per-step rmed reports are merged into one trajectory."""
    with handle_errors(ctx):
        from ..report.document import check_target
        from ..report.tables import compare_tables, rmed_tables, svd_tables

        if plot is not None:
            check_target(plot, "--plot")
        documents = [read_report(path) for path in results]
        if len(documents) == 1:
            document = documents[0]
        else:
            from ..report.document import merge_trajectory

            document = merge_trajectory(documents, results)
        if plot:
            from ..report.plots import plot_report

            plot_report(document, plot, metric and metric.value)
            stderr.print(f"wrote {plot}", markup=False, highlight=False, soft_wrap=True)
        else:
            render = svd_tables if "svd" in document else compare_tables if "compare" in document else rmed_tables
            emit(document, None, render, format and format.value)


def read_report(path: str) -> dict:
    """The document at ``path`` when it is a geomaudit report this version can read: strict JSON whose
    ``schema`` field names ``geomaudit.report/N`` with N at most the major version written here, valid against the
    shipped JSON Schema, and holding the section it is rendered from (``svd``, ``compare`` or ``checkpoints``)."""
    from ..errors import InputError
    from ..io.files import read_json

    document = read_json(path, "report")
    schema = document.get("schema") if isinstance(document, dict) else None
    major = schema.removeprefix(SCHEMA_PREFIX).split(".")[0] if isinstance(schema, str) else ""
    if not (isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX) and major.isdigit()):
        raise InputError(f"{path} is not a geomaudit report: its schema field is {_shown(schema)}, not "
                         f"{SCHEMA_PREFIX}{READS_MAJOR}")
    if int(major) > READS_MAJOR:
        raise InputError(f"{path} is a {_shown(schema)} report from a newer geomaudit; this version reads "
                         f"{SCHEMA_PREFIX}{READS_MAJOR}: upgrade geomaudit")
    problem = schema_problem(document)
    if problem:
        raise InputError(f"{path} is not a valid geomaudit report: {problem}")
    if not any(document.get(k) for k in ("svd", "compare", "checkpoints")):
        raise InputError(f"{path} holds no results: none of its svd, compare or checkpoints sections has any")
    return document


def schema_problem(document: dict) -> str | None:
    """Where and how ``document`` breaks the shipped JSON Schema (the most relevant error), or ``None``."""
    import jsonschema

    from ..report.document import schema

    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is None:
        return None
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    return f"{where or 'the document'}: {_cut(error.message, 160)}"


def _shown(value) -> str:
    return _cut(repr(value), 60)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
