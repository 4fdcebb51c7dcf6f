"""The result cache: finished work of every audited checkpoint, so that re-runs and interrupted audits resume.

One JSON file per (checkpoint content, audit settings), rewritten atomically after every layer. Its name is the
sha256 of the key: the checkpoint's content hash (weights and config, not optimizer state), the data fingerprint,
coords, seed, precision, task, micro-batch size, ``--model``/``--loss`` and the tool version. An entry that
cannot be read, or whose content does not match its key, is ignored and recomputed, never trusted.
"""

import hashlib
import json
import os
from pathlib import Path

from . import __version__
from .engine.stats import GEOMETRY_KEYS
from .report.document import write_json

MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


def default_cache_dir() -> Path:
    """``$GEOMAUDIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/geomaudit``, else ``~/.cache/geomaudit``."""
    if os.environ.get("GEOMAUDIT_CACHE_DIR"):
        return Path(os.environ["GEOMAUDIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "geomaudit"


def checkpoint_digest(path: Path) -> str:
    """sha256 over the names and bytes of the files that define the model (a file, or a directory's model files)."""
    files = [path] if path.is_file() else sorted({f for pattern in MODEL_FILES for f in path.glob(pattern)})
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


class CacheEntry:
    """The cached loss and layers of one checkpoint under one set of settings; ``root=None`` caches nothing."""

    def __init__(self, root: Path | None, key: dict):
        self.key = key | {"tool": __version__}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        self.path = root / f"{digest}.json" if root else None
        self.loss: float | None = None
        self.layers: dict[str, dict] = {}
        self.corrupt = False
        if self.path and self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            entry = json.loads(self.path.read_text())
            if entry["key"] != self.key or not isinstance(entry["layers"], dict):
                raise ValueError("key mismatch")
            for layer in entry["layers"].values():
                if len(layer["indices"]) != len(layer["h_diag"]) or not isinstance(layer["seconds"], float | int):
                    raise ValueError("layer mismatch")
            self.loss, self.layers = entry["loss"], entry["layers"]
        except (ValueError, KeyError, TypeError, OSError):
            self.corrupt = True
            self.loss, self.layers = None, {}

    def save(self, loss: float, layer: dict | None = None) -> None:
        self.loss = loss
        if layer is not None:
            kept = {k: layer[k] for k in ("indices", "h_diag", "seconds")}
            if layer.get("s_med_method"):
                kept |= {"s_med_method": layer["s_med_method"],
                         "geometry": {k: layer["stats"][k] for k in GEOMETRY_KEYS}}
            self.layers[layer["name"]] = kept
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json({"key": self.key, "loss": self.loss, "layers": self.layers}, self.path)
