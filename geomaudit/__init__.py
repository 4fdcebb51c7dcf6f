"""geomaudit: audit the local loss geometry (Hessian-diagonal uniformity) an optimizer leads a network into.

The library API, grouped by topic (the command line is a thin layer over it). Names are imported on first
use, so that ``import geomaudit`` (and ``geomaudit --help``) does not load torch.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("geomaudit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    # engine: exact Hessian diagonals and their statistics
    "DiagonalEngine": "engine.hdiag", "MicroBatch": "engine.hdiag", "sample_indices": "engine.sampling",
    "diagonal_stats": "engine.stats", "audit_checkpoint": "engine.audit", "select_layers": "engine.audit",
    # inputs
    "load_checkpoint": "io.checkpoints", "LoadedModel": "io.checkpoints", "read_records": "io.data",
    "build_batch": "io.data", "AuditBatch": "io.data", "discover": "io.trajectory",
    # from settings to report
    "AuditConfig": "pipeline", "run_rmed": "pipeline", "CompareConfig": "pipeline", "run_compare": "pipeline",
    # auditing during training
    "GeometryCallback": "integrations.trainer",
    # errors and their exit codes
    "GeomauditError": "errors", "UsageError": "errors", "InputError": "errors", "ThresholdFailed": "errors",
    "OutputError": "errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'geomaudit' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
