"""The result cache: finished work of every audited checkpoint, so that re-runs and interrupted audits resume.

One JSON file per (checkpoint content, audit settings), rewritten atomically after every layer. Its name is the
sha256 of the key: the checkpoint's content hash (weights and config, not optimizer state), the data fingerprint,
coords, seed, precision, task, micro-batch size, ``--model``/``--loss`` and the tool version. An entry that
cannot be read, whose content does not match its key, has a value of the wrong type, or whose checksum does not
match its content is ignored and recomputed, never trusted.
"""

import hashlib
import json
import math
import os
from pathlib import Path

from . import __version__
from .engine.hdiag import METHODS
from .engine.stats import GEOMETRY_KEYS
from .errors import InputError
from .io.files import read_json
from .report.document import write_json


def default_cache_dir() -> Path:
    """``$GEOMAUDIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/geomaudit``, else ``~/.cache/geomaudit``."""
    if os.environ.get("GEOMAUDIT_CACHE_DIR"):
        return Path(os.environ["GEOMAUDIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "geomaudit"


def checkpoint_digest(path: Path) -> str:
    """sha256 over the names and bytes of the files that define the model: a file, or the files its folder's kind
    loads (``io.formats.model_files``: an adapter's include its base model's; Accelerate's random states and
    optimizer state are left out)."""
    from .io.formats import model_files

    files = model_files(path)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _index_list(value) -> bool:
    return (isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
            and all(a < b for a, b in zip([-1, *value], value)))


# what a cached layer may hold, field → test of its value; the first three are required
LAYER_FIELDS = {
    "indices": _index_list,  # sorted, distinct, non-negative flat indices
    "h_diag": lambda v: isinstance(v, list) and all(map(_finite, v)),
    "seconds": lambda v: _finite(v) and v >= 0,
    "s_med_method": lambda v: v in ("dense", "submatrix", "slq"),
    "h_diag_method": lambda v: v in METHODS,
    "geometry": lambda v: (isinstance(v, dict) and set(v) == set(GEOMETRY_KEYS)
                           and all(x is None or _finite(x) for x in v.values())),
    "roundoff": lambda v: (isinstance(v, dict) and set(v) == ROUNDOFF_FIELDS and v["dtype"] in ("float32", "float64")
                           and all(isinstance(v[k], list) for k in ("indices", "h_diag", "changes"))
                           and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v["indices"])
                           and len(v["indices"]) == len(v["h_diag"]) == len(v["changes"])
                           and all(map(_finite, v["h_diag"] + v["changes"]))
                           and isinstance(v["zero_hessian"], bool) and isinstance(v["median_zero"], bool)),
}
ROUNDOFF_FIELDS = {"dtype", "indices", "h_diag", "changes", "zero_hessian", "median_zero"}
REQUIRED = ("indices", "h_diag", "seconds")


def _valid_layer(layer) -> bool:
    return (isinstance(layer, dict) and set(REQUIRED) <= set(layer) <= set(LAYER_FIELDS)
            and all(LAYER_FIELDS[k](v) for k, v in layer.items())
            and len(layer["indices"]) == len(layer["h_diag"]) > 0
            and ("s_med_method" in layer) == ("geometry" in layer))


def _checksum(key: dict, loss: float, layers: dict) -> str:
    content = json.dumps({"key": key, "loss": loss, "layers": layers}, sort_keys=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(content.encode()).hexdigest()


class CacheEntry:
    """The cached loss and layers of one checkpoint under one set of settings; ``root=None`` caches nothing.

    An entry is trusted only when it is strict JSON of the expected layout, its key is this audit's key, every
    value has its type (finite numbers, sorted distinct indices as many as the H_ii values …) and its ``sha256``
    over key, loss and layers matches: an edited value is caught even when it is a plausible number.
    """

    def __init__(self, root: Path | None, key: dict):
        self.key = key | {"tool": __version__}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        self.path = root / f"{digest}.json" if root else None
        self.loss: float | None = None
        self.layers: dict[str, dict] = {}
        self.corrupt = False
        if self.path and os.path.lexists(self.path):
            self._read()

    def _read(self) -> None:
        try:
            entry = read_json(self.path, "cache entry")
        except InputError:
            entry = None
        valid = (isinstance(entry, dict) and set(entry) == {"key", "loss", "layers", "sha256"}
                 and entry["key"] == self.key and _finite(entry["loss"]) and isinstance(entry["layers"], dict)
                 and all(_valid_layer(layer) for layer in entry["layers"].values())
                 and entry["sha256"] == _checksum(entry["key"], entry["loss"], entry["layers"]))
        if valid:
            self.loss, self.layers = entry["loss"], entry["layers"]
        else:
            self.corrupt = True
            self.loss, self.layers = None, {}

    def save(self, loss: float, layer: dict | None = None) -> None:
        self.loss = loss
        if layer is not None:
            kept = {k: layer[k] for k in REQUIRED}
            if layer.get("h_diag_method"):
                kept["h_diag_method"] = layer["h_diag_method"]
            if layer.get("roundoff"):
                kept["roundoff"] = layer["roundoff"]
            if layer.get("s_med_method"):
                kept |= {"s_med_method": layer["s_med_method"],
                         "geometry": {k: layer["stats"][k] for k in GEOMETRY_KEYS}}
            self.layers[layer["name"]] = kept
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json({"key": self.key, "loss": self.loss, "layers": self.layers,
                        "sha256": _checksum(self.key, self.loss, self.layers)}, self.path)
