"""torchrun: 2 gloo processes write the JSON a single process writes (same indices, same values, bit for bit), only
rank 0 prints and writes, and rank 0 alone keeps the cache. Oracle: the single-process run with one thread
(OMP_NUM_THREADS=1, as torchrun gives each of its processes: the thread count changes CPU rounding, in torch's kernels
and in numpy's eigenvalues alike)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from geomaudit.distributed import Group, ShardedEngine
from geomaudit.report.document import schema

from .engine.test_hdiag import make_mlp, mlp_data, mse_loss

ROOT = Path(__file__).resolve().parents[1]


def geomaudit(tmp: Path, ranks: int, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    """``geomaudit ARGS --json`` in ``ranks`` processes under torchrun (or in one, without it), one thread each."""
    tmp.mkdir()
    out = tmp / "report.json"
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                        "GEOMAUDIT_CACHE_DIR": str(tmp / "cache")}
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    done = subprocess.run([sys.executable, *launch, "-m", "geomaudit", *args, "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(out.read_text())
    jsonschema.validate(document, schema())
    return document, done


def same_but_timing(single: dict, ranks: dict) -> None:
    """Everything equal but when it ran, how long each layer took, and how many processes did it."""
    assert single["environment"].pop("ranks") == 1 and ranks["environment"].pop("ranks") == 2
    for doc in (single, ranks):
        doc.pop("created")
        for ckpt in doc["checkpoints"]:
            for layer in ckpt["layers"]:
                assert layer.pop("seconds") >= 0
    assert single == ranks


def test_two_gloo_processes_write_what_one_writes(tiny_gpt2_dir, trainer_runs, tmp_path):
    """rmed with --smed over 2 micro-batches (H_ii, H[S, S] and the summed columns' norms), and compare."""
    args = ["rmed", str(tiny_gpt2_dir), "--coords", "9", "--layers", "transformer.h.0.*", "--batch-size", "4",
            "--max-length", "32", "--micro-batch", "2", "--smed"]
    ranks, done = geomaudit(tmp_path / "rmed-2", 2, *args)
    assert done.stderr.count("wrote ") == 1 and not done.stdout  # rank 0 alone speaks
    assert [p.suffix for p in (tmp_path / "rmed-2" / "cache").iterdir()] == [".json"]  # one writer, one entry
    single, _ = geomaudit(tmp_path / "rmed-1", 1, *args)
    assert sum(len(la["h_diag"]) for la in single["checkpoints"][0]["layers"]) > 40
    same_but_timing(single, ranks)

    args = ["compare", str(trainer_runs["adam-0"]), str(trainer_runs["sgd-0"]), "--coords", "8", "--layers",
            "transformer.h.1.mlp.*", "--batch-size", "8", "--steps", "2,6"]
    ranks, _ = geomaudit(tmp_path / "compare-2", 2, *args)
    same_but_timing(geomaudit(tmp_path / "compare-1", 1, *args)[0], ranks)


class OneProcessGroup(Group):
    """The rank-r piece of a group of ``size`` without the collectives: lets the split be checked in one process."""

    def total(self, tensor):
        return tensor

    def broadcast(self, value, src=0):
        return value


@pytest.mark.parametrize("size", [2, 3, 5])
def test_the_pieces_of_the_ranks_cover_every_coordinate_once(size):
    """Oracle: the unsharded engine; the ranks' pieces (9 coordinates over 2, 3, 5 ranks, rotating) sum to it."""
    from geomaudit.engine.hdiag import DiagonalEngine, MicroBatch

    model, data = make_mlp(), mlp_data()
    micro = [MicroBatch(data, 1.0)]
    for turn in range(size):
        pieces = [OneProcessGroup(r, size).piece(9, turn) for r in range(size)]
        assert sorted(i for p in pieces for i in p) == list(range(9))
        assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
    want = DiagonalEngine(model, mse_loss, micro).columns("0.weight", range(9))
    parts = []
    for r in range(size):
        engine = ShardedEngine(OneProcessGroup(r, size), model, mse_loss, micro)
        parts.append(engine.columns("0.weight", range(9)))
    for key in ("diag", "block", "sq_norms"):
        total = sum(getattr(p, key) for p in parts)
        assert torch.equal(total, getattr(want, key)), key
        assert all(np.count_nonzero(getattr(p, key).numpy()) < np.count_nonzero(total.numpy()) for p in parts)
