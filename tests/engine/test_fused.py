"""``--split-fused``'s layout table (``engine.fused.FUSED``): every row checked on a tiny model built from a config.

A block is labelled right when it plays its part in attention: zeroing the query block (weight and bias) makes the
scores independent of the keys, so the gradient of the key block is exactly 0; zeroing the key block does the same
to the query block, zeroing the value block to both (the attention output is 0). A mislabelled or misplaced block
breaks one of these. The dense-oracle check of the H_ii per block is in ``test_fused_audit.py``.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (BloomConfig, BloomForCausalLM, CodeGenConfig, CodeGenForCausalLM, FalconConfig,
                          FalconForCausalLM, GPT2Config, GPT2LMHeadModel, GPTBigCodeConfig, GPTBigCodeForCausalLM,
                          GPTNeoXConfig, GPTNeoXForCausalLM, Phi3Config, Phi3ForCausalLM)

from geomaudit.engine.fused import FUSED, Block, fused_blocks, select

V = 32
COMMON = dict(vocab_size=V, attn_implementation="eager")
MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=4, n_positions=32, **COMMON)),
    "gpt_bigcode-mqa": lambda: GPTBigCodeForCausalLM(GPTBigCodeConfig(n_embd=16, n_layer=1, n_head=4, n_positions=32,
                                                                      multi_query=True, **COMMON)),
    "gpt_bigcode-mha": lambda: GPTBigCodeForCausalLM(GPTBigCodeConfig(n_embd=16, n_layer=1, n_head=4, n_positions=32,
                                                                      multi_query=False, **COMMON)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                                         intermediate_size=32, max_position_embeddings=32,
                                                         attention_bias=True, **COMMON)),
    "bloom": lambda: BloomForCausalLM(BloomConfig(hidden_size=16, n_layer=1, n_head=4, **COMMON)),
    "falcon-new": lambda: FalconForCausalLM(FalconConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                                         num_kv_heads=2, new_decoder_architecture=True, bias=True,
                                                         **COMMON)),
    "falcon-mqa": lambda: FalconForCausalLM(FalconConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                                         multi_query=True, new_decoder_architecture=False, bias=True,
                                                         **COMMON)),
    "falcon-mha": lambda: FalconForCausalLM(FalconConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                                         multi_query=False, new_decoder_architecture=False,
                                                         alibi=True, bias=True, **COMMON)),
    "codegen": lambda: CodeGenForCausalLM(CodeGenConfig(n_embd=16, n_layer=1, n_head=4, rotary_dim=4, n_positions=32,
                                                        **COMMON)),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=32, pad_token_id=0,
                                               max_position_embeddings=32, **COMMON)),
}


class MHAModel(nn.Module):
    """A tiny model around ``torch.nn.MultiheadAttention`` (the module-class row of the table)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, V)

    def forward(self, input_ids, labels=None):
        x = self.embed(input_ids)
        logits = self.head(self.attn(x, x, x, need_weights=False)[0])
        return nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))


def _loss(model, ids):
    out = model(input_ids=ids, labels=ids)
    return out if isinstance(out, torch.Tensor) else out.loss


def _fused_grads(model, ids, params):
    named = dict(model.named_parameters())
    return dict(zip(params, torch.autograd.grad(_loss(model, ids), [named[p] for p in params])))


# which blocks' gradients must vanish when a block is zeroed
PARTNERS = {"q": ("k",), "k": ("q",), "v": ("q", "k")}


@pytest.mark.parametrize("kind", [*MODELS, "mha"])
def test_blocks_play_their_part_in_attention(kind):
    torch.manual_seed(0)
    model = (MODELS[kind]() if kind != "mha" else MHAModel()).double().eval()
    with torch.no_grad():  # HF biases start at 0; make them matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, V, (2, 7))
    blocks, uncovered = fused_blocks(model)
    assert uncovered == [] and blocks, kind
    params = sorted(n for n in blocks if n.startswith(next(iter(blocks)).rsplit(".", 1)[0]))  # one module's
    for p in params:  # the blocks partition the fused tensor
        flat = np.concatenate([b.fused_indices(np.arange(int(np.prod(b.shape)))) for b in blocks[p]])
        assert sorted(flat.tolist()) == list(range(int(np.prod(blocks[p][0].fused_shape))))
        assert sorted(b.label for b in blocks[p]) == ["k", "q", "v"]
    for zeroed, partners in PARTNERS.items():
        twin = copy.deepcopy(model)
        named = dict(twin.named_parameters())
        with torch.no_grad():
            for p in params:
                b = next(b for b in blocks[p] if b.label == zeroed)
                named[p].view(-1)[torch.as_tensor(b.fused_indices(np.arange(int(np.prod(b.shape)))))] = 0
        grads = _fused_grads(twin, ids, params)
        for p in params:
            for b in blocks[p]:
                g = grads[p].reshape(-1)[torch.as_tensor(b.fused_indices(np.arange(int(np.prod(b.shape)))))]
                if b.label in partners:
                    assert g.abs().max() == 0, (kind, p, zeroed, b.label)
                elif not (p.endswith("bias") and b.label == "k"):  # a key bias never has a gradient
                    assert g.abs().max() > 1e-8, (kind, p, zeroed, b.label)


def test_every_table_row_is_tested():
    owners = {type(m).__name__ for build in [*MODELS.values(), MHAModel] for m in build().modules()}
    assert {row.owner for row in FUSED} <= owners


def test_block_index_mapping_and_selection():
    b = Block("h.0.c_attn.weight", "v", (3, 12), 1, np.array([8, 9, 10, 11]))
    assert b.name == "h.0.c_attn.weight:v" and b.shape == (3, 4)
    assert b.fused_indices(np.array([0, 5, 11])).tolist() == [8, 12 * 1 + 9, 12 * 2 + 11]
    blocks = {"a.w": tuple(Block("a.w", label, (2, 6), 1, np.arange(2) + 2 * i) for i, label in enumerate("qkv"))}
    names = ["a.w", "a.b"]
    assert select(names, blocks, ()) == ["a.w:q", "a.w:k", "a.w:v", "a.b"]
    assert select(names, blocks, ["a.w"]) == ["a.w:q", "a.w:k", "a.w:v"]  # the parameter's name selects its blocks
    assert select(names, blocks, ["*:k"]) == ["a.w:k"]
    assert select(names, blocks, ["a.b"]) == ["a.b"]


def test_cross_attention_and_unknown_fused_parameters_are_not_split():
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=4, n_positions=32, add_cross_attention=True,
                                       **COMMON))
    blocks, uncovered = fused_blocks(model)
    assert set(blocks) == {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"}
    assert uncovered == ["transformer.h.0.crossattention.c_attn.weight", "transformer.h.0.crossattention.c_attn.bias"]

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12)

    assert fused_blocks(Custom()) == ({}, ["qkv.weight", "qkv.bias"])
