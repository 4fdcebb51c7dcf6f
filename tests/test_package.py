"""The public API resolves, and the command line starts without loading torch."""

import subprocess
import sys

import pytest

import geomaudit


def test_every_exported_name_resolves():
    for name in geomaudit.__all__:
        assert getattr(geomaudit, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        geomaudit.nothing  # noqa: B018


def test_help_does_not_import_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom geomaudit.cli import app\n"
            "assert CliRunner().invoke(app, ['--help']).exit_code == 0\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
