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
