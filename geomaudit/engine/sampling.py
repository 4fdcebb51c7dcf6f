"""Seeded choice of the coordinates audited in each layer."""

import hashlib

import numpy as np


def sample_indices(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """Return ``min(n, numel)`` sorted flat indices drawn uniformly without replacement.

    The generator is seeded from ``seed`` and the layer ``shape`` alone, so two checkpoints of
    one architecture (or two layers of one shape) are audited on the same coordinates. A layer
    with at most ``n`` entries is taken in full.

    >>> sample_indices((3, 4), 5, seed=0).tolist() == sample_indices((3, 4), 5, seed=0).tolist()
    True
    >>> sample_indices((3,), 200, seed=0).tolist()
    [0, 1, 2]
    """
    numel = int(np.prod(shape, dtype=np.int64))
    if n >= numel:
        return np.arange(numel, dtype=np.int64)
    key = hashlib.sha256(f"{seed}:{tuple(shape)}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return np.sort(rng.choice(numel, size=n, replace=False)).astype(np.int64)
