"""Errors that the command line turns into one sentence on stderr and an exit code (SPEC §4)."""


class GeomauditError(Exception):
    """Base class: ``exit_code`` is what the command line exits with."""

    exit_code = 4


class ThresholdFailed(GeomauditError):
    """A CI threshold (``--fail-above`` …) was crossed."""

    exit_code = 1


class UsageError(GeomauditError):
    """The command was called wrongly: a bad option value or a missing argument."""

    exit_code = 2


class InputError(GeomauditError):
    """An input is missing, corrupt, or does not fit: checkpoint, data, layer selection, a NaN loss."""

    exit_code = 3


class OutputError(GeomauditError):
    """A report, table or plot could not be written: a full or read-only disk, a closed stdout."""

    exit_code = 5
