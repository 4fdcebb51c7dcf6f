"""Exactness of DiagonalEngine's H_ii against independent oracles (SPEC §2, §6).

Oracle: the dense Hessian from ``torch.autograd.functional.hessian`` (its default: a plain loop of
reverse-mode passes, no vmap) of the loss as a function of ONE whole parameter tensor (≤ 320 entries
here), built with ``torch.func.functional_call`` so that only that tensor varies; its diagonal is read
at the audited coordinates.
"""

import warnings

import numpy as np
import pytest
import torch
import transformers
from torch import nn
from torch.func import functional_call

from geomaudit.engine.audit import audit_checkpoint
from geomaudit.engine.hdiag import DiagonalEngine, MicroBatch
from geomaudit.engine.sampling import sample_indices
from geomaudit.io.checkpoints import LoadedModel
from geomaudit.io.tasks import IGNORE_INDEX, TASKS
from geomaudit.io.data import AuditBatch

RTOL = 1e-5  # fp64; engine and oracle agree to ~1e-13, while a factor 2 or a wrong index is an O(1) error


# ---------------------------------------------------------------- helpers

def dense_hessian(model, name, call):
    """Oracle: the dense (numel × numel) Hessian of the loss w.r.t. parameter ``name``, flattened.

    ``call(forward)`` receives ``forward(*args, **kwargs)``, the model run through ``functional_call``
    with the varied tensor (every other parameter fixed), and returns the scalar loss.
    """
    base = dict(model.named_parameters())[name].detach().clone()

    def loss_of(flat):
        w = flat.reshape(base.shape)
        return call(lambda *args, **kwargs: functional_call(model, {name: w}, args, kwargs))

    return torch.autograd.functional.hessian(loss_of, base.reshape(-1))


def oracle_diag(model, name, call, indices):
    return dense_hessian(model, name, call).diagonal()[torch.as_tensor(np.asarray(indices), dtype=torch.long)]


def rel_err(got, want):
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    return float((got - want).abs().max() / want.abs().max())


def assert_close(got, want, rtol=RTOL):
    """max|got - want| / max|want| ≤ rtol, against a reference that is not all zeros."""
    want = torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert want.abs().max() > 0, "all-zero reference: the comparison would be vacuous"
    err = rel_err(got, want)
    assert err <= rtol, f"relative error {err:.3g}\n got={got}\nwant={want}"


def engine_diag(model, loss_fn, tensors, name, indices, **kw):
    return DiagonalEngine(model, loss_fn, [MicroBatch(tensors, 1.0)], **kw).diagonal(name, indices)


def hf_loss(model, tensors):
    return model(**tensors).loss


def hf_call(batch):
    return lambda fwd: fwd(**batch).loss


def causal_lm_loss_fp64(model, tensors):
    """Mean next-token cross-entropy over labels != -100, in the model's dtype.

    The same loss as ``GPT2LMHeadModel(..., labels=...).loss``, except that transformers' ForCausalLMLoss
    casts the logits to float32 (``logits.float()``), which limits an fp64 audit to ~1e-8 relative.
    """
    logits = model(input_ids=tensors["input_ids"], attention_mask=tensors.get("attention_mask")).logits
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                       tensors["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)



# ---------------------------------------------------------------- tiny models

def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def mlp_data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 4, generator=g, dtype=torch.float64),
            "y": torch.randn(n, 3, generator=g, dtype=torch.float64),
            "c": torch.randint(0, 3, (n,), generator=g)}


def mse_loss(model, t):
    return nn.functional.mse_loss(model(t["x"]), t["y"])


def ce_loss(model, t):
    return nn.functional.cross_entropy(model(t["x"]), t["c"])


def make_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    cfg._attn_implementation = "eager"
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    assert model.config._attn_implementation == "eager"
    return model


def make_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=40, n_embd=8, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    assert model.config._attn_implementation == "eager"
    return model


@pytest.fixture(scope="module")
def bert():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 30, (4, 7), generator=g)
    return make_bert(), {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                         "labels": torch.tensor([0, 1, 2, 1])}


@pytest.fixture(scope="module")
def gpt2():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (3, 6), generator=g)
    return make_gpt2(), {"input_ids": ids, "labels": ids.clone()}


# ---------------------------------------------------------------- 1a. MLP: every tensor, every coordinate

@pytest.mark.parametrize("loss_fn", [mse_loss, ce_loss], ids=["mse", "cross-entropy"])
def test_mlp_every_coordinate_matches_dense_hessian(loss_fn):
    """Oracle: diagonal of the full dense Hessian of each parameter tensor of Linear-Tanh-Linear."""
    model, data = make_mlp(), mlp_data()
    for name, p in model.named_parameters():
        idx = np.arange(p.numel())
        want = oracle_diag(model, name, lambda fwd: loss_fn(fwd, data), idx)
        got = engine_diag(model, loss_fn, data, name, idx)
        assert got.dtype == torch.float64 and got.shape == (p.numel(),)
        assert_close(got, want)


def test_mlp_permuted_and_partial_indices_follow_the_request():
    """Oracle: the dense diagonal, read at indices given unsorted and with a repeat."""
    model, data = make_mlp(), mlp_data()
    name = "0.weight"
    full = oracle_diag(model, name, lambda fwd: mse_loss(fwd, data), np.arange(24))
    idx = [17, 3, 22, 3, 0, 9]
    got = engine_diag(model, mse_loss, data, name, idx, chunk_size=4)
    assert_close(got, full[idx])


# ---------------------------------------------------------------- 1b. BERT

BERT_LAYERS = [
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.1.attention.output.LayerNorm.weight",
    "bert.embeddings.LayerNorm.bias",
    "classifier.weight",
    "bert.embeddings.word_embeddings.weight",
]


@pytest.mark.parametrize("name", BERT_LAYERS)
def test_bert_matches_dense_hessian(bert, name):
    """Oracle: dense Hessian (on 20 seeded coordinates, or all of a smaller tensor) of model(**batch).loss."""
    model, batch = bert
    shape = tuple(dict(model.named_parameters())[name].shape)
    idx = sample_indices(shape, 20, seed=0)
    want = oracle_diag(model, name, hf_call(batch), idx)
    got = engine_diag(model, hf_loss, batch, name, idx)
    assert_close(got, want)


def test_bert_embedding_rows_of_absent_tokens_are_exact_zeros(bert):
    """Oracle: the dense Hessian's zeros, and the token ids present in the batch."""
    model, batch = bert
    name = "bert.embeddings.word_embeddings.weight"
    pad = model.config.pad_token_id  # nn.Embedding(padding_idx=pad): that row never gets a gradient
    present = set(batch["input_ids"].unique().tolist()) - {pad}
    absent = sorted(set(range(30)) - present)
    assert pad in absent and len(absent) > 2 and len(present) > 2
    rows = [absent[1], min(present), absent[-1], max(present)]
    idx = [r * 8 + c for r in rows for c in (0, 5)]
    want = oracle_diag(model, name, hf_call(batch), idx)
    got = engine_diag(model, hf_loss, batch, name, idx)
    zero_rows = torch.tensor([r in absent for r in rows for _ in (0, 5)])
    assert torch.equal(want == 0, zero_rows)
    assert torch.equal(got == 0, zero_rows)  # exact zeros, as zero_frac counts them
    assert_close(got, want)


# ---------------------------------------------------------------- 1c. GPT-2

GPT2_LAYERS = [
    "transformer.h.0.attn.c_attn.weight",  # Conv1D, stored (in, out)
    "transformer.h.1.mlp.c_proj.bias",
    "transformer.h.1.ln_2.weight",
    "transformer.wte.weight",  # tied with lm_head: both uses contribute
]


@pytest.mark.parametrize("name", GPT2_LAYERS)
def test_gpt2_matches_dense_hessian(gpt2, name):
    """Oracle: dense Hessian (20 seeded coordinates) of model(input_ids, labels=input_ids).loss."""
    model, batch = gpt2
    shape = tuple(dict(model.named_parameters())[name].shape)
    idx = sample_indices(shape, 20, seed=1)
    want = oracle_diag(model, name, hf_call(batch), idx)
    got = engine_diag(model, hf_loss, batch, name, idx)
    assert_close(got, want)


# ---------------------------------------------------------------- chunking, fall-back, zeros

def test_chunk_sizes_and_fallback_path_agree(gpt2):
    """Oracle: dense Hessian; chunk_size 1, 3 (a ragged last chunk), None, and the per-coordinate path."""
    model, batch = gpt2
    name = "transformer.h.0.attn.c_attn.weight"
    idx = sample_indices((8, 24), 11, seed=5)
    want = oracle_diag(model, name, hf_call(batch), idx)
    results = {}
    for chunk in (1, 3, None):
        results[chunk] = engine_diag(model, hf_loss, batch, name, idx, chunk_size=chunk)
    engine = DiagonalEngine(model, hf_loss, [MicroBatch(batch, 1.0)], chunk_size=3)
    engine.batched = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the forced path must not warn or switch back
        results["fallback"] = engine.diagonal(name, idx)
    assert engine.batched is False
    for key, got in results.items():
        assert_close(got, want)
        assert rel_err(got, results[1]) <= 1e-12, key


def test_on_chunk_reports_every_coordinate_of_every_micro_batch():
    """Oracle: counting: Σ reported = coordinates × micro-batches, chunks no larger than chunk_size."""
    model, data = make_mlp(), mlp_data()
    parts = [MicroBatch({k: v[s:s + 4] for k, v in data.items()}, 1 / 3) for s in (0, 4, 8)]
    seen = []
    DiagonalEngine(model, mse_loss, parts, chunk_size=3, backprop=False).diagonal("2.weight", range(7), seen.append)
    assert sum(seen) == 7 * 3 and max(seen) == 3 and len(seen) == 3 * 3


class LinearHead(nn.Module):
    """tanh layer, then a head the loss below is linear in, plus a parameter the forward never uses."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def linear_loss(model, t):
    return (model(t["x"]) * t["y"]).mean()


@pytest.mark.parametrize("name", ["head.weight", "head.bias", "unused.weight", "unused.bias"])
def test_parameters_the_loss_is_linear_in_or_ignores_give_zeros(name):
    """Oracle: the dense Hessian is exactly 0 there; a nonlinear layer of the same model is not."""
    torch.manual_seed(0)
    model, data = LinearHead().double().eval(), mlp_data()
    p = dict(model.named_parameters())[name]
    idx = np.arange(p.numel())
    dense = dense_hessian(model, name, lambda fwd: linear_loss(fwd, data))
    assert torch.equal(dense, torch.zeros(p.numel(), p.numel(), dtype=torch.float64))
    got = engine_diag(model, linear_loss, data, name, idx)
    assert torch.equal(got, torch.zeros(p.numel(), dtype=torch.float64))
    body = engine_diag(model, linear_loss, data, "body.weight", np.arange(20))
    assert (body != 0).all()
    assert_close(body, oracle_diag(model, "body.weight", lambda fwd: linear_loss(fwd, data), np.arange(20)))


# ---------------------------------------------------------------- 2. micro-batch accumulation

def test_micro_batches_weighted_by_examples_equal_one_batch():
    """Oracle: the engine on one micro-batch of all 12 examples (itself checked against the dense Hessian)."""
    model, data = make_mlp(), mlp_data(n=12)
    name, idx = "0.weight", np.arange(24)
    whole = DiagonalEngine(model, ce_loss, [MicroBatch(data, 1.0)]).diagonal(name, idx)
    assert_close(whole, oracle_diag(model, name, lambda fwd: ce_loss(fwd, data), idx))

    def split(weights):
        bounds = [(0, 5), (5, 10), (10, 12)]
        return [MicroBatch({k: v[a:b] for k, v in data.items()}, w) for (a, b), w in zip(bounds, weights)]

    parts = DiagonalEngine(model, ce_loss, split([5 / 12, 5 / 12, 2 / 12])).diagonal(name, idx)
    assert rel_err(parts, whole) <= 1e-10
    naive = DiagonalEngine(model, ce_loss, split([1 / 3, 1 / 3, 1 / 3])).diagonal(name, idx)
    assert rel_err(naive, whole) > 1e-4  # the weights matter: the check above can fail


def padded_lm_batch(n=12, length=8, seed=4):
    """Right-padded causal-LM examples of lengths 2..length: labels = input_ids, -100 at pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0 (= eos)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_causal_lm_micro_batches_weighted_by_tokens_equal_one_batch():
    """Oracle: the engine on the whole padded batch as one micro-batch (itself checked against the dense
    Hessian); micro-batches and weights come from the package's AuditBatch / LoadedModel.loss_items."""
    model = make_gpt2()
    tensors = padded_lm_batch()
    loss_fn = TASKS["causal-lm"].loss  # the package's causal-LM loss, in the audit precision
    with torch.no_grad():
        assert float(loss_fn(model, tensors)) == pytest.approx(float(causal_lm_loss_fp64(model, tensors)), rel=1e-14)
        assert float(loss_fn(model, tensors)) == pytest.approx(float(model(**tensors).loss), rel=1e-6)
    loaded = LoadedModel(model, TASKS["causal-lm"])
    batch = AuditBatch(tensors, "x", "sha256:0")
    cpu = torch.device("cpu")
    mbs = batch.micro_batches(loaded, 5, cpu, torch.float64)
    tokens = [int((mb.tensors["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in mbs]
    assert [len(mb.tensors["input_ids"]) for mb in mbs] == [5, 5, 2]
    assert len({t / len(mb.tensors["input_ids"]) for t, mb in zip(tokens, mbs)}) == 3  # tokens/example differ
    assert [mb.weight for mb in mbs] == pytest.approx([t / sum(tokens) for t in tokens], abs=1e-15)

    name = "transformer.h.0.attn.c_attn.weight"
    idx = sample_indices((8, 24), 12, seed=0)
    (single,) = batch.micro_batches(loaded, 12, cpu, torch.float64)
    assert single.weight == 1.0
    whole = DiagonalEngine(model, loss_fn, [single]).diagonal(name, idx)
    oracle = oracle_diag(model, name, lambda fwd: causal_lm_loss_fp64(fwd, tensors), idx)
    assert_close(whole, oracle)
    parts = DiagonalEngine(model, loss_fn, mbs).diagonal(name, idx)
    assert rel_err(parts, whole) <= 1e-10
    by_examples = [MicroBatch(mb.tensors, len(mb.tensors["input_ids"]) / 12) for mb in mbs]
    naive = DiagonalEngine(model, loss_fn, by_examples).diagonal(name, idx)
    assert rel_err(naive, whole) > 1e-4  # weighting by examples instead of tokens would be caught

    result = audit_checkpoint(model, loss_fn, mbs, [name], coords=12, seed=0)
    with torch.no_grad():
        full_loss = float(causal_lm_loss_fp64(model, tensors))
    assert result.loss == pytest.approx(full_loss, rel=1e-12, abs=0)
    (layer,) = result.layers
    assert np.array_equal(layer.indices, idx)
    assert rel_err(layer.h_diag, whole) <= 1e-10


def test_package_task_losses_are_exact_in_fp64(bert):
    """Oracle: the test's own fp64 causal-LM loss, and BERT's own classification loss.

    geomaudit's task losses recompute the HF head losses in the audit precision (transformers'
    ForCausalLMLoss casts logits to fp32, which shows as a ~1e-8 relative error in fp64)."""
    model, tensors = make_gpt2(), padded_lm_batch()
    name, idx = "transformer.h.0.attn.c_attn.weight", sample_indices((8, 24), 12, seed=0)
    package = engine_diag(model, TASKS["causal-lm"].loss, tensors, name, idx)
    ours = engine_diag(model, causal_lm_loss_fp64, tensors, name, idx)
    assert rel_err(package, ours) <= 1e-12
    hf_fp32 = engine_diag(model, hf_loss, tensors, name, idx)
    assert 1e-11 < rel_err(hf_fp32, ours) <= 1e-5  # why the task losses exist; the oracle tests above allow for it

    bert_model, batch = bert
    name, idx = "classifier.weight", np.arange(24)
    assert rel_err(engine_diag(bert_model, TASKS["classification"].loss, batch, name, idx),
                   engine_diag(bert_model, hf_loss, batch, name, idx)) <= 1e-12


# ---------------------------------------------------------------- 3. determinism

def test_same_seed_gives_bit_identical_values_from_fresh_engines(bert):
    """Oracle: a second, independent run (fresh engine, and a freshly built model of the same seed);
    the indices and the values must be equal bit for bit on CPU."""
    model, batch = bert
    name = "bert.encoder.layer.0.attention.self.query.weight"
    runs = []
    for m in (model, model, make_bert()):
        idx = sample_indices((8, 8), 10, seed=7)
        runs.append((idx, DiagonalEngine(m, hf_loss, [MicroBatch(batch, 1.0)]).diagonal(name, idx)))
    for idx, values in runs[1:]:
        assert np.array_equal(idx, runs[0][0])
        assert torch.equal(values, runs[0][1])
    assert (runs[0][1] != 0).all()
    other = sample_indices((8, 8), 10, seed=8)
    assert not np.array_equal(other, runs[0][0])
