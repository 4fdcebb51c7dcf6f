"""The HVP through a layer's output (engine/outputs.py): which tensors take it, and exactness against dense Hessians.

Oracle: the dense Hessian of the loss in one whole parameter tensor (``test_hdiag.dense_hessian``), fp64. Every
case also asserts the method that ran (``engine.methods``), so a silent fall-back to the parameter-space HVPs —
exact too — cannot pass for the output path, and a use the output path must refuse cannot slip through it.
"""

import numpy as np
import pytest
import torch
from torch import nn

from geomaudit.engine.hdiag import DiagonalEngine, MicroBatch
from geomaudit.engine.sampling import sample_indices

from .test_hdiag import assert_close, hf_call, hf_loss, make_bert, make_gpt2, oracle_diag


class Net(nn.Module):
    """Embedding (with a padding row) → Linear → tanh → LayerNorm → Linear head, over tokens; ``variant`` changes
    how the forward uses its modules."""

    def __init__(self, variant: str = "plain"):
        super().__init__()
        torch.manual_seed(0)
        self.variant = variant
        max_norm = 1.0 if variant == "max-norm" else None
        self.emb = nn.Embedding(9, 4, padding_idx=0, max_norm=max_norm)
        self.lin = Subclassed(4, 4) if variant == "subclass" else nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        self.double().eval()

    def forward(self, ids):
        h = self.emb(ids)
        if self.variant == "unused-call":
            self.lin(h * 2)  # computed and dropped: the loss depends on one call only
        if self.variant == "keyword":
            z = self.lin(input=h)
        else:
            z = self.lin(h)
        if self.variant == "twice":
            z = self.lin(torch.tanh(z))
        if self.variant == "functional":
            z = z + 0.5 * nn.functional.linear(h, self.lin.weight)
        if self.variant == "in-place":
            z = nn.functional.relu(z, inplace=True)
        z = self.norm(torch.tanh(z))
        if self.variant == "norm-twice":
            z = self.norm(z * z)
        return self.head(z)


class Subclassed(nn.Linear):
    pass


def token_ce(model, t):
    return nn.functional.cross_entropy(model(t["ids"]).flatten(0, 1), t["c"].flatten())


def batch(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 9, (n, 6), generator=g)
    ids[0, :2] = 0  # the padding token occurs
    return {"ids": ids, "c": torch.randint(0, 3, (n, 6), generator=g)}


def run(model, loss, tensors, name, idx, parts=1):
    n = len(tensors["ids"])
    cuts = np.linspace(0, n, parts + 1).astype(int)
    mbs = [MicroBatch({k: v[a:b] for k, v in tensors.items()}, (b - a) / n) for a, b in zip(cuts, cuts[1:])]
    engine = DiagonalEngine(model, loss, mbs, backprop=False)
    return engine.diagonal(name, idx), engine.methods[name]


def check_all_entries(model, loss, name, want_method, parts=1):
    data = batch()
    idx = np.arange(dict(model.named_parameters())[name].numel())
    got, method = run(model, loss, data, name, idx, parts)
    assert method == want_method
    want = oracle_diag(model, name, lambda fwd: loss(fwd, data), idx)
    assert_close(got, want)
    return got


@pytest.mark.parametrize("name", ["emb.weight", "lin.weight", "lin.bias", "norm.weight", "norm.bias", "head.weight",
                                  "head.bias"])
def test_every_affine_use_takes_the_output_path_exactly(name):
    got = check_all_entries(Net(), token_ce, name, "hvp-output")
    if name == "emb.weight":  # the padding row gets no gradient from nn.Embedding: exact zeros, as the oracle's
        assert torch.equal(got[:4], torch.zeros(4, dtype=torch.float64)) and (got[4:] != 0).any()


def test_micro_batches_add_up_on_the_output_path():
    check_all_entries(Net(), token_ce, "lin.weight", "hvp-output", parts=3)


def test_a_call_the_loss_does_not_depend_on_is_not_a_use():
    check_all_entries(Net("unused-call"), token_ce, "lin.weight", "hvp-output")


def test_a_layer_called_twice_in_a_row_is_exact():
    """The second call's input depends on θ through the first: the 2 w·x term of S (engine/outputs.py)."""
    check_all_entries(Net("twice"), token_ce, "lin.weight", "hvp-output")
    check_all_entries(Net("twice"), token_ce, "lin.bias", "hvp-output")


def test_a_layer_norm_called_twice_takes_the_parameter_space_hvps():
    check_all_entries(Net("norm-twice"), token_ce, "norm.weight", "hvp")
    check_all_entries(Net("norm-twice"), token_ce, "norm.bias", "hvp-output")


@pytest.mark.parametrize("variant", ["functional", "in-place", "keyword", "subclass"])
def test_other_uses_take_the_parameter_space_hvps(variant):
    check_all_entries(Net(variant), token_ce, "lin.weight", "hvp")


def test_an_embedding_with_max_norm_takes_the_parameter_space_hvps():
    """max_norm rescales rows of the table in place during the forward (the dense oracle cannot follow that)."""
    assert run(Net("max-norm"), token_ce, batch(), "emb.weight", np.arange(36))[1] == "hvp"


def test_a_foreign_forward_hook_takes_the_parameter_space_hvps():
    model = Net()
    model.lin.register_forward_hook(lambda m, args, out: out * 2)  # changes what the module returns
    check_all_entries(model, token_ce, "lin.weight", "hvp")


@pytest.mark.parametrize("model, batch_of, name, method", [
    (make_gpt2, "gpt2", "transformer.h.0.attn.c_attn.weight", "hvp-output"),  # Conv1D, stored (in, out)
    (make_gpt2, "gpt2", "transformer.h.1.mlp.c_proj.bias", "hvp-output"),
    (make_gpt2, "gpt2", "transformer.h.1.ln_2.weight", "hvp-output"),
    (make_gpt2, "gpt2", "transformer.wpe.weight", "hvp-output"),
    (make_gpt2, "gpt2", "transformer.wte.weight", "hvp-output"),  # tied with lm_head: two calls
    (make_bert, "bert", "bert.encoder.layer.0.attention.self.query.weight", "hvp-output"),
    (make_bert, "bert", "bert.embeddings.word_embeddings.weight", "hvp-output"),
    (make_bert, "bert", "classifier.weight", "hvp-output"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_transformers_tensors(model, batch_of, name, method):
    model = model()
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (3, 6), generator=g)
    tensors = {"input_ids": ids, "labels": ids.clone()} if batch_of == "gpt2" else \
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2])}
    shape = tuple(dict(model.named_parameters())[name].shape)
    idx = sample_indices(shape, 20, seed=1)
    engine = DiagonalEngine(model, hf_loss, [MicroBatch(tensors, 1.0)])
    got = engine.diagonal(name, idx)
    assert engine.methods[name] == method
    assert_close(got, oracle_diag(model, name, hf_call(tensors), idx))
