"""The versioned report document (``geomaudit.report/1``) and its atomic writing.

Layout, key by key (the JSON Schema ``report.schema.json`` beside this file is the contract):

- ``schema``: ``"geomaudit.report/1"``; a rename or removal bumps the major number.
- ``command``, ``created`` (UTC, ISO 8601), ``tool`` {name, version}.
- ``environment``: python, torch, transformers, numpy versions, ``device``, ``dtype``, ``platform``, ``ranks``
  (processes that computed it: torchrun's world size, else 1).
- ``settings``: every option the audit ran with (coords, seed, precision, batch sizes, layer globs …).
- ``model``: path, format (``huggingface`` | ``state_dict`` | ``accelerate`` | ``distcp`` | ``peft-adapter`` |
  ``peft-merged``), class, task, ``initialised``: parameters the checkpoint lacked and that were initialised
  from the seed (a classification head, say), ``base``: the base model folder of a PEFT adapter (else null).
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
import stat
import sys
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import BinaryIO

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


def check_target(path: str | os.PathLike, option: str = "the output") -> None:
    """Refuse an output path that writing would harm or that cannot be written, before any work is done.

    ``path`` must be a new name or an existing regular file, in a folder that exists and is writable. A device
    (``/dev/null``), a pipe, a folder or a symbolic link is refused rather than replaced by a file.
    """
    from ..errors import OutputError, UsageError

    target = Path(path)
    if not str(path) or target.name in ("", ".", "..") or str(path).endswith(os.sep):
        raise UsageError(f"{option} {path}: give a file name, not a folder")
    try:
        mode = target.lstat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise UsageError(f"{option} {path}: {err.strerror or err}") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise UsageError(f"{option} {path} is {kind}: give a regular file or a new path")
    folder = target.parent
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: the folder {folder} is not writable")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write`` fills a temporary file in the same folder, which is then renamed, so a
    failure leaves no partial file. The file gets the usual permissions (0666 less the umask). The target is
    checked again (``check_target``) right before the rename, so a device or a link put there meanwhile is not
    replaced. A failure to write (a full or read-only disk) is an ``OutputError``."""
    from ..errors import OutputError

    target = Path(path)
    check_target(target)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as err:
        raise OutputError(f"cannot write {target}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        check_target(target)
        os.replace(tmp, target)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {err.strerror or err}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(document: dict, path: str | os.PathLike) -> None:
    """Write ``document`` to ``path`` atomically (``atomic_write``); it is serialised before the file is opened."""
    data = (json.dumps(document, indent=2, allow_nan=False) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


MERGED_MUST_AGREE = (("settings", lambda d: d["settings"]), ("data", lambda d: d["data"]["fingerprint"]),
                     ("model class", lambda d: d["model"]["class"]))


def merge_trajectory(documents: list[dict], paths: list[str]) -> dict:
    """One ``rmed`` report of a trajectory from several ``rmed`` reports of the same audit at different steps
    (the per-step files ``GeometryCallback`` writes, or ``rmed`` run on single checkpoints): their checkpoints
    sorted by step, under the header of the earliest. The reports must agree on the settings, the batch (data
    fingerprint) and the model class, and each step may appear once; otherwise an ``InputError``."""
    from ..errors import InputError

    seen: dict[int, str] = {}
    for document, path in zip(documents, paths):
        if document["command"] != "rmed" or not document.get("checkpoints"):
            raise InputError(f"{path} is a {document['command']} report: only rmed reports (one per step, as "
                             f"GeometryCallback writes them) merge into one trajectory")
        for what, key in MERGED_MUST_AGREE:
            if key(document) != key(documents[0]):
                raise InputError(f"{path} and {paths[0]} are not reports of one audit: their {what} differ")
        for checkpoint in document["checkpoints"]:
            step = checkpoint["step"]
            if step is None:
                raise InputError(f"{path} holds a checkpoint without a step: reports merge only by step")
            if step in seen:
                raise InputError(f"{seen[step]} and {path} both hold step {step}")
            seen[step] = path
    ordered = sorted(zip(documents, paths), key=lambda dp: min(c["step"] for c in dp[0]["checkpoints"]))
    merged = dict(ordered[0][0])
    merged["checkpoints"] = sorted((c for d in documents for c in d["checkpoints"]), key=lambda c: c["step"])
    if any("trajectories" in d for d in documents):
        merged["trajectories"] = [t for d, _ in ordered for t in d.get("trajectories", [])]
    return merged
