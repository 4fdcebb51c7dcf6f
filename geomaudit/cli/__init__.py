"""The ``geomaudit`` command line: one small module per command; heavy imports happen inside them."""

from .common import app
from . import compare, experiment, report, rmed, svd  # noqa: F401  (registers the commands)


def main() -> None:
    app()


__all__ = ["app", "main"]
