"""Every input format of SPEC §3 gives the same audit as the reference format."""

import csv
import json
import shutil

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from geomaudit.cli import app
from tests.cli.test_errors import FACTORY, Opaque, fail

runner = CliRunner()
LAYER = "bert.encoder.layer.1.output.LayerNorm.weight"


def h_diag(*args: str) -> list[float]:
    result = runner.invoke(app, ["rmed", *args, "--layers", LAYER, "--coords", "6", "--batch-size", "5", "--json", "-"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["checkpoints"][0]["layers"][0]["h_diag"]


def test_checkpoint_formats_agree(tiny_bert_dir, examples_jsonl, tmp_path):
    reference = h_diag(str(tiny_bert_dir), "--data", str(examples_jsonl))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    binary = tmp_path / "binary"
    binary.mkdir()
    torch.save(load_file(tiny_bert_dir / "model.safetensors"), binary / "pytorch_model.bin")
    for folder in (sharded, binary):
        for f in tiny_bert_dir.iterdir():
            if f.name.startswith(("tokenizer", "vocab", "config", "special")):
                shutil.copy(f, folder / f.name)
        assert h_diag(str(folder), "--data", str(examples_jsonl)) == reference

    torch.save(load_file(tiny_bert_dir / "model.safetensors") | {"note": Opaque()}, binary / "pytorch_model.bin")
    fail(["rmed", str(binary), "--data", str(examples_jsonl)], 3, "refusing to unpickle", "--allow-pickle")
    assert h_diag(str(binary), "--data", str(examples_jsonl), "--allow-pickle") == reference


def test_data_formats_agree(tiny_bert_dir, examples_jsonl, tmp_path):
    rows = [json.loads(line) for line in examples_jsonl.read_text().splitlines()]
    reference = h_diag(str(tiny_bert_dir), "--data", str(examples_jsonl))
    with open(tmp_path / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    assert h_diag(str(tiny_bert_dir), "--data", str(tmp_path / "data.csv")) == reference

    from geomaudit.io.checkpoints import load_checkpoint
    from geomaudit.io.data import build_batch, read_records

    loaded = load_checkpoint(tiny_bert_dir)
    batch = build_batch(read_records(examples_jsonl), loaded, batch_size=5, max_length=128, seed=0, source="x")
    torch.save(batch.tensors, tmp_path / "tokens.pt")
    assert h_diag(str(tiny_bert_dir), "--data", str(tmp_path / "tokens.pt")) == reference


def test_text_lines_for_a_language_model(tiny_gpt2_dir, examples_jsonl, tmp_path):
    lines = [json.loads(line)["text"] for line in examples_jsonl.read_text().splitlines()]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["rmed", str(tiny_gpt2_dir), "--data", str(tmp_path / "lines.txt"),
                                 "--coords", "4", "--layers", "transformer.ln_f.weight", "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["data"]["examples"] == 32 and document["data"]["source"].endswith("lines.txt")


def test_lightning_checkpoint_with_model_prefix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tinymlp.py").write_text(FACTORY)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, "run.ckpt")
    torch.save({"x": torch.randn(6, 3), "y": torch.randn(6)}, "data.pt")
    result = runner.invoke(app, ["rmed", "run.ckpt", "--model", "tinymlp:build", "--loss", "tinymlp:mse",
                                 "--data", "data.pt", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"]["examples"] == 6
