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
from geomaudit.errors import InputError
from geomaudit.engine.sampling import sample_indices

from .test_hdiag import assert_close, bert, gpt2, hf_call, hf_loss, oracle_diag  # noqa: F401 (fixtures)


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


class BeforeFusedAttention(nn.Module):
    """A Linear whose output goes through PyTorch's fused SDPA kernel (no second derivative)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pre, self.attn = nn.Linear(4, 4), nn.MultiheadAttention(4, 2, batch_first=True)
        self.eval()

    def forward(self, x):
        h = self.pre(x)
        return self.attn(h, h, h, need_weights=False)[0]


def test_an_operator_without_a_second_derivative_on_the_output_path_is_an_input_error():
    engine = DiagonalEngine(BeforeFusedAttention(), lambda m, t: (m(t["x"]) ** 2).mean(),
                            [MicroBatch({"x": torch.randn(3, 5, 4)}, 1.0)])
    with pytest.raises(InputError, match="cannot differentiate twice"):
        engine.diagonal("pre.weight", [0, 5])


@pytest.mark.parametrize("fixture, name", [
    ("gpt2", "transformer.h.0.attn.c_attn.weight"),  # Conv1D, stored (in, out)
    ("gpt2", "transformer.h.1.mlp.c_proj.bias"),
    ("gpt2", "transformer.h.1.ln_2.weight"),
    ("gpt2", "transformer.wpe.weight"),
    ("gpt2", "transformer.wte.weight"),  # tied with lm_head: two calls
    ("bert", "bert.encoder.layer.0.attention.self.query.weight"),
    ("bert", "bert.embeddings.word_embeddings.weight"),
    ("bert", "classifier.weight"),
])
def test_transformers_tensors_take_the_output_path_exactly(fixture, name, request):
    model, tensors = request.getfixturevalue(fixture)  # test_hdiag's tiny fp64 models and batches
    idx = sample_indices(tuple(dict(model.named_parameters())[name].shape), 20, seed=1)
    engine = DiagonalEngine(model, hf_loss, [MicroBatch(tensors, 1.0)])
    got = engine.diagonal(name, idx)
    assert engine.methods[name] == "hvp-output"
    assert_close(got, oracle_diag(model, name, hf_call(tensors), idx))
