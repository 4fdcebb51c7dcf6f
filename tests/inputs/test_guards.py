"""Checkpoints that must not run code, prompt, or be filled with random weights (issue 10)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.cli.invoke import report, run

ROOT = Path(__file__).resolve().parents[2]
EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("the checkpoint's code ran")
from transformers import GPT2Config


class EvilConfig(GPT2Config):
    model_type = "evil-gpt2"
"""


def copy_of(folder: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config))


def geomaudit(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """The real command line in a subprocess, stdin given, so that a prompt would show on stdout."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "geomaudit", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_a_checkpoint_with_its_own_code_never_runs_it(tiny_gpt2_dir, tmp_path, where):
    """stdin says "y", as a user would to transformers' "Do you wish to run the custom code? [y/N]"."""
    folder = copy_of(tiny_gpt2_dir, tmp_path, "evil")
    marker = tmp_path / "MARKER"
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    if where == "config.json":
        edit_config(folder, model_type="evil-gpt2", auto_map={"AutoConfig": "evil.EvilConfig",
                                                              "AutoModelForCausalLM": "evil.EvilModel"})
    else:
        tok = json.loads((folder / where).read_text()) | {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}
        (folder / where).write_text(json.dumps(tok))
    result = geomaudit("rmed", str(folder), "--coords", "2", "--json", "-", stdin="y\n")
    assert result.returncode == 3, result.stderr
    assert not marker.exists()
    assert result.stdout == "" and "custom code" not in result.stderr
    assert "auto_map" in result.stderr and "never runs code from a checkpoint" in result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr


def test_a_model_type_transformers_does_not_know_is_refused(tiny_gpt2_dir, tmp_path):
    folder = copy_of(tiny_gpt2_dir, tmp_path, "unknown")
    edit_config(folder, model_type="my-own-gpt")
    assert "names model_type 'my-own-gpt', which transformers does not know" in run(
        "rmed", str(folder), code=3).stderr
    edit_config(folder, model_type={"x": "gpt2"})  # not even a name (found by the fuzz suite)
    assert "names model_type {'x': 'gpt2'}, which transformers does not know" in run(
        "rmed", str(folder), code=3).stderr


def test_weights_that_do_not_match_the_config_are_refused(tiny_gpt2_dir, tmp_path):
    """Renamed tensors, and a config of another model over the weights: never a randomly filled model."""
    renamed = copy_of(tiny_gpt2_dir, tmp_path, "renamed")
    state = load_file(renamed / "model.safetensors")
    save_file({f"backbone.{k}": v for k, v in state.items()}, renamed / "model.safetensors")
    stderr = run("rmed", str(renamed), "--coords", "2", code=3).stderr
    assert "lacks weights its config.json asks for" in stderr and "transformer." in stderr

    bert = copy_of(tiny_gpt2_dir, tmp_path, "bert-over-gpt2")  # BERT-base's 110M parameters, built on meta
    edit_config(bert, model_type="bert", architectures=["BertForMaskedLM"])
    assert "describes a model of" in run("rmed", str(bert), "--coords", "2", code=3).stderr

    wider = copy_of(tiny_gpt2_dir, tmp_path, "wider")  # a vocabulary twice the real one passes both bounds
    vocab = json.loads((tiny_gpt2_dir / "config.json").read_text())["vocab_size"]
    edit_config(wider, vocab_size=2 * vocab)
    assert f"holds transformer.wte.weight of shape ({vocab}, 16), but its config.json asks for ({2 * vocab}, 16)" \
        in run("rmed", str(wider), "--coords", "2", code=3).stderr


@pytest.mark.parametrize("key, value, phrase", [
    ("n_layer", 10**6, "but the checkpoint holds only"),
    ("vocab_size", 10**8, "far beyond any dimension"),
    ("num_labels", 10**9, "far beyond any dimension"),
    ("n_positions", 10**7, "far beyond any dimension"),
])
def test_config_sizes_are_checked_against_the_real_tensors(tiny_gpt2_dir, tmp_path, key, value, phrase):
    """Before transformers reads the config (num_labels 10**9 alone would build a billion label names)."""
    folder = copy_of(tiny_gpt2_dir, tmp_path, key)
    edit_config(folder, **{key: value})
    stderr = run("rmed", str(folder), "--coords", "2", code=3).stderr
    assert f"{key} = {value}" in stderr and phrase in stderr


def test_a_head_the_audit_adds_is_listed_not_refused(tiny_bert_dir, tmp_path, examples_jsonl):
    """A headless BertModel with labelled data: the new classifier is missing on purpose and listed."""
    from transformers import AutoModel

    folder = tmp_path / "headless"
    AutoModel.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    for f in tiny_bert_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(f, folder / f.name)
    document = report("rmed", str(folder), "--data", str(examples_jsonl), "--coords", "2", "--layers", "classifier.*")
    assert document["model"]["initialised"] == ["classifier.bias", "classifier.weight"]
    # a weight of the base model missing from the same folder is an error
    state = {k: v for k, v in load_file(folder / "model.safetensors").items() if "pooler" not in k}
    save_file(state, folder / "model.safetensors")
    stderr = run("rmed", str(folder), "--data", str(examples_jsonl), "--coords", "2", code=3).stderr
    assert "lacks weights" in stderr and "pooler" in stderr
