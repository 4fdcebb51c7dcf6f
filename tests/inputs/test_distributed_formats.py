"""torch.distributed.checkpoint folders and Accelerate save_state folders, written by the real tools: the same H_ii
as the plain state dict they hold, their pickles never loaded (or only through an allowlist), every error."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from geomaudit.cache import checkpoint_digest
from geomaudit.errors import InputError
from geomaudit.io.formats import folder_kind, model_files, read_distcp
from geomaudit.io.trajectory import discover
from tests.cli.test_errors import FACTORY, fail
from tests.cli.invoke import report

ROOT = Path(__file__).resolve().parents[2]
AUDIT = ("--model", "tinymlp:build", "--loss", "tinymlp:mse", "--data", "data.safetensors", "--coords", "20")


def _write(kind: str, weights: Path, out: Path) -> Path:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.inputs.writers", kind, str(weights), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """mlp.safetensors, its FSDP-sharded DCP folder ``dcp/`` and Accelerate project ``acc/``, and the data."""
    folder = tmp_path_factory.mktemp("written")
    (folder / "tinymlp.py").write_text(FACTORY)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    save_file(net.state_dict(), folder / "mlp.safetensors")
    save_file({"x": torch.randn(10, 3), "y": torch.randn(10)}, folder / "data.safetensors")
    _write("distcp", folder / "mlp.safetensors", folder / "dcp")
    _write("accelerate", folder / "mlp.safetensors", folder / "acc")
    return folder


@pytest.fixture
def work(written, tmp_path, monkeypatch) -> Path:
    """A copy of ``written`` to run in (and to spoil)."""
    shutil.copytree(written, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    return tmp_path / "w"


def h_diag(*args: str) -> list[list[float]]:
    return [la["h_diag"] for la in report("rmed", *args)["checkpoints"][0]["layers"]]


def test_sharded_distcp_is_the_plain_state_dict(work):
    assert sorted(p.name for p in (work / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert folder_kind(work / "dcp") == "distcp"
    state = read_distcp(work / "dcp")
    plain = load_file(work / "mlp.safetensors")
    assert sorted(state) == sorted(f"model.{k}" for k in plain)  # the "optim" group is not read
    assert all(torch.equal(state[f"model.{k}"], v) for k, v in plain.items())
    document = report("rmed", "dcp", *AUDIT)
    assert document["model"]["format"] == "distcp"
    assert [la["h_diag"] for la in document["checkpoints"][0]["layers"]] == h_diag("mlp.safetensors", *AUDIT)


def test_accelerate_save_state_is_the_plain_state_dict(work):
    first = work / "acc" / "checkpoints" / "checkpoint_0"
    assert sorted(p.name for p in first.iterdir()) == ["model.safetensors", "optimizer.bin", "random_states_0.pkl"]
    assert folder_kind(first) == "accelerate"
    document = report("rmed", str(first), *AUDIT)
    assert document["model"]["format"] == "accelerate"
    assert [la["h_diag"] for la in document["checkpoints"][0]["layers"]] == h_diag("mlp.safetensors", *AUDIT)
    run = report("rmed", "acc/checkpoints", *AUDIT)
    assert [c["step"] for c in run["checkpoints"]] == [0, 1]
    assert run["checkpoints"][0]["layers"][0]["h_diag"] != run["checkpoints"][1]["layers"][0]["h_diag"]


class _Tripwire:
    """Unpickling this creates the file named in it: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_accelerate_pickles_are_never_loaded_nor_hashed(work):
    folder = work / "acc" / "checkpoints" / "checkpoint_0"
    before = checkpoint_digest(folder)
    tripwire = work / "unpickled"
    for name in ("random_states_0.pkl", "optimizer.bin"):
        (folder / name).write_bytes(pickle.dumps(_Tripwire(tripwire)))
    assert checkpoint_digest(folder) == before
    report("rmed", str(folder), *AUDIT)
    assert not tripwire.exists()
    state = load_file(folder / "model.safetensors")
    save_file({k: v + 1 for k, v in state.items()}, folder / "model.safetensors")
    assert checkpoint_digest(folder) != before


def test_fsdp_sharded_save_state(work):
    """Accelerate's FSDP SHARDED_STATE_DICT: a DCP folder pytorch_model_fsdp_0/ inside the save_state folder."""
    folder = work / "fsdp"
    folder.mkdir()
    shutil.copytree(work / "dcp", folder / "pytorch_model_fsdp_0")
    shutil.copy(work / "acc" / "checkpoints" / "checkpoint_0" / "random_states_0.pkl", folder)
    assert folder_kind(folder) == "accelerate"
    assert h_diag("fsdp", *AUDIT) == h_diag("mlp.safetensors", *AUDIT)
    files = [p.relative_to(folder).as_posix() for p in model_files(folder)]
    assert files == ["pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__0_0.distcp",
                     "pytorch_model_fsdp_0/__1_0.distcp"]


def test_a_run_of_distcp_folders(work):
    for step in (100, 200):
        shutil.copytree(work / "dcp", work / "run" / f"step-{step}")
    assert [c.step for c in discover(work / "run").checkpoints] == [100, 200]
    assert discover(work / "dcp").checkpoints[0].path == work / "dcp"


def test_folders_need_a_model(work):
    fail(["rmed", "dcp", "--data", "data.safetensors"], 2, "torch.distributed.checkpoint folder",
         "--model module:factory")
    fail(["rmed", "acc/checkpoints/checkpoint_0", "--data", "data.safetensors"], 2,
         "Accelerate save_state folder", "--model module:factory")


def test_accelerate_folder_errors(work):
    folder = work / "acc" / "checkpoints" / "checkpoint_0"
    shutil.copy(folder / "model.safetensors", folder / "model_1.safetensors")
    fail(["rmed", str(folder), *AUDIT], 2, "holds 2 models (model.safetensors, model_1.safetensors)",
         "pass the file or folder of the one to audit")
    assert h_diag(str(folder / "model_1.safetensors"), *AUDIT) == h_diag("mlp.safetensors", *AUDIT)
    for f in ("model.safetensors", "model_1.safetensors"):
        (folder / f).unlink()
    torch.save({}, folder / "pytorch_model_fsdp_0_rank0.bin")
    assert folder_kind(folder) == "accelerate"
    fail(["rmed", str(folder), *AUDIT], 3, "per-rank FSDP shards (pytorch_model_fsdp_0_rank0.bin)",
         "SHARDED_STATE_DICT or FULL_STATE_DICT")


class _Harmless:
    pass


def _metadata_with(work, extra) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    metadata = FileSystemReader(str(work / "dcp")).read_metadata()
    metadata.planner_data = {"note": extra}
    (work / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))


def test_distcp_metadata_is_unpickled_through_an_allowlist(work):
    tripwire = work / "unpickled"
    _metadata_with(work, _Tripwire(tripwire))
    fail(["rmed", "dcp", *AUDIT], 3, "refusing to unpickle", "io.open is not a torch.distributed.checkpoint "
         "metadata class", "--allow-pickle")
    assert not tripwire.exists()
    _metadata_with(work, __import__("datetime").date(2024, 1, 1))
    fail(["rmed", "dcp", *AUDIT], 3, "datetime.date is not a torch.distributed.checkpoint metadata class")
    assert h_diag("dcp", *AUDIT, "--allow-pickle") == h_diag("mlp.safetensors", *AUDIT)


def test_distcp_corruption(work):
    good = (work / "dcp" / ".metadata").read_bytes()
    (work / "dcp" / ".metadata").write_bytes(b"\x80\x04garbage")
    fail(["rmed", "dcp", *AUDIT], 3, "not a torch.distributed.checkpoint metadata file")
    fail(["rmed", "dcp", *AUDIT, "--allow-pickle"], 3, "not a torch.distributed.checkpoint metadata file")
    (work / "dcp" / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    fail(["rmed", "dcp", *AUDIT], 3, "it holds a dict, not torch.distributed.checkpoint metadata")
    (work / "dcp" / ".metadata").write_bytes(good)
    shard = work / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:40])
    message = fail(["rmed", "dcp", *AUDIT], 3, "cannot read the torch.distributed.checkpoint folder dcp: EOFError")
    assert "Frame" not in message


def test_distcp_shards_outside_the_folder_are_refused(work):
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    metadata = FileSystemReader(str(work / "dcp")).read_metadata()
    shutil.copy(work / "dcp" / "__1_0.distcp", work / "elsewhere.distcp")
    for info in metadata.storage_data.values():
        if info.relative_path == "__1_0.distcp":
            info.relative_path = "../elsewhere.distcp"
    (work / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
    for flag in ((), ("--allow-pickle",)):
        fail(["rmed", "dcp", *AUDIT, *flag], 3, "points at a shard outside its folder ('../elsewhere.distcp')")


def test_distcp_without_tensors(tmp_path):
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning):
        dcp.save({"step": 3, "name": "x"}, checkpoint_id=tmp_path / "empty")
    with pytest.raises(InputError, match="holds no tensors"):
        read_distcp(tmp_path / "empty")


def test_distcp_that_does_not_fit(work):
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning):
        dcp.save({"0.weight": torch.zeros(5, 3)}, checkpoint_id=work / "small")
    fail(["rmed", "small", *AUDIT], 3, "does not fit the model")


def test_save_state_of_a_transformers_model(tiny_gpt2_dir, tmp_path, monkeypatch):
    """An HF model trained with Accelerate: a factory building it from its config audits it as its folder would."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hfmodel.py").write_text(
        "from transformers import AutoConfig, AutoModelForCausalLM\n\n\ndef build():\n"
        f"    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained({str(tiny_gpt2_dir)!r}))\n")
    (tmp_path / "acc").mkdir()
    shutil.copy(tiny_gpt2_dir / "model.safetensors", tmp_path / "acc" / "model.safetensors")
    (tmp_path / "acc" / "random_states_0.pkl").write_bytes(pickle.dumps(_Tripwire(tmp_path / "unpickled")))
    gen = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(0, 300, (3, 9), generator=gen)}, tmp_path / "ids.safetensors")
    args = ("--data", "ids.safetensors", "--coords", "6", "--layers", "transformer.h.1.attn.c_proj.weight")
    via_state = report("rmed", "acc", "--model", "hfmodel:build", *args)
    assert via_state["model"]["format"] == "accelerate" and via_state["model"]["task"] == "causal-lm"
    assert via_state["checkpoints"][0]["layers"][0]["h_diag"] == \
        report("rmed", str(tiny_gpt2_dir), *args)["checkpoints"][0]["layers"][0]["h_diag"]
    assert not (tmp_path / "unpickled").exists()
