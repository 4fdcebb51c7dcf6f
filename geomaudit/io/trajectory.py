"""Find the checkpoints of a training run and the losses logged along it (SPEC §3).

A trajectory is a Hugging Face ``Trainer`` output_dir (``checkpoint-<step>/`` directories, each with a
``trainer_state.json`` whose ``log_history`` holds the training losses), or any directory of checkpoint
directories or state-dict files whose names carry the step number. A single checkpoint is a trajectory of one.
"""

import glob
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, UsageError
from .files import read_json
from .formats import folder_kind
from .hub import is_hub_id, locate

STATE_FILE = "trainer_state.json"
FILE_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")
CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a run; ``logged_loss`` is the training loss the run logged at exactly ``step``."""

    path: Path
    step: int | None
    logged_loss: float | None


@dataclass(frozen=True)
class Trajectory:
    """The checkpoints of one run in step order, and the ``trainer_state.json`` their losses came from."""

    root: Path
    checkpoints: tuple[CheckpointRef, ...]
    loss_log: Path | None = None

    def describe(self) -> dict:
        return {"root": str(self.root), "steps": [c.step for c in self.checkpoints],
                "loss_log": str(self.loss_log) if self.loss_log else None}


def discover(path: str | os.PathLike, steps: Sequence[int] | None = None, every: int | None = None) -> Trajectory:
    """The checkpoints under ``path``, optionally only ``steps`` or the steps divisible by ``every``.

    ``path`` is one checkpoint (a file, a folder of a kind in ``formats.FOLDER_KINDS``, or a hub id in the local
    Hugging Face cache) or a directory of them; a child's
    step is the last integer in its name (``epoch3-step1200.ckpt`` is step 1200). A Trainer output_dir where
    ``save_model`` put the final model at the root is still a run: its ``checkpoint-<step>/`` directories count.
    """
    root = locate(path)
    if not (root.is_file() or root.is_dir()):
        raise InputError(f"checkpoint or run {root} is neither a regular file nor a folder")
    if root.is_file() or (folder_kind(root) and not _trainer_checkpoints(root)):
        found = {_lone_step(root): root}
    else:
        found = _children(root)
    loss_log = _loss_log(root, found)
    losses = _read_losses(loss_log) if loss_log else {}
    refs = tuple(CheckpointRef(p, s, losses.get(s)) for s, p in sorted(found.items(), key=lambda kv: kv[0] or 0))
    refs = _select(refs, steps, every)
    for ref in refs:
        if ref.logged_loss is not None and not math.isfinite(ref.logged_loss):
            raise InputError(f"{loss_log} logs a training loss of {ref.logged_loss} at step {ref.step}: the run "
                             "diverged there; pick earlier checkpoints with --steps")
    return Trajectory(root, refs, loss_log)


def expand_runs(patterns: Sequence[str]) -> list[Path]:
    """Paths and globs (each glob's matches sorted) in the order given, each run once."""
    runs, seen = [], set()
    for pattern in patterns:
        matches = [pattern] if Path(pattern).exists() else sorted(glob.glob(os.fspath(pattern)))
        if not matches and is_hub_id(pattern):
            matches = [locate(pattern, "run")]
        if not matches:
            raise InputError(f"run {pattern} matches no file or directory")
        for match in map(Path, matches):
            if match.resolve() not in seen:
                seen.add(match.resolve())
                runs.append(match)
    return runs


def _step_of(path: Path) -> int | None:
    numbers = re.findall(r"\d+", path.stem if path.is_file() else path.name)
    return int(numbers[-1]) if numbers else None


def _lone_step(path: Path) -> int | None:
    """A lone checkpoint's step, only where its name says so (``checkpoint-500``, ``step_500.pt``): a number
    elsewhere in a name (``tiny-gpt2``, ``llama-3-8b``) is not a step."""
    match = re.search(r"(?:checkpoint|step)[-_]?(\d+)", path.stem if path.is_file() else path.name)
    return int(match.group(1)) if match else None


def _trainer_checkpoints(root: Path) -> bool:
    return any(c.is_dir() and CHECKPOINT_DIR.fullmatch(c.name) for c in root.iterdir())


def _children(root: Path) -> dict[int, Path]:
    """Children that are checkpoints and carry a step; anything else (logs, README, optimizer.pt) is skipped."""
    found: dict[int, Path] = {}
    for child in sorted(root.iterdir()):
        step = _step_of(child)
        if step is None:
            continue
        if child.is_dir():
            usable = CHECKPOINT_DIR.fullmatch(child.name) or folder_kind(child)
        else:
            usable = child.is_file() and child.suffix in FILE_SUFFIXES
        if not usable:
            continue
        if step in found:
            raise InputError(f"{found[step]} and {child} both hold step {step}")
        found[step] = child
    if not found:
        raise InputError(f"{root} holds no checkpoints: expected checkpoint-<step>/ directories or files "
                         "whose names carry a step number")
    return found


def _loss_log(root: Path, found: dict[int | None, Path]) -> Path | None:
    """``trainer_state.json`` at the root, else the one of the latest checkpoint that has one.

    The Trainer writes one into every checkpoint with the log up to that step, so the latest holds the most.
    """
    latest_first = [p for _, p in sorted(found.items(), key=lambda kv: kv[0] or 0, reverse=True)]
    for folder in [root, *latest_first]:
        if (folder / STATE_FILE).is_file():
            return folder / STATE_FILE
    return None


def _read_losses(path: Path) -> dict[int, float]:
    """Step → training loss from the ``log_history`` entries that carry both. The Trainer writes ``NaN`` for a
    diverged step, so non-finite losses are read (and refused only where a picked checkpoint has one)."""
    state = read_json(path, "trainer state", allow_nan=True)
    history = state.get("log_history", []) if isinstance(state, dict) else None
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        raise InputError(f"{path} is not a valid trainer_state.json: log_history is not a list of objects")
    losses = {}
    for entry in history:
        if "loss" not in entry or "step" not in entry:
            continue
        step, loss = entry["step"], entry["loss"]
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            raise InputError(f"{path} is not a valid trainer_state.json: a step of {_shown(step)} in log_history")
        if not (isinstance(loss, int | float) and not isinstance(loss, bool)):
            raise InputError(f"{path} is not a valid trainer_state.json: a loss of {_shown(loss)} at step {step}")
        losses[step] = float(loss)
    return losses


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


def _select(refs: tuple[CheckpointRef, ...], steps: Sequence[int] | None,
            every: int | None) -> tuple[CheckpointRef, ...]:
    available = ", ".join(str(r.step) for r in refs)
    if steps is not None and every is not None:
        raise UsageError("give --steps or --every, not both")
    if steps is not None:
        missing = sorted(set(steps) - {r.step for r in refs})
        if missing:
            raise UsageError(f"step {', '.join(map(str, missing))} is not in the trajectory; "
                             f"available steps: {available}")
        refs = tuple(r for r in refs if r.step in set(steps))
    elif every is not None:
        if every < 1:
            raise UsageError(f"--every must be at least 1, got {every}")
        refs = tuple(r for r in refs if r.step is not None and r.step % every == 0)
    if not refs:
        raise UsageError(f"the step selection keeps no checkpoint; available steps: {available}")
    return refs
