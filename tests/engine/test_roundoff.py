"""Hessians zero to round-off (issue 9, item 2): flagged where the maths says the Hessian is 0, never elsewhere.

Oracles: the structure of attention (softmax ignores a shift common to a row of scores, so a key bias that is
added before the scores — BERT, OPT, the key block of GPT-2's fused c_attn.bias — has an exactly zero Hessian,
while a key bias rotated by RoPE — Llama — does not), a layer cut off by a zero weight (exact zeros), and the dense
fp64 Hessian of ``torch.autograd.functional.hessian``, which must be 0 to 1e-12 of a neighbouring layer exactly
where the flag is raised. Every model is audited in fp32 and fp64, with and without micro-batches.
"""

import numpy as np
import pytest
import torch
import transformers
from torch.func import functional_call

from geomaudit.engine.audit import audit_checkpoint
from geomaudit.engine.hdiag import MicroBatch
from geomaudit.engine.roundoff import check_positions, recompute, relative_change, verdict
from geomaudit.engine.stats import diagonal_stats, saturated
from geomaudit.io.tasks import TASKS

VOCAB = 60


def _model(cls, config):
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return cls(config).eval()


def bert():
    return _model(transformers.BertForSequenceClassification, transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2))


def gpt2():
    return _model(transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0))


def llama():
    return _model(transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def opt():  # no RoPE, and its eager softmax runs in float32 even in a float64 model
    return _model(transformers.OPTForCausalLM, transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=32, word_embed_proj_dim=16, bos_token_id=0, eos_token_id=0, pad_token_id=1))


def batch(task):
    ids = torch.randint(2, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0]) if task == "classification" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def micro(tensors, split, dtype):
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    if split is None:
        return [MicroBatch(tensors, 1.0)]
    return [MicroBatch({k: v[i:i + split] for k, v in tensors.items()}, split / 4) for i in range(0, 4, split)]


def audit(model, task, dtype, split, layers=None, coords=8):
    model = model.to(dtype)
    names = layers or [n for n, _ in model.named_parameters()]
    return audit_checkpoint(model, TASKS[task].loss, micro(batch(task), split, dtype), names, coords=coords, seed=0)


CASES = {  # model, task, the layers whose Hessian is exactly zero
    "bert": (bert, "classification", [f"bert.encoder.layer.{i}.attention.self.key.bias" for i in (0, 1)]),
    "opt": (opt, "causal-lm", [f"model.decoder.layers.{i}.self_attn.k_proj.bias" for i in (0, 1)]),
    "llama": (llama, "causal-lm", []),  # RoPE rotates the key bias by the position: not a common shift
}


@pytest.mark.parametrize("split", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_flagged_exactly_where_the_hessian_is_zero(case, dtype, split):
    make, task, zero = CASES[case]
    result = audit(make(), task, dtype, split)
    assert [la.name for la in result.layers if la.zero_hessian] == zero
    for la in result.layers:
        assert la.roundoff is not None and la.roundoff["dtype"] == ("float32" if dtype == torch.float64 else "float64")
        if la.zero_hessian:
            assert all(la.stats[k] != la.stats[k] for k in ("r_med", "r_med_stab", "r_topk"))  # nan: JSON null
            assert la.to_dict()["stats"]["r_med"] is None and la.to_dict()["zero_hessian"] is True
        else:
            assert la.stats["r_med"] >= 1 and max(la.roundoff["changes"][:3]) < 1e-3


def _dense_diag(model, task, name):
    """Oracle: the fp64 dense Hessian of the loss w.r.t. one tensor (every other parameter fixed), its diagonal."""
    model = model.double()
    base = dict(model.named_parameters())[name].detach().clone()
    t = batch(task)

    def of(flat):
        logits = functional_call(model, {name: flat.reshape(base.shape)}, (),
                                 {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}).logits
        if task == "classification":
            return torch.nn.functional.cross_entropy(logits, t["labels"])
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), t["labels"][:, 1:].flatten())

    return torch.autograd.functional.hessian(of, base.reshape(-1)).diagonal()


@pytest.mark.parametrize("case, bound", [("bert", 1e-12), ("opt", 1e-5)])
def test_the_flagged_layers_are_zero_in_the_dense_oracle(case, bound):
    """Zero in exact arithmetic, so round-off in fp64: ~1e-16 of the query bias in BERT; in OPT, whose softmax
    runs in float32 even in a float64 model, ~1e-7."""
    make, task, zero = CASES[case]
    key = _dense_diag(make(), task, zero[0]).abs().max()
    query = _dense_diag(make(), task, zero[0].replace("key", "query").replace("k_proj", "q_proj")).abs().max()
    assert query > 0 and key <= bound * query


def test_llama_key_bias_is_real_and_small():
    """RoPE: the key bias is rotated by the position, so its Hessian is real, here ~100 times below the query's."""
    d = _dense_diag(llama(), "causal-lm", "model.layers.0.self_attn.k_proj.bias")
    result = audit(llama(), "causal-lm", torch.float32, None, ["model.layers.0.self_attn.k_proj.bias"], coords=32)
    (la,) = result.layers
    assert not la.zero_hessian
    np.testing.assert_allclose(la.h_diag, d.numpy(), rtol=1e-4, atol=1e-6 * float(d.abs().max()))


def test_one_layer_alone_is_judged_on_its_own():
    """No other layer is needed as a reference: a zero layer alone is flagged, a real one alone is not."""
    (key,) = audit(bert(), "classification", torch.float32, None, ["bert.encoder.layer.1.attention.self.key.bias"]).layers
    (ln,) = audit(bert(), "classification", torch.float32, None, ["bert.encoder.layer.1.output.LayerNorm.bias"]).layers
    assert key.zero_hessian and not ln.zero_hessian


def test_real_curvature_far_below_the_others_is_not_flagged():
    """With the classifier scaled by 1e-9 every encoder Hessian shrinks by ~1e-9 or more, down to the size of the
    key biases' fp32 round-off in the unscaled model: a small Hessian is not flagged for being small."""
    def small():
        model = bert()
        with torch.no_grad():
            model.classifier.weight.mul_(1e-9)
        return model

    name = "bert.encoder.layer.0.output.LayerNorm.bias"
    unscaled = {la.name: la for la in audit(bert(), "classification", torch.float32, None).layers}
    scaled = audit(small(), "classification", torch.float32, None).layers
    ln = next(la for la in scaled if la.name == name)
    key_roundoff = unscaled["bert.encoder.layer.0.attention.self.key.bias"].stats["max_abs"]
    assert ln.stats["max_abs"] < 1e3 * key_roundoff  # a real Hessian as small as round-off elsewhere
    assert [la.name for la in scaled if la.zero_hessian] == CASES["bert"][2]
    (exact,) = audit(small(), "classification", torch.float64, None, [name]).layers
    np.testing.assert_allclose(ln.h_diag, exact.h_diag, rtol=1e-3)  # and fp32 computes it right


def test_gpt2_key_block_of_the_fused_bias_is_round_off():
    """c_attn.bias is [q | k | v]: the k third is zero to round-off, the q and v thirds are real."""
    model = gpt2()
    tensors = micro(batch("causal-lm"), None, torch.float32)
    loss = TASKS["causal-lm"].loss
    name = "transformer.h.0.attn.c_attn.bias"
    from geomaudit.engine.hdiag import DiagonalEngine

    for block, zero in ((slice(0, 16), False), (slice(16, 32), True), (slice(32, 48), False)):
        idx = np.arange(48)[block]
        h = DiagonalEngine(model, loss, tensors).diagonal(name, idx).double().numpy()
        at = check_positions(h)
        again = recompute(model, loss, tensors, {name: idx[at]})[name]
        assert verdict(h, at, again)["zero_hessian"] == zero


def test_a_layer_cut_off_by_a_zero_weight_is_exactly_zero():
    """o_proj = 0 in block 1: nothing of that block's attention reaches the loss, so H_ii = 0 exactly."""
    model = llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    names = ["model.layers.1.self_attn.v_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    cut, kept = audit(model, "causal-lm", torch.float32, None, names).layers
    assert not cut.h_diag.any() and cut.zero_hessian and cut.roundoff is None
    assert not kept.zero_hessian


def test_check_positions_and_verdict_by_hand():
    h = np.array([4.0, 1.0, -2.0, 3.0, 0.5, 0.1, 0.2])
    at = check_positions(h)
    assert at.tolist() == [0, 3, 2, 1]  # three largest |h|, then the median (|h| = 1 at position 1)
    same = verdict(h, at, h[at] * (1 + 1e-6))
    assert not same["zero_hessian"] and not same["median_zero"]
    moved_median = verdict(h, at, np.array([4.0, 3.0, -2.0, 0.3]))
    assert not moved_median["zero_hessian"] and moved_median["median_zero"]
    moved_top = verdict(h, at, np.array([4.0, 3.0, -1.0, 1.0]))
    assert moved_top["zero_hessian"] and moved_top["median_zero"]
    assert relative_change(np.array([1.0, 0.0, -1.0]), np.array([1.0, 0.0, 1.0])).tolist() == [0.0, 0.0, 2.0]


def test_stats_of_flagged_layers():
    h = np.array([1e-15, -2e-15, 3e-16, 5e-15])
    zero = diagonal_stats(h, zero_hessian=True)
    assert all(zero[k] != zero[k] for k in ("r_med", "r_med_stab", "r_topk")) and zero["max_abs"] == 5e-15
    median = diagonal_stats(np.array([1e-15, 0.0, 2e-15, 3.0]), topk=1, median_zero=True)
    assert median["r_med"] == float("inf") and median["r_med_stab"] == pytest.approx(1000.0)
    assert saturated(median) and saturated({"r_med": 1000.0}) and not saturated({"r_med": 999.9})
    assert not saturated(zero)
