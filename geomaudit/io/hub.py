"""Hub ids (``openai-community/gpt2``) resolved from the local Hugging Face cache, offline only.

The cache is the folder the Hugging Face libraries download into: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``. A model ``org/name`` lies in
``models--org--name/``; ``refs/main`` names the commit whose files are in ``snapshots/<commit>/`` (a folder
that ``save_pretrained`` could have written). Nothing is ever downloaded: an id that is not in the cache is
an input error naming the folder looked in.
"""

import os
import re
from pathlib import Path

from ..errors import InputError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment at every call (as the libraries do)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface" / "hub"


def is_hub_id(text: str) -> bool:
    """Whether ``text`` could name a model on the hub (``name`` or ``org/name``)."""
    return bool(REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text and not text.endswith(".")


def locate(spec: str | os.PathLike, what: str = "checkpoint or run") -> Path:
    """``spec`` as a local path when it exists, else as a hub id in the local Hugging Face cache.

    >>> locate(".") == Path(".")
    True
    """
    path = Path(spec)
    if path.exists():
        return path
    text = os.fspath(spec)
    if not is_hub_id(text):
        raise InputError(f"{what} {text} does not exist")
    folder = hub_cache() / ("models--" + text.replace("/", "--"))
    if not folder.is_dir():
        raise InputError(f"{what} {text} is neither a local path nor a model in the Hugging Face cache "
                         f"(looked in {folder}; nothing is downloaded)")
    return _snapshot(folder, text)


def _snapshot(folder: Path, repo: str) -> Path:
    """The snapshot ``refs/main`` points to, else the only snapshot there is."""
    snapshots = folder / "snapshots"
    ref = folder / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8", errors="replace").strip()
        if (snapshots / commit).is_dir():
            return snapshots / commit
        raise InputError(f"{repo} in the Hugging Face cache is incomplete: refs/main names commit {commit[:40]!r}, "
                         f"which has no folder in {snapshots}")
    found = sorted(p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise InputError(f"{repo} in the Hugging Face cache ({folder}) has no refs/main and "
                     f"{len(found)} snapshots: point at the snapshot folder to audit")
