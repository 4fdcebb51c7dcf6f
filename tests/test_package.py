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


def test_a_missing_test_dependency_fails_instead_of_skipping():
    """Only the GPU marker may skip: every other test dependency is in the `test` extra and imported plainly."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    skipping = re.compile(r"importorskip|pytest\.skip\(|mark\.skip|skipif")
    offenders = [f"{f.relative_to(root)}:{n}" for f in sorted((root / "tests").rglob("*.py"))
                 for n, line in enumerate(f.read_text().splitlines(), 1)
                 if skipping.search(line) and f.name not in ("test_gpu.py", "test_package.py")]
    assert offenders == []
    (extra,) = re.findall(r"^test = \[(.*?)\]$", (root / "pyproject.toml").read_text(), re.MULTILINE | re.DOTALL)
    for needed in ("scipy", "jsonschema", "matplotlib", "accelerate", "pillow"):
        assert f'"{needed}>=' in extra, needed
