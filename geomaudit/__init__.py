"""geomaudit: audit the local loss geometry (Hessian-diagonal uniformity) an optimizer leads a network into.

The library API, grouped by topic (the command line is a thin layer over it):
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("geomaudit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from .engine.audit import audit_checkpoint, select_layers  # noqa: E402
from .engine.hdiag import DiagonalEngine, MicroBatch  # noqa: E402
from .engine.sampling import sample_indices  # noqa: E402
from .engine.stats import diagonal_stats  # noqa: E402
from .errors import GeomauditError, InputError, ThresholdFailed, UsageError  # noqa: E402
from .io.checkpoints import LoadedModel, load_checkpoint  # noqa: E402
from .io.data import AuditBatch, build_batch, read_records  # noqa: E402
from .pipeline import AuditConfig, run_rmed  # noqa: E402

__all__ = [
    # engine: exact Hessian diagonals and their statistics
    "DiagonalEngine", "MicroBatch", "sample_indices", "diagonal_stats", "audit_checkpoint", "select_layers",
    # inputs
    "load_checkpoint", "LoadedModel", "read_records", "build_batch", "AuditBatch",
    # one audit from settings to report
    "AuditConfig", "run_rmed",
    # errors and their exit codes
    "GeomauditError", "UsageError", "InputError", "ThresholdFailed",
]
