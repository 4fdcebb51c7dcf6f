"""Running the command line in-process, as the tests do."""

import json

import jsonschema
from typer.testing import CliRunner

from geomaudit.cli import app
from geomaudit.report.document import schema

runner = CliRunner()


def run(*args: str, code: int = 0, env: dict[str, str] | None = None):
    """``geomaudit ARGS`` (with ``env`` added to the environment); its exit code must be ``code`` and nothing may
    print a traceback."""
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result


def report(*args: str) -> dict:
    """``geomaudit ARGS --json -``, parsed and validated against the schema."""
    document = json.loads(run(*args, "--json", "-").stdout)
    jsonschema.validate(document, schema())
    return document
