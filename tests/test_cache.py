"""The result cache trusts an entry only when its key and contents fit."""

import json

from geomaudit.cache import CacheEntry, checkpoint_digest, default_cache_dir

KEY = {"checkpoint": "sha256:0", "data": "sha256:1", "coords": 3}
LAYER = {"name": "w", "indices": [0, 2], "h_diag": [1.0, 2.0], "seconds": 0.5}


def test_round_trip_and_mismatches(tmp_path):
    entry = CacheEntry(tmp_path, KEY)
    entry.save(1.25, LAYER)
    again = CacheEntry(tmp_path, KEY)
    assert not again.corrupt and again.loss == 1.25
    assert again.layers == {"w": {"indices": [0, 2], "h_diag": [1.0, 2.0], "seconds": 0.5}}
    assert CacheEntry(tmp_path, KEY | {"coords": 4}).layers == {}  # other settings, other entry

    stored = json.loads(entry.path.read_text())
    entry.path.write_text(json.dumps(stored | {"key": stored["key"] | {"coords": 99}}))
    assert CacheEntry(tmp_path, KEY).corrupt  # a file under this name whose key says otherwise
    stored["layers"]["w"]["h_diag"] = [1.0]
    entry.path.write_text(json.dumps(stored))
    broken = CacheEntry(tmp_path, KEY)
    assert broken.corrupt and broken.layers == {} and broken.loss is None


def _tampered(stored: dict, edit) -> dict:
    copy = json.loads(json.dumps(stored))
    edit(copy)
    return copy


EDITS = {  # each edit of a valid entry, and whether the checksum is recomputed after it (a careful forger)
    "h_diag edited": (lambda e: e["layers"]["w"]["h_diag"].__setitem__(0, 1.5), False),
    "loss edited": (lambda e: e.update(loss=1.0), False),
    "loss a string": (lambda e: e.update(loss="abc"), True),
    "loss a bool": (lambda e: e.update(loss=True), True),
    "loss null": (lambda e: e.update(loss=None), True),
    "h_diag a string": (lambda e: e["layers"]["w"].update(h_diag="12"), True),
    "h_diag holds a bool": (lambda e: e["layers"]["w"].update(h_diag=[True, 2.0]), True),
    "h_diag shorter": (lambda e: e["layers"]["w"].update(h_diag=[1.0]), True),
    "indices unsorted": (lambda e: e["layers"]["w"].update(indices=[2, 0]), True),
    "indices repeated": (lambda e: e["layers"]["w"].update(indices=[2, 2]), True),
    "index negative": (lambda e: e["layers"]["w"].update(indices=[-1, 2]), True),
    "index a float": (lambda e: e["layers"]["w"].update(indices=[0, 2.0]), True),
    "seconds negative": (lambda e: e["layers"]["w"].update(seconds=-1), True),
    "unknown field": (lambda e: e["layers"]["w"].update(stats={}), True),
    "geometry without method": (lambda e: e["layers"]["w"].update(geometry={}), True),
    "no layers": (lambda e: e.update(layers=[]), True),
    "no checksum": (lambda e: e.pop("sha256"), False),
    "layer not an object": (lambda e: e["layers"].update(w=[1]), True),
}


def test_a_tampered_entry_is_not_served(tmp_path):
    from geomaudit.cache import _checksum

    entry = CacheEntry(tmp_path, KEY)
    entry.save(1.25, LAYER)
    stored = json.loads(entry.path.read_text())
    for name, (edit, resign) in EDITS.items():
        forged = _tampered(stored, edit)
        if resign:
            forged["sha256"] = _checksum(forged["key"], forged["loss"], forged["layers"])
        entry.path.write_text(json.dumps(forged))
        again = CacheEntry(tmp_path, KEY)
        assert again.corrupt and again.loss is None and again.layers == {}, name
    for text in ('{"key": 1, "loss": NaN}', "[" * 100_000, "\udcff", ""):
        entry.path.write_text(text, errors="surrogateescape")
        assert CacheEntry(tmp_path, KEY).corrupt, text
    entry.path.unlink()
    entry.path.mkdir()  # not a file: ignored when read
    assert CacheEntry(tmp_path, KEY).corrupt


def test_no_root_caches_nothing(tmp_path):
    entry = CacheEntry(None, KEY)
    entry.save(1.0, LAYER)
    assert entry.path is None and list(tmp_path.iterdir()) == []


def test_digest_covers_weights_not_optimizer_state(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    first = checkpoint_digest(tmp_path)
    (tmp_path / "optimizer.pt").write_bytes(b"moments")
    assert checkpoint_digest(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert checkpoint_digest(tmp_path) != first

    monkeypatch.delenv("GEOMAUDIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "geomaudit"
