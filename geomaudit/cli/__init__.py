"""The ``geomaudit`` command line: one small module per command; heavy imports happen inside them."""

from .common import app
from . import rmed  # noqa: F401  (registers the command)


def main() -> None:
    app()


__all__ = ["app", "main"]
