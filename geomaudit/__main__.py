"""``python -m geomaudit``: the command line, as the ``geomaudit`` console script runs it."""

from .cli import main

main()
