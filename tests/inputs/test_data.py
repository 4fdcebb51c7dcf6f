"""The audit batch (issue 9, item 4): a file of tensors is the batch, text is sampled with the seed, not cut."""

import json
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.cli.invoke import report, run
from tests.engine.test_deep_linear import lemma30, rel

DEEP_LINEAR = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))

    def half_mse(model, batch):
        return 0.5 * ((model(batch["x"]) - batch["y"]) ** 2).sum(-1).mean()
""")


def test_a_file_of_tensors_is_the_whole_batch(tmp_path, monkeypatch):
    """Oracle: Lemma 30 (App. G) over all 64 examples of the file; the first 32 alone would be far off."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deeplinear.py").write_text(DEEP_LINEAR)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False), torch.nn.Linear(4, 3, bias=False),
                                torch.nn.Linear(3, 2, bias=False))
    save_file(model.state_dict(), "net.safetensors")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 5)) @ rng.standard_normal((5, 5))
    x[32:] *= 3  # the second half differs: a batch of the first 32 rows has another Σ_x
    y = rng.standard_normal((64, 2))
    save_file({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, "data.safetensors")
    args = ("rmed", "net.safetensors", "--model", "deeplinear:build", "--loss", "deeplinear:half_mse",
            "--data", "data.safetensors", "--coords", "20", "--precision", "fp64")
    document = report(*args)
    assert document["data"]["examples"] == document["data"]["available"] == 64
    assert document["data"]["selection"] == "all 64 examples" and document["data"]["sample_seed"] is None
    assert document["settings"]["batch_size"] is None
    weights = [p.detach().double().numpy() for p in model.parameters()]
    whole, first_half = lemma30(weights, x), lemma30(weights, x[:32])
    for layer, want, wrong in zip(document["checkpoints"][0]["layers"], whole, first_half):
        got, at = np.asarray(layer["h_diag"]), np.asarray(layer["indices"])
        assert rel(got, want.reshape(-1)[at]) <= 1e-10
        assert rel(got, wrong.reshape(-1)[at]) > 0.1  # the check can fail: the first 32 rows are another batch

    sample = report(*args, "--batch-size", "10")
    assert sample["data"]["selection"] == "10 of 64 examples, sampled with seed 0"
    assert run(*args, "--batch-size", "10").stderr.count("10 of 64 examples, sampled with seed 0") == 1


def test_text_is_sampled_with_the_seed_not_cut(tiny_bert_dir, tmp_path):
    """A file sorted by class: its first 32 lines are all class 0, the seeded sample holds both classes."""
    rows = [{"text": f"example number {i} of the sorted file", "label": int(i >= 60)} for i in range(100)]
    data = tmp_path / "sorted.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from geomaudit.io.checkpoints import load_checkpoint
    from geomaudit.io.data import build_batch, read_records

    loaded = load_checkpoint(tiny_bert_dir)
    records = read_records(data)
    batch = build_batch(records, loaded, batch_size=None, max_length=32, seed=0, source="sorted.jsonl")
    labels = batch.tensors["labels"].tolist()
    assert batch.examples == 32 and 0 < sum(labels) < 32  # both classes
    assert batch.selection == "32 of 100 examples, sampled with seed 0"
    again = build_batch(records, loaded, batch_size=None, max_length=32, seed=0, source="sorted.jsonl")
    other = build_batch(records, loaded, batch_size=None, max_length=32, seed=1, source="sorted.jsonl")
    assert again.fingerprint == batch.fingerprint != other.fingerprint
    whole = build_batch(records, loaded, batch_size=200, max_length=32, seed=0, source="sorted.jsonl")
    assert whole.selection == "all 100 examples" and whole.tensors["labels"].tolist() == [r["label"] for r in rows]

    document = report("rmed", str(tiny_bert_dir), "--data", str(data), "--coords", "3", "--layers", "classifier.bias")
    assert document["data"]["selection"] == "32 of 100 examples, sampled with seed 0"
    assert document["data"]["available"] == 100 and document["data"]["sample_seed"] == 0
    assert "audit batch: 32 of 100 examples, sampled with seed 0" in run(
        "rmed", str(tiny_bert_dir), "--data", str(data), "--coords", "3", "--layers", "classifier.bias").stderr


def test_a_huge_line_is_cut_before_tokenizing(tiny_gpt2_dir, monkeypatch):
    """A 10 MB single line is cut to CHARS_PER_TOKEN characters per token before the tokenizer sees it; the
    tokens are the same as the whole line's first max_length tokens."""
    from geomaudit.io.checkpoints import load_checkpoint
    from geomaudit.io.data import CHARS_PER_TOKEN, TextRecords, build_batch

    loaded = load_checkpoint(tiny_gpt2_dir)
    words = " ".join(f"word{i % 97}" for i in range(2_000_000))
    assert len(words) > 10_000_000
    calls, tokenizer = [], loaded.tokenizer
    original = type(tokenizer).__call__

    def spy(self, texts, *args, **kwargs):  # records what the tokenizer is given
        calls.append(max(map(len, texts)))
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    batch = build_batch(TextRecords([words]), loaded, batch_size=None, max_length=16, seed=0, source="x")
    monkeypatch.undo()
    assert calls == [16 * CHARS_PER_TOKEN]
    full = tokenizer(words[:100_000], truncation=True, max_length=16, return_tensors="pt")["input_ids"]
    assert torch.equal(batch.tensors["input_ids"], full)


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_text_file_is_an_input_error(tiny_gpt2_dir, tmp_path, content):
    (tmp_path / "empty.txt").write_text(content)
    result = run("rmed", str(tiny_gpt2_dir), "--data", str(tmp_path / "empty.txt"), code=3)
    assert "holds no examples" in result.stderr
