"""``--split-fused`` in the audit: each q, k, v block of a fused parameter is a layer with its own coordinates, H_ii
and flags, and its H_ii are the fused tensor's, checked against the dense fp64 Hessian of the loss with respect to
the fused tensor (``torch.autograd.functional.hessian``) on a tiny GPT-2 and a tiny GPT-NeoX."""

import numpy as np
import pytest
import torch
import transformers
from torch.func import functional_call

from geomaudit.engine.audit import audit_checkpoint, select_layers
from geomaudit.engine.fused import fused_blocks
from geomaudit.engine.hdiag import MicroBatch
from geomaudit.engine.sampling import sample_indices
from geomaudit.engine.stats import diagonal_stats
from geomaudit.io.tasks import TASKS

VOCAB = 40
MODELS = {
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)),
        "transformer.h.0.attn.c_attn"),
    "gpt_neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, attention_bias=True, bos_token_id=0, eos_token_id=0)),
        "gpt_neox.layers.0.attention.query_key_value"),
}


def _setup(kind):
    make, prefix = MODELS[kind]
    torch.manual_seed(0)
    model = make()
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # biases start at 0 in transformers: make every block's curvature generic
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.double().eval()
    ids = torch.randint(1, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))
    tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return model, prefix, tensors


def _dense_diag(model, name, tensors):
    base = dict(model.named_parameters())[name].detach().clone()

    def loss(flat):
        logits = functional_call(model, {name: flat.reshape(base.shape)}, (),
                                 {"input_ids": tensors["input_ids"], "attention_mask": tensors["attention_mask"]}).logits
        labels = tensors["labels"]
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    return torch.autograd.functional.hessian(loss, base.reshape(-1)).diagonal().numpy()


@pytest.mark.parametrize("split", [None, 2])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_block_h_diag_matches_the_dense_hessian_of_the_fused_tensor(kind, split):
    model, prefix, tensors = _setup(kind)
    found, uncovered = fused_blocks(model)
    assert uncovered == []
    layers = select_layers(model, [f"{prefix}.*"], found)
    assert layers == [f"{prefix}.{p}:{b}" for p in ("weight", "bias") for b in "qkv"]
    blocks = {b.name: b for bs in found.values() for b in bs}
    micro = ([MicroBatch(tensors, 1.0)] if split is None else
             [MicroBatch({k: v[i:i + split] for k, v in tensors.items()}, split / 4) for i in (0, 2)])
    result = audit_checkpoint(model, TASKS["causal-lm"].loss, micro, layers, blocks=blocks, coords=20, seed=0)
    dense = {p: _dense_diag(model, f"{prefix}.{p}", tensors) for p in ("weight", "bias")}
    for la in result.layers:
        block = blocks[la.name]
        assert la.block == block.label and la.of == {"name": block.param, "shape": list(block.fused_shape)}
        assert la.shape == block.shape and la.param == block.param
        # sampled within the block, seeded by the block's shape, mapped to the fused tensor
        assert la.indices.tolist() == block.fused_indices(sample_indices(block.shape, 20, 0)).tolist()
        assert set(la.indices) <= set(block.fused_indices(np.arange(int(np.prod(block.shape)))))
        oracle = dense[block.param.rsplit(".", 1)[1]][la.indices]
        np.testing.assert_allclose(la.h_diag, oracle, rtol=1e-9, atol=1e-13 * np.abs(dense["weight"]).max())
        assert la.roundoff is not None and la.roundoff["indices"][0] in la.indices
        if not la.zero_hessian:
            expected = diagonal_stats(oracle, 10, full=len(la.indices) == la.numel)
            assert la.stats["r_med"] == pytest.approx(expected["r_med"], rel=1e-6)
            assert la.stats["r_med_ci_low"] == pytest.approx(expected["r_med_ci_low"], rel=1e-6)
    # softmax ignores a shift common to a row: GPT-2's key bias has a zero Hessian; RoPE (GPT-NeoX) rotates the key
    # bias by the position, so there it is no common shift
    zero = [la.name for la in result.layers if la.zero_hessian]
    assert zero == ([f"{prefix}.bias:k"] if kind == "gpt2" else [])
    key_bias = np.abs(dense["bias"][result.layers[4].indices]).max() / np.abs(dense["bias"]).max()
    assert key_bias < 1e-12 if kind == "gpt2" else key_bias > 1e-6


def test_fused_blocks_have_different_curvature_scales():
    """Why the fused median misleads: on GPT-2 the value block's |H_ii| sit orders of magnitude above q and k's."""
    model, prefix, tensors = _setup("gpt2")
    dense = np.abs(_dense_diag(model, f"{prefix}.weight", tensors)).reshape(8, 24)
    q, k, v = (np.median(dense[:, i * 8:(i + 1) * 8]) for i in range(3))
    assert v > 10 * max(q, k)
