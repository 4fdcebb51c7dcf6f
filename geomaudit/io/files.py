"""Reading input files defensively: regular files only, JSON parsed strictly, every failure an ``InputError``.

A path that names a device (``/dev/zero``), a pipe or a folder where a file is expected would hang or fill
memory when read, so only regular files (or links to them) are read. JSON that is not UTF-8, is malformed, is
nested deeper than Python can parse, or (unless asked for) holds ``NaN``/``Infinity`` is one sentence, never a
traceback.
"""

import json
import math
import os
import stat
from pathlib import Path

from ..errors import InputError


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a ``Path`` when it names a regular file (a link to one is followed); else an ``InputError``."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{what} {p} does not exist") from None
    except OSError as err:
        raise InputError(f"cannot read {what} {p}: {err.strerror or err}") from None
    except ValueError:  # a NUL byte
        raise InputError(f"{what} {str(p)!r} is not a valid path") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise InputError(f"{what} {p} is {kind}: expected a regular file")
    return p


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """The bytes of the regular file ``path`` (``regular_file``)."""
    p = regular_file(path, what)
    try:
        return p.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {what} {p}: {err.strerror or err}") from None


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of the regular file ``path``; a byte-order mark is dropped."""
    try:
        return read_bytes(path, what).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text") from None


def parse_json(text: str, where: str, allow_nan: bool = False):
    """``json.loads(text)``; any failure is an ``InputError`` naming ``where``. Without ``allow_nan``, ``NaN``,
    ``Infinity`` and numbers too large for a float (``1e999``) are refused: JSON itself has none of them."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not a JSON number")

    def number(text: str) -> float:
        value = float(text)
        if not (allow_nan or math.isfinite(value)):
            raise ValueError(f"{text} is too large for a float")
        return value

    try:
        return json.loads(text, parse_float=number, parse_constant=None if allow_nan else refuse)
    except RecursionError:
        raise InputError(f"{where} is not valid JSON (nested too deeply)") from None
    except ValueError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{where} is not valid JSON ({_short(reason)})") from None


def read_json(path: str | os.PathLike, what: str = "file", allow_nan: bool = False):
    """The JSON document in the regular file ``path`` (``read_text``, ``parse_json``); a string escaping a lone
    surrogate (``"\\ud800"``), which is not a character, is refused."""
    document = parse_json(read_text(path, what), f"{what} {path}", allow_nan)
    found = lone_surrogate(json.dumps(document, ensure_ascii=False))
    if found:
        raise InputError(f"{what} {path} holds a lone surrogate ({found}), which is not a character")
    return document


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text`` as ``U+D800`` (a code point that is not a character and has no UTF-8),
    or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"U+{ord(err.object[err.start]):04X}"
    return None


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
