"""PEFT adapter folders: H_ii of the LoRA tensors against a dense Hessian of a hand-written LoRA forward, the
merged model against a hand-merged checkpoint, and every error of adapters.py."""

import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertModel, GPT2LMHeadModel

from geomaudit.cache import checkpoint_digest
from geomaudit.errors import InputError
from tests.cli.invoke import report, run
from tests.cli.test_errors import Opaque, fail

R, ALPHA = 2, 6.0
LAYER = "transformer.h.0.attn.c_attn"


def _tokens(vocab: int, path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    tensors = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    save_file(tensors, path)
    return tensors


def _lora_adapter(base_dir, out, **extra):
    """A LoRA adapter on GPT-2's fused c_attn (a transposed Conv1D), with non-zero B so that every H_ii is live."""
    from peft import LoraConfig, get_peft_model

    base = GPT2LMHeadModel.from_pretrained(base_dir)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.3,
                        init_lora_weights=False, task_type="CAUSAL_LM", **extra)
    torch.manual_seed(1)
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_gpt2_dir, tmp_path_factory):
    return _lora_adapter(tiny_gpt2_dir, tmp_path_factory.mktemp("lora") / "adapter")


def _oracle_loss(base, tensors, weights):
    """Next-token cross-entropy (fp64) of ``base`` with the LoRA update W + (α/r)(BA)ᵀ written out by hand."""
    out = torch.func.functional_call(base, weights, kwargs={"input_ids": tensors["input_ids"],
                                                            "attention_mask": tensors["attention_mask"]})
    logits, labels = out.logits[:, :-1], tensors["labels"][:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _adapter_tensors(adapter, layer=LAYER):
    state = load_file(adapter / "adapter_model.safetensors")
    prefix = f"base_model.model.{layer}"
    return state[f"{prefix}.lora_A.weight"].double(), state[f"{prefix}.lora_B.weight"].double()


def test_lora_h_diag_matches_a_dense_hessian(adapter, tiny_gpt2_dir, tmp_path):
    base = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="eager").double().eval()
    tensors = _tokens(base.config.vocab_size, tmp_path / "tokens.safetensors")
    scale, other = ALPHA / R, "transformer.h.1.attn.c_attn"
    a, b = _adapter_tensors(adapter)
    a1, b1 = _adapter_tensors(adapter, other)
    w, w1 = (base.get_parameter(f"{name}.weight").detach() for name in (LAYER, other))

    def loss_of(a_, b_):
        return _oracle_loss(base, tensors, {f"{LAYER}.weight": w + scale * (b_ @ a_).T,
                                            f"{other}.weight": w1 + scale * (b1 @ a1).T})

    document = report("rmed", str(adapter), "--data", str(tmp_path / "tokens.safetensors"), "--precision", "fp64",
                      "--coords", "1000", "--layers", f"{LAYER}.lora_*")
    assert document["model"]["format"] == "peft-adapter" and document["model"]["base"] == str(tiny_gpt2_dir)
    assert document["model"]["task"] == "causal-lm" and document["model"]["initialised"] == []
    layers = {la["name"]: la for la in document["checkpoints"][0]["layers"]}
    assert sorted(layers) == [f"{LAYER}.lora_A.default.weight", f"{LAYER}.lora_B.default.weight"]
    for name, dense in ((f"{LAYER}.lora_A.default.weight",
                         torch.autograd.functional.hessian(lambda x: loss_of(x.view_as(a), b), a.flatten())),
                        (f"{LAYER}.lora_B.default.weight",
                         torch.autograd.functional.hessian(lambda x: loss_of(a, x.view_as(b)), b.flatten()))):
        layer = layers[name]
        assert layer["coords"] == dense.shape[0]
        expected = dense.diagonal()[layer["indices"]]
        assert torch.allclose(torch.tensor(layer["h_diag"], dtype=torch.float64), expected, rtol=1e-9, atol=1e-14)
        assert expected.abs().max() > 1e-6
    assert document["checkpoints"][0]["loss"] == pytest.approx(float(loss_of(a, b)), rel=1e-12)


def test_default_layers_are_the_adapter_tensors(adapter, tiny_gpt2_dir, tmp_path):
    _tokens(300, tmp_path / "tokens.safetensors")
    document = report("rmed", str(adapter), "--data", str(tmp_path / "tokens.safetensors"), "--coords", "3")
    names = [la["name"] for la in document["checkpoints"][0]["layers"]]
    assert names == [f"transformer.h.{i}.attn.c_attn.lora_{m}.default.weight" for i in (0, 1) for m in "AB"]


def test_merged_adapter_is_the_hand_merged_model(adapter, tiny_gpt2_dir, tmp_path):
    base = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    state = load_file(adapter / "adapter_model.safetensors")
    with torch.no_grad():
        for i in (0, 1):
            prefix = f"base_model.model.transformer.h.{i}.attn.c_attn"
            delta = state[f"{prefix}.lora_B.weight"] @ state[f"{prefix}.lora_A.weight"]
            base.get_parameter(f"transformer.h.{i}.attn.c_attn.weight").add_(ALPHA / R * delta.T)
    merged = tmp_path / "merged"
    base.save_pretrained(merged)
    shutil.copy(tiny_gpt2_dir / "tokenizer.json", merged)
    _tokens(base.config.vocab_size, tmp_path / "tokens.safetensors")
    args = ("--data", str(tmp_path / "tokens.safetensors"), "--precision", "fp64", "--coords", "8",
            "--layers", "transformer.h.*.attn.c_attn.weight", "--layers", "transformer.h.1.mlp.c_fc.bias")
    by_hand = report("rmed", str(merged), *args)
    via_merge = report("rmed", str(adapter), "--merge", *args)
    assert via_merge["model"]["format"] == "peft-merged" and via_merge["settings"]["merge"] is True
    for ours, theirs in zip(via_merge["checkpoints"][0]["layers"], by_hand["checkpoints"][0]["layers"], strict=True):
        assert ours["name"] == theirs["name"] and ours["indices"] == theirs["indices"]
        assert ours["h_diag"] == pytest.approx(theirs["h_diag"], rel=1e-5, abs=1e-12)


def test_svd_of_the_merged_adapter(adapter):
    document = report("svd", str(adapter), "--merge", "--layers", "*c_attn.weight")
    assert [la["name"] for la in document["svd"]["checkpoints"][0]["layers"]] == [
        f"transformer.h.{i}.attn.c_attn.weight" for i in (0, 1)]
    assert document["settings"]["merge"] is True


def test_a_classifier_adapter_restores_its_head(tmp_path):
    """SEQ_CLS on a headless base: the head peft saved (modules_to_save), of 3 classes although the data has only
    labels 0 and 1, replaces the seeded one."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, architectures=["BertModel"])
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "base")
    clf = BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    torch.nn.init.normal_(clf.classifier.weight, std=2.0)
    model = get_peft_model(clf, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "adapter")
    head = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    head = head[next(k for k in head if k.endswith("classifier.weight"))]
    gen = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(0, 40, (4, 6), generator=gen), "labels": torch.tensor([0, 1, 1, 0])},
              tmp_path / "tokens.safetensors")
    document = report("rmed", str(tmp_path / "adapter"), "--data", str(tmp_path / "tokens.safetensors"),
                      "--coords", "4")
    assert document["model"]["task"] == "classification" and document["model"]["initialised"] == []
    names = [la["name"] for la in document["checkpoints"][0]["layers"]]
    assert "classifier.modules_to_save.default.weight" in names and any("lora_A" in n for n in names)
    assert head.shape == (3, 8) and head.abs().max() > 1  # the trained head, not a fresh N(0, 0.02) one:
    from geomaudit.io.checkpoints import load_checkpoint

    loaded = load_checkpoint(tmp_path / "adapter")
    assert torch.equal(loaded.model.get_parameter("classifier.modules_to_save.default.weight").detach(), head)


def test_adapter_trajectory_and_cache(adapter, tiny_gpt2_dir, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    for step in (10, 20):
        shutil.copytree(adapter, run_dir / f"checkpoint-{step}")
    state = load_file(run_dir / "checkpoint-20" / "adapter_model.safetensors")
    save_file({k: 2 * v for k, v in state.items()}, run_dir / "checkpoint-20" / "adapter_model.safetensors")
    _tokens(300, tmp_path / "tokens.safetensors")
    args = ("--data", str(tmp_path / "tokens.safetensors"), "--coords", "3", "--layers", "*h.0*lora_B*",
            "--cache-dir", str(cache_dir))
    first = report("rmed", str(run_dir), *args)
    assert [c["step"] for c in first["checkpoints"]] == [10, 20]
    assert first["checkpoints"][0]["layers"][0]["h_diag"] != first["checkpoints"][1]["layers"][0]["h_diag"]
    assert all(not la["cached"] for c in first["checkpoints"] for la in c["layers"])
    again = report("rmed", str(run_dir), *args)
    assert all(la["cached"] for c in again["checkpoints"] for la in c["layers"])
    merged = report("rmed", str(run_dir / "checkpoint-10"), "--merge", *args[:-4], "--layers", "*h.0.attn.c_attn.w*",
                    "--cache-dir", str(cache_dir))
    assert not merged["checkpoints"][0]["layers"][0]["cached"]


def test_cache_key_covers_the_base_model(adapter, tiny_gpt2_dir, tmp_path):

    base = tmp_path / "base"
    shutil.copytree(tiny_gpt2_dir, base)
    moved = tmp_path / "adapter"
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(base)}))
    before = checkpoint_digest(moved)
    state = load_file(base / "model.safetensors")
    state["transformer.ln_f.bias"] = state["transformer.ln_f.bias"] + 1
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint_digest(moved) != before


def _edit_config(adapter, tmp_path, **changes):
    moved = tmp_path / "edited"
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text()) | changes
    (moved / "adapter_config.json").write_text(json.dumps(config))
    return str(moved)


def test_adapter_errors(adapter, tiny_gpt2_dir, tmp_path):
    _tokens(300, tmp_path / "t.safetensors")
    data = ("--data", str(tmp_path / "t.safetensors"), "--coords", "2")
    fail(["rmed", _edit_config(adapter, tmp_path, base_model_name_or_path=str(tmp_path / "gone")), *data], 3,
         "the adapter's base model", "does not exist: point base_model_name_or_path in")
    shutil.rmtree(tmp_path / "edited")
    fail(["rmed", _edit_config(adapter, tmp_path, base_model_name_or_path=None), *data], 3, "names no base model")
    (tmp_path / "edited" / "adapter_config.json").write_text("{not json")
    fail(["rmed", str(tmp_path / "edited"), *data], 3, "cannot read", "adapter_config.json")
    with pytest.raises(InputError, match="cannot read .*adapter_config.json"):  # the cache digest reads it too
        checkpoint_digest(tmp_path / "edited")
    (tmp_path / "edited" / "adapter_config.json").write_text(json.dumps(
        json.loads((adapter / "adapter_config.json").read_text()) | {"peft_type": "NO_SUCH_TYPE"}))
    fail(["rmed", str(tmp_path / "edited"), *data], 3, "cannot read", "adapter_config.json")
    shutil.rmtree(tmp_path / "edited")
    fail(["rmed", _edit_config(adapter, tmp_path, target_modules=["no_such_module"]), *data], 3,
         "does not fit its base model")
    (tmp_path / "edited" / "adapter_model.safetensors").unlink()
    fail(["rmed", str(tmp_path / "edited"), *data], 3, "has no adapter_model.safetensors or adapter_model.bin")
    fail(["rmed", str(adapter), "--model", "m:f", *data], 2, "PEFT adapter", "--model")
    fail(["rmed", str(tiny_gpt2_dir), "--merge", *data], 2, "--merge", "not an adapter folder")


def test_adapter_tensors_that_do_not_fit(adapter, tmp_path):
    _tokens(300, tmp_path / "t.safetensors")
    data = ("--data", str(tmp_path / "t.safetensors"), "--coords", "2")
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    state = load_file(adapter / "adapter_model.safetensors")
    save_file(state | {"base_model.model.transformer.h.0.attn.c_attn.lora_C.weight": torch.zeros(2)},
              bad / "adapter_model.safetensors")
    fail(["rmed", str(bad), *data], 3, "has tensors the base model has no place for", "lora_C")
    save_file({k: v for k, v in state.items() if "h.1" not in k}, bad / "adapter_model.safetensors")
    fail(["rmed", str(bad), *data], 3, "lacks 2 of its tensors")
    key = f"base_model.model.{LAYER}.lora_A.weight"
    save_file(state | {key: torch.zeros(R + 1, 16)}, bad / "adapter_model.safetensors")
    fail(["rmed", str(bad), *data], 3, "does not fit its base model")


def test_pickled_adapter_weights(adapter, tmp_path):
    _tokens(300, tmp_path / "t.safetensors")
    data = ("--data", str(tmp_path / "t.safetensors"), "--coords", "2", "--layers", "*h.0*lora_A*", "--json", "-")
    binary = tmp_path / "binary"
    shutil.copytree(adapter, binary)
    state = load_file(binary / "adapter_model.safetensors")
    (binary / "adapter_model.safetensors").unlink()
    torch.save(state, binary / "adapter_model.bin")
    reference = json.loads(run("rmed", str(adapter), *data).stdout)["checkpoints"][0]["layers"]
    assert json.loads(run("rmed", str(binary), *data).stdout)["checkpoints"][0]["layers"][0]["h_diag"] == \
        reference[0]["h_diag"]
    torch.save(state | {"note": Opaque()}, binary / "adapter_model.bin")
    fail(["rmed", str(binary), *data], 3, "refusing to unpickle", "--allow-pickle")


def test_prompt_learning_adapter_is_refused(tiny_gpt2_dir, tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model.save_pretrained(tmp_path / "prompt")
    _tokens(300, tmp_path / "t.safetensors")
    fail(["rmed", str(tmp_path / "prompt"), "--data", str(tmp_path / "t.safetensors")], 3,
         "PROMPT_TUNING adapter", "virtual tokens")


def test_missing_peft_is_a_usage_error(adapter, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    _tokens(300, tmp_path / "t.safetensors")
    fail(["rmed", str(adapter), "--data", str(tmp_path / "t.safetensors")], 2, "pip install 'geomaudit[peft]'")
