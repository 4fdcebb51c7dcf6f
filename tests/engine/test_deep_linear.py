"""DiagonalEngine against the closed form of Lemma 30 (paper App. G; SPEC §6) on deep linear networks.

For f(x) = W_{H+1}⋯W_1 x with W_i ∈ R^{d_i × d_{i-1}} (torch ``nn.Linear(d_{i-1}, d_i).weight``) and
L = (1/2n) Σ_n ‖f(x_n) − y_n‖²,

    ∂²L/∂(W_i)_ab² = (M_i M_iᵀ)_aa · (N_iᵀ Σ_x N_i)_bb,
    M_i = W_{i+1}ᵀ⋯W_{H+1}ᵀ,  N_i = W_1ᵀ⋯W_{i−1}ᵀ,  Σ_x = (1/n) Σ_n x_n x_nᵀ.

The closed form is evaluated in numpy from the weights and the data alone; the paper states the
whitened case Σ_x = I, the tests use Σ_x far from I as well.
"""

import numpy as np
import pytest
import torch
from torch import nn

from geomaudit.engine.hdiag import DiagonalEngine, MicroBatch
from geomaudit.engine.stats import diagonal_stats



def deep_linear(dims, seed):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:])]).double().eval()


def half_mse(model, t):
    return 0.5 * ((model(t["x"]) - t["y"]) ** 2).sum(-1).mean()


def engine_all(model, data):
    """The engine's H_ii for every coordinate of every weight, as numpy arrays shaped like the weights."""
    engine = DiagonalEngine(model, half_mse, [MicroBatch(data, 1.0)])
    return [engine.diagonal(name, range(p.numel())).numpy().reshape(p.shape)
            for name, p in model.named_parameters()]


def lemma30(weights, x, sigma_x=None):
    """Closed-form Hessian diagonal of every W_i (numpy), as matrices shaped like W_i."""
    n = len(x)
    sigma = x.T @ x / n if sigma_x is None else sigma_x
    out = []
    for i in range(len(weights)):
        M = np.eye(weights[i].shape[0])  # M_i = W_{i+1}ᵀ ⋯ W_{H+1}ᵀ
        for W in weights[i + 1:]:
            M = M @ W.T
        N = np.eye(weights[0].shape[1])  # N_i = W_1ᵀ ⋯ W_{i−1}ᵀ
        for W in weights[:i]:
            N = N @ W.T
        C = np.diag(M @ M.T)  # indexed by the output row a of W_i
        D = np.diag(N.T @ sigma @ N)  # indexed by the input column b of W_i
        out.append(np.outer(C, D))
    return out


def rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("dims", [(5, 4, 3, 2), (6, 3, 5, 4, 2)], ids=["3-weights", "4-weights"])
def test_lemma30_closed_form_on_non_whitened_inputs(dims):
    """Oracle: Lemma 30 with Σ_x = XᵀX/n (far from I), every coordinate of every weight, rel ≤ 1e-8."""
    model = deep_linear(dims, seed=0)
    rng = np.random.default_rng(0)
    n = 40
    x = rng.standard_normal((n, dims[0])) @ rng.standard_normal((dims[0], dims[0]))
    y = rng.standard_normal((n, dims[-1]))
    sigma = x.T @ x / n
    assert np.abs(sigma - np.eye(dims[0])).max() > 1.0  # not whitened
    data = {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}
    weights = [p.detach().numpy().copy() for p in model.parameters()]
    assert [w.shape for w in weights] == [(b, a) for a, b in zip(dims[:-1], dims[1:])]

    got = engine_all(model, data)
    want = lemma30(weights, x)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel(g, w) <= 1e-8
    # The check is sharp: the whitened formula (Σ_x = I) or the transposed layout is far off.
    whitened = lemma30(weights, x, sigma_x=np.eye(dims[0]))
    assert all(rel(g, w) > 1e-2 for g, w in zip(got, whitened))
    assert any(rel(g, w.T.reshape(w.shape)) > 1e-2 for g, w in zip(got, want))


def whitened_inputs(n, d, rng):
    """X with XᵀX/n = I exactly (up to rounding): sqrt(n)·Q from a QR decomposition."""
    q, _ = np.linalg.qr(rng.standard_normal((n, d)))
    return np.sqrt(n) * q


@pytest.mark.parametrize("d", [6, 7], ids=["even-width", "odd-width"])
def test_two_layer_scalar_output_rmed_equals_weight_ratios(d):
    """Oracle: the paper's corollary of Lemma 30 (whitened inputs, scalar output):
    R_med,1 = max w_2i² / median w_2i² and R_med,2 = max‖W_1[i,:]‖² / median‖W_1[i,:]‖²."""
    n_in, n = 5, 30
    model = deep_linear((n_in, d, 1), seed=1)
    rng = np.random.default_rng(1)
    with torch.no_grad():  # spread the scales of the rows of W_1 and of w_2 so both ratios are far from 1
        model[0].weight.mul_(torch.from_numpy(np.geomspace(0.3, 3.0, d))[:, None])
        model[1].weight.copy_(torch.from_numpy(rng.permutation(np.geomspace(0.1, 2.0, d)) * rng.choice([-1, 1], d)))
    x = whitened_inputs(n, n_in, rng)
    assert np.allclose(x.T @ x / n, np.eye(n_in), atol=1e-12)
    data = {"x": torch.from_numpy(x), "y": torch.from_numpy(rng.standard_normal((n, 1)))}
    W1 = model[0].weight.detach().numpy().copy()
    w2 = model[1].weight.detach().numpy().reshape(-1).copy()

    h1, h2 = engine_all(model, data)
    # entry-wise: H(W_1)[a, b] = w_2a² · Σ_x[b, b] = w_2a²;  H(W_2)[0, b] = ‖W_1[b, :]‖²
    assert rel(h1, np.repeat((w2 ** 2)[:, None], n_in, axis=1)) <= 1e-8
    assert rel(h2.reshape(-1), (W1 ** 2).sum(1)) <= 1e-8

    # each w_2a² appears n_in times among the entries of W_1: the median is unchanged by the repetition
    assert np.median(np.repeat(w2 ** 2, n_in)) == pytest.approx(np.median(w2 ** 2), rel=1e-15)
    r1 = diagonal_stats(h1.reshape(-1))["r_med"]
    r2 = diagonal_stats(h2.reshape(-1))["r_med"]
    row_norms = (W1 ** 2).sum(1)
    assert r1 == pytest.approx(np.max(w2 ** 2) / np.median(w2 ** 2), rel=1e-8)
    assert r2 == pytest.approx(np.max(row_norms) / np.median(row_norms), rel=1e-8)
    assert r1 > 3 and r2 > 3  # far from 1: a wrong median or max would show
