"""The task table and the loss's item count: micro-batches weighted exactly, or refused (issue 9, item 1).

Oracles: the unsplit batch, a hand-written fp64 token-mean cross-entropy, and the dense Hessian of it.
"""

import json
import shutil
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file, save_model

from geomaudit.errors import InputError, UsageError
from geomaudit.io.checkpoints import load_checkpoint
from geomaudit.io.tasks import IGNORE_INDEX, TASKS, infer_task
from tests.cli.invoke import report, run
from tests.engine.test_hdiag import causal_lm_loss_fp64, oracle_diag, padded_lm_batch, rel_err

FACTORIES = textwrap.dedent("""
    import torch
    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=8, n_layer=2, n_head=2, n_positions=16,
                                          bos_token_id=0, eos_token_id=0))

    def token_mean(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
        return loss, (labels != -100).sum()

    def token_mean_undeclared(model, batch):
        return token_mean(model, batch)[0]

    def bad_items(model, batch):
        return token_mean(model, batch)[0], 2.5

    class Scorer(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(3, 1)

        def forward(self, x, y):
            return {"loss": ((self.lin(x).squeeze(-1) - y) ** 2).mean()}
""")
LAYER = "transformer.h.0.attn.c_attn.weight"


@pytest.fixture
def lm_files(tmp_path, monkeypatch):
    """A GPT-2 state dict, its factory module, and a right-padded batch of 12 with 2..8 tokens per example."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "factories", raising=False)
    (tmp_path / "factories.py").write_text(FACTORIES)
    from factories import gpt2  # the module just written

    save_model(gpt2(), tmp_path / "lm.safetensors")  # the tied lm_head.weight / wte: one name kept
    save_file(padded_lm_batch(), tmp_path / "padded.safetensors")
    yield tmp_path
    sys.modules.pop("factories", None)


def audit(*args: str) -> dict:
    document = report("rmed", *args, "--layers", LAYER, "--coords", "12", "--precision", "fp64", "--no-cache")
    return document


def test_model_without_loss_weights_micro_batches_by_tokens(lm_files):
    """The issue's reproducer: a causal LM from --model, no --loss, padding and --micro-batch 3."""
    from factories import gpt2

    args = ("lm.safetensors", "--model", "factories:gpt2", "--data", "padded.safetensors")
    whole, split = audit(*args), audit(*args, "--micro-batch", "3")
    assert whole["model"]["task"] == "causal-lm"
    tensors = padded_lm_batch()
    model = gpt2().double().eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        exact = float(causal_lm_loss_fp64(model, tensors))
    tokens = int((tensors["labels"][:, 1:] != IGNORE_INDEX).sum())
    for document in (whole, split):
        assert document["checkpoints"][0]["loss"] == pytest.approx(exact, rel=1e-12)
        assert document["data"]["loss_items"] == tokens
    (layer,) = whole["checkpoints"][0]["layers"]
    oracle = oracle_diag(model, LAYER, lambda fwd: causal_lm_loss_fp64(fwd, tensors), layer["indices"])
    assert rel_err(layer["h_diag"], oracle) <= 1e-10
    assert rel_err(split["checkpoints"][0]["layers"][0]["h_diag"], oracle) <= 1e-10


def test_user_loss_declares_its_item_count(lm_files):
    """``--loss`` returning (loss, items): split and unsplit agree; the same loss returned bare is weighted by
    examples, which is wrong for it, as the comparison shows (the check can fail)."""
    args = ("lm.safetensors", "--model", "factories:gpt2", "--data", "padded.safetensors")
    whole = audit(*args, "--loss", "factories:token_mean")
    split = audit(*args, "--loss", "factories:token_mean", "--micro-batch", "3")
    undeclared = audit(*args, "--loss", "factories:token_mean_undeclared", "--micro-batch", "3")
    h = [d["checkpoints"][0]["layers"][0]["h_diag"] for d in (whole, split, undeclared)]
    assert rel_err(h[1], h[0]) <= 1e-10 and rel_err(h[2], h[0]) > 1e-3
    assert split["data"]["loss_items"] == whole["data"]["loss_items"] == int(
        (padded_lm_batch()["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert undeclared["data"]["loss_items"] == 12
    result = run("rmed", *args, "--loss", "factories:bad_items", "--micro-batch", "3", code=2)
    assert "must be (loss, items)" in result.stderr


def test_unknown_item_count_refuses_to_split(lm_files):
    """A model whose ``.loss`` geomaudit cannot count: one micro-batch works, several are refused."""
    torch.manual_seed(0)
    save_file({"lin.weight": torch.randn(1, 3), "lin.bias": torch.zeros(1)}, lm_files / "scorer.safetensors")
    save_file({"x": torch.randn(6, 3), "y": torch.randn(6)}, lm_files / "xy.safetensors")
    args = ("rmed", "scorer.safetensors", "--model", "factories:Scorer", "--data", "xy.safetensors")
    document = report(*args)
    assert document["model"]["task"] == "custom" and document["data"]["loss_items"] is None
    result = run(*args, "--micro-batch", "4", code=2)
    assert "does not say how many terms it averages over" in result.stderr


def test_any_head_that_takes_labels_is_audited_on_its_own_loss(tmp_path):
    """The general path: a head without a row in the table (multiple choice) uses ``model(**batch).loss``."""
    from transformers import BertConfig, BertForMultipleChoice

    assert infer_task("BertForMultipleChoice", False).name == "custom"
    folder = tmp_path / "choice"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, architectures=["BertForMultipleChoice"])
    model = BertForMultipleChoice(config).eval()
    model.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    data = {"input_ids": torch.randint(0, 30, (4, 3, 6), generator=g), "labels": torch.tensor([0, 2, 1, 1])}
    save_file(data, tmp_path / "choices.safetensors")
    document = report("rmed", str(folder), "--data", str(tmp_path / "choices.safetensors"), "--layers",
                      "classifier.*", "--coords", "4")
    assert document["model"]["class"] == "BertForMultipleChoice" and document["model"]["task"] == "custom"
    with torch.no_grad():
        assert document["checkpoints"][0]["loss"] == pytest.approx(float(model(**data).loss), rel=1e-6)
    result = run("rmed", str(folder), "--data", str(tmp_path / "choices.safetensors"), "--micro-batch", "2", code=2)
    assert "does not say how many terms" in result.stderr


def test_task_rows_and_loading_errors(tiny_gpt2_dir, tmp_path):
    assert infer_task("T5ForConditionalGeneration", False).name == "seq2seq-lm"
    assert infer_task("BartForConditionalGeneration", False).name == "seq2seq-lm"  # also a masked LM to transformers
    assert infer_task("ViTModel", True, "vit").name == "image-classification"
    assert infer_task("BertModel", True, "bert").name == "classification"
    with pytest.raises(UsageError, match="--task must be one of"):
        load_checkpoint(tiny_gpt2_dir, task="regression")
    folder = tmp_path / "unknown"
    folder.mkdir()
    config = json.loads((tiny_gpt2_dir / "config.json").read_text()) | {"architectures": ["GPT2NoSuchHead"]}
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny_gpt2_dir / "model.safetensors", folder)
    with pytest.raises(InputError, match="has no model class GPT2NoSuchHead"):
        load_checkpoint(folder, task="custom")


def test_task_names_agree_everywhere():
    """The table is the one list: the --task choices and the schema's enums follow it."""
    from geomaudit.cli.options import Task as TaskOption
    from geomaudit.report.document import schema

    properties = schema()["properties"]
    assert all(t.name == n for n, t in TASKS.items())
    assert [o.value for o in TaskOption] == ["auto", *TASKS]
    assert properties["settings"]["properties"]["task"]["enum"] == ["auto", *TASKS]
    assert properties["model"]["properties"]["task"]["enum"] == list(TASKS)
