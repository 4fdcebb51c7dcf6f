"""Hub ids resolved from a Hugging Face cache laid out in a temp dir as the hub libraries lay it out; never the
network."""

import hashlib
import json
import shutil

import pytest

from geomaudit.errors import InputError
from geomaudit.io.hub import hub_cache, is_hub_id, locate
from geomaudit.io.trajectory import expand_runs
from tests.cli.invoke import report
from tests.cli.test_errors import fail

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LAYER = "transformer.h.1.mlp.c_fc.weight"


def fake_hub_cache(cache, repo_id: str, folder, commit: str = COMMIT, ref: bool = True):
    """``folder``'s files as the hub cache holds them: blobs named by hash, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (snapshot / f.name).symlink_to(f"../../blobs/{digest}")
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_gpt2_dir):
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    fake_hub_cache(cache, "tiny-org/tiny-gpt2", tiny_gpt2_dir)
    return cache


def test_cache_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "b"))
    assert hub_cache() == tmp_path / "a"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub_cache() == tmp_path / "b" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert hub_cache() == tmp_path / "c" / "huggingface" / "hub"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "d"))
    assert hub_cache() == tmp_path / "d" / ".cache" / "huggingface" / "hub"


def test_hub_id_shapes():
    assert is_hub_id("openai-community/gpt2") and is_hub_id("gpt2") and is_hub_id("org/name.v1")
    for text in ("runs/adam-*", "a/b/c", "./x", "/abs/path", "org--x/name", "a/../b", "-x", "name."):
        assert not is_hub_id(text), text


def test_hub_id_audits_like_its_folder(hub, tiny_gpt2_dir, examples_jsonl):
    args = ("--data", str(examples_jsonl), "--coords", "5", "--layers", LAYER, "--batch-size", "4")
    by_folder = report("rmed", str(tiny_gpt2_dir), *args)
    by_id = report("rmed", "tiny-org/tiny-gpt2", *args)
    snapshot = hub / "models--tiny-org--tiny-gpt2" / "snapshots" / COMMIT
    assert by_id["model"]["path"] == str(snapshot) and by_id["checkpoints"][0]["step"] is None
    assert by_id["checkpoints"][0]["layers"][0]["h_diag"] == by_folder["checkpoints"][0]["layers"][0]["h_diag"]
    assert report("svd", "tiny-org/tiny-gpt2", "--layers", LAYER)["svd"]["checkpoints"][0]["layers"]


def test_hub_id_as_a_run_and_as_an_adapters_base(hub, tiny_gpt2_dir, examples_jsonl, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir),
                           LoraConfig(r=2, target_modules=["c_fc"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "tiny-org/tiny-gpt2"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    args = ("--data", str(examples_jsonl), "--coords", "3", "--batch-size", "4")
    document = report("rmed", str(tmp_path / "adapter"), *args)
    assert document["model"]["base"] == str(hub / "models--tiny-org--tiny-gpt2" / "snapshots" / COMMIT)
    assert expand_runs(["tiny-org/tiny-gpt2"]) == [hub / "models--tiny-org--tiny-gpt2" / "snapshots" / COMMIT]


def test_hub_cache_errors(hub, tiny_gpt2_dir, examples_jsonl):
    missing = hub / "models--tiny-org--absent"
    message = fail(["rmed", "tiny-org/absent", "--data", str(examples_jsonl)], 3,
                   "tiny-org/absent is neither a local path nor a model in the Hugging Face cache",
                   "nothing is downloaded")
    assert str(missing) in message.replace("\n", "")
    fail(["rmed", "runs/adam-*", "--data", str(examples_jsonl)], 3, "does not exist")
    fail(["compare", "tiny-org/absent", str(tiny_gpt2_dir), "--data", str(examples_jsonl)], 3,
         "run tiny-org/absent is neither a local path")
    repo = hub / "models--tiny-org--tiny-gpt2"
    (repo / "refs" / "main").write_text("f" * 40)
    with pytest.raises(InputError, match="incomplete: refs/main names commit"):
        locate("tiny-org/tiny-gpt2")
    (repo / "refs" / "main").unlink()
    assert locate("tiny-org/tiny-gpt2") == repo / "snapshots" / COMMIT  # the only snapshot there is
    fake_hub_cache(hub, "tiny-org/tiny-gpt2", tiny_gpt2_dir, commit="f" * 40, ref=False)
    fail(["rmed", "tiny-org/tiny-gpt2", "--data", str(examples_jsonl)], 3,
         "has no refs/main and 2 snapshots", "point at the snapshot folder")


def test_a_partial_download_is_an_input_error(tmp_path, monkeypatch, tiny_gpt2_dir, examples_jsonl):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_gpt2_dir / "tokenizer.json", partial)
    fake_hub_cache(tmp_path / "cache", "tiny-org/partial", partial)
    fail(["rmed", "tiny-org/partial", "--data", str(examples_jsonl)], 3, "holds no checkpoints")
