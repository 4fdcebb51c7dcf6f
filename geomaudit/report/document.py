"""The versioned report document (``geomaudit.report/1``) and its atomic writing.

Layout, key by key (the JSON Schema ``report.schema.json`` beside this file is the contract):

- ``schema``: ``"geomaudit.report/1"``; a rename or removal bumps the major number.
- ``command``, ``created`` (UTC, ISO 8601), ``tool`` {name, version}.
- ``environment``: python, torch, transformers, numpy versions, ``device``, ``dtype``, ``platform``.
- ``settings``: every option the audit ran with (coords, seed, precision, batch sizes, layer globs …).
- ``model``: path, format (``huggingface`` | ``state_dict``), class, task, ``initialised``: parameters
  the checkpoint lacked and that were initialised from the seed (a classification head, say).
- ``data``: source, ``fingerprint`` (sha256 of the batch tensors), examples, shapes, ``loss_items``.
- ``checkpoints``: one entry per audited checkpoint: path, step, the audit ``loss``, and ``layers``, each
  with name, shape, numel, coords, sampled flat ``indices``, the ``h_diag`` values at them, ``stats``
  (r_med, r_med_stab, r_topk, topk, zero_frac, max_abs, median_abs, mean_abs; ``null`` where a ratio is
  undefined because its denominator is 0) and ``seconds``.
"""

import datetime
import json
import os
import platform
import sys
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..results import CheckpointResult

SCHEMA = "geomaudit.report/1"


def schema() -> dict:
    """The JSON Schema every report validates against."""
    return json.loads(resources.files(__package__).joinpath("report.schema.json").read_text())


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def report_document(command: str, settings: dict, model: dict, data: dict,
                    checkpoints: list[CheckpointResult], device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    return {
        "schema": SCHEMA,
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": {"name": "geomaudit", "version": __version__},
        "environment": {
            "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "device": _device_name(device), "dtype": str(dtype).removeprefix("torch."),
            "platform": platform.platform(),
        },
        "settings": settings,
        "model": model,
        "data": data,
        "checkpoints": [c.to_dict() for c in checkpoints],
    }


def write_json(document: dict, path: str | os.PathLike) -> None:
    """Write ``document`` to ``path`` atomically: a temporary file in the same folder, then a rename."""
    target = Path(path)
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
