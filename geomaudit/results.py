"""Result types: frozen dataclasses with ``to_dict()`` matching the JSON schema (SPEC §4)."""

import math
from dataclasses import dataclass

import numpy as np

from .engine.stats import saturated


def json_number(x: float | None) -> float | None:
    """JSON has no inf/nan: an undefined ratio is written as ``null`` (and read back as ``None``)."""
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class LayerResult:
    """Sampled Hessian diagonal of one parameter tensor and its statistics."""

    name: str
    shape: tuple[int, ...]
    indices: np.ndarray
    h_diag: np.ndarray
    stats: dict[str, float]
    seconds: float
    cached: bool = False
    s_med_method: str | None = None  # "dense" or "submatrix" (H[S, S] of the sampled S) when S_med was computed
    alignment: dict | None = None  # gradient and Adam-step alignment with |H_ii| (``alignment_stats``)
    h_diag_method: str | None = None  # how h_diag was computed: DiagonalEngine's METHODS
    zero_hessian: bool = False  # the sampled H_ii are zero to round-off (``engine.roundoff``): ratios undefined
    roundoff: dict | None = None  # the recomputation that decided it: dtype, indices, h_diag, changes, median_zero
    block: str | None = None  # with --split-fused: "q", "k" or "v" of the fused parameter ``of``
    of: dict | None = None  # that parameter's name and shape; ``indices`` are flat indices into it

    @property
    def param(self) -> str:
        """The parameter tensor the H_ii are entries of: the fused one for a block."""
        return self.of["name"] if self.of else self.name

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "numel": self.numel,
            "coords": len(self.indices),
            "indices": self.indices.tolist(),
            "h_diag": self.h_diag.tolist(),
            "stats": {k: v if k == "topk" else json_number(v) for k, v in self.stats.items()},
            "seconds": round(self.seconds, 6),
            "cached": self.cached,
            "s_med_method": self.s_med_method,
            "h_diag_method": self.h_diag_method,
            "zero_hessian": self.zero_hessian,
            "saturated": saturated(self.stats),
            "roundoff": self.roundoff,
            "block": self.block,
            "of": self.of,
            "alignment": None if self.alignment is None else {
                k: json_number(v) if k.startswith("spearman") else v for k, v in self.alignment.items()},
        }


@dataclass(frozen=True)
class CheckpointResult:
    """Every audited layer of one checkpoint, with the audit loss it was measured at."""

    path: str
    step: int | None
    loss: float
    layers: tuple[LayerResult, ...]
    run: str | None = None
    logged_loss: float | None = None
    across: dict | None = None  # r_diag pooled over the sampled coordinates of the ``--across`` layers

    def to_dict(self) -> dict:
        return {"path": self.path, "run": self.run, "step": self.step, "loss": self.loss,
                "logged_loss": self.logged_loss, "layers": [layer.to_dict() for layer in self.layers],
                "across": None if self.across is None else {
                    k: v if k == "layers" else json_number(v) for k, v in self.across.items()}}
