"""Spectrum statistics against matrices built from known singular vectors, and the (out, in) reading of weights."""

import numpy as np
import pytest
import torch
from torch import nn

from geomaudit.engine.svd import as_matrix, effective_rank, model_spectra, spectrum_stats


def orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))
    return q


def built(u: np.ndarray, sigma: np.ndarray, v: np.ndarray, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """W = U diag(σ) Vᵀ (+ noise · standard normal)."""
    w = (u * sigma) @ v.T
    w += noise * np.random.default_rng(seed).standard_normal(w.shape)
    return torch.from_numpy(w)


def ratio(x: np.ndarray) -> float:
    return x.max() / np.median(x)


@pytest.mark.parametrize("options", [{"rank": 3}, {"energy": 0.99}])
def test_r_u_and_r_v_match_the_constructed_singular_vectors(options):
    m, n, sigma = 40, 25, np.array([10.0, 5.0, 2.0])  # m even: the median is the mean of the two middle values
    u, v = orthonormal(m, 3, 1), orthonormal(n, 3, 2)
    stats = spectrum_stats(built(u, sigma, v, noise=1e-9), **options)
    u_tilde, v_tilde = (u ** 2) @ sigma ** 2, (v ** 2) @ sigma ** 2
    assert stats["k"] == 3 and stats["method"] == "exact" and stats["shape"] == [m, n]
    assert stats["r_u"] == pytest.approx(ratio(u_tilde), rel=1e-6)
    assert stats["r_v"] == pytest.approx(ratio(v_tilde), rel=1e-6)
    lower_median = u_tilde.max() / np.sort(u_tilde)[m // 2 - 1]
    assert abs(lower_median - ratio(u_tilde)) > 1e-3 * ratio(u_tilde)  # the convention is visible in this case
    assert stats["top_singular_values"][:3] == pytest.approx(sigma, rel=1e-8)
    assert stats["stable_rank"] == pytest.approx((sigma ** 2).sum() / 100, rel=1e-8)
    assert stats["threshold"] == 2 and not stats["low_rank"]  # k = 3 > max(1, 10% of 25)
    assert stats["energy_top_k"] == pytest.approx(1.0)


def test_rank_one_with_a_flat_left_vector_has_r_u_one():
    m, n = 30, 12
    rng = np.random.default_rng(3)
    u = rng.choice([-1.0, 1.0], m) / np.sqrt(m)
    v = rng.standard_normal(n)
    v /= np.linalg.norm(v)
    stats = spectrum_stats(torch.from_numpy(3.0 * np.outer(u, v)))
    assert stats["k"] == 1 and stats["low_rank"]
    assert stats["r_u"] == pytest.approx(1.0, abs=1e-12)
    assert stats["r_v"] == pytest.approx(ratio(v ** 2), rel=1e-9)
    assert stats["stable_rank"] == pytest.approx(1.0) and stats["energy_top_k"] == pytest.approx(1.0)
    assert stats["top_singular_values"][0] == pytest.approx(3.0)


@pytest.mark.parametrize("energy, k", [(0.3, 1), (0.5, 1), (0.6, 2), (0.8, 2), (0.85, 3), (0.9, 3), (0.93, 4),
                                       (0.99, 6), (1.0, 6)])
def test_effective_rank_is_the_smallest_k_holding_the_energy(energy, k):
    squares = np.array([50.0, 30.0, 10.0, 5.0, 3.0, 2.0])  # Σ = 100: cumulative shares .5 .8 .9 .95 .98 1
    w = built(orthonormal(20, 6, 4), np.sqrt(squares), orthonormal(6, 6, 5))
    stats = spectrum_stats(w, energy=energy)
    assert stats["k"] == k
    assert stats["energy_top_k"] == pytest.approx(squares[:k].sum() / 100)
    assert stats["threshold"] == 1 and stats["low_rank"] == (k == 1)


def test_low_rank_flag_is_k_at_most_a_tenth_of_the_smaller_side():
    sigma = np.concatenate([[8.0, 6.0, 4.0], np.full(37, 1e-3)])
    w = built(orthonormal(60, 40, 6), sigma, orthonormal(40, 40, 7))
    stats = spectrum_stats(w)
    assert (stats["k"], stats["threshold"], stats["low_rank"]) == (3, 4, True)
    assert not spectrum_stats(w, rank=5)["low_rank"]
    assert spectrum_stats(w, rank=4)["low_rank"]


def test_rank_overrides_the_energy_and_is_capped_at_the_smaller_side():
    sigma = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    u, v = orthonormal(15, 5, 8), orthonormal(5, 5, 9)
    w = built(u, sigma, v)
    stats = spectrum_stats(w, rank=2, energy=0.99)
    assert stats["k"] == 2
    assert stats["energy_top_k"] == pytest.approx(41 / 55)
    assert stats["r_u"] == pytest.approx(ratio((u[:, :2] ** 2) @ sigma[:2] ** 2), rel=1e-9)
    assert spectrum_stats(w, rank=50)["k"] == 5


def test_randomized_path_equals_exact_path_on_the_top_k():
    sigma = np.array([100.0, 80.0, 60.0, 40.0, 30.0, 20.0, 10.0, 5.0])
    w = built(orthonormal(5000, 8, 10), sigma, orthonormal(300, 8, 11), noise=1e-3)
    for options in ({"rank": 8}, {}):
        exact = spectrum_stats(w, **options)
        fast = spectrum_stats(w, exact_max=100, **options)
        assert (exact["method"], fast["method"]) == ("exact", "randomized")
        k = exact["k"]
        assert fast["k"] == k == options.get("rank", 4)
        assert fast["top_singular_values"][:k] == pytest.approx(exact["top_singular_values"][:k], rel=1e-4)
        for key in ("r_u", "r_v", "energy_top_k", "stable_rank"):
            assert fast[key] == pytest.approx(exact[key], rel=1e-4)


def test_randomized_path_falls_back_to_exact_when_the_energy_needs_most_of_the_spectrum():
    w = torch.from_numpy(np.random.default_rng(12).standard_normal((400, 150)))
    assert spectrum_stats(w, exact_max=100)["method"] == "exact"
    assert spectrum_stats(w, rank=140, exact_max=100)["method"] == "exact"


def test_effective_rank_says_when_the_values_given_fall_short():
    assert effective_rank(torch.tensor([3.0, 2.0]), 0.95, 14.0) is None  # 13 < 13.3
    assert effective_rank(torch.tensor([3.0, 2.0, 1.0]), 1.0, 14.0) == 3


def test_zero_matrix_gives_undefined_ratios():
    stats = spectrum_stats(torch.zeros(6, 4))
    assert stats["k"] == 1 and stats["r_u"] == float("inf") and stats["r_v"] == float("inf")
    assert np.isnan(stats["stable_rank"]) and np.isnan(stats["energy_top_k"])


@pytest.mark.parametrize("args, kwargs, phrase", [
    ((torch.ones(5),), {}, "expected a matrix"),
    ((torch.ones(5, 3),), {"rank": 0}, "rank must be at least 1"),
    ((torch.ones(5, 3),), {"energy": 0.0}, "energy must lie in (0, 1]"),
    ((torch.ones(5, 3),), {"energy": 1.5}, "energy must lie in (0, 1]"),
])
def test_spectrum_stats_rejects_bad_arguments(args, kwargs, phrase):
    with pytest.raises(ValueError, match=phrase.replace("(", r"\(").replace("]", r"\]")):
        spectrum_stats(*args, **kwargs)


def test_as_matrix_rejects_one_dimensional_tensors():
    with pytest.raises(ValueError, match="only weights with 2 or more dimensions"):
        as_matrix("ln.weight", torch.ones(4), None)


@pytest.fixture(scope="module")
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2, n_positions=16))


def test_gpt2_conv1d_weights_are_transposed_to_out_in(tiny_gpt2):
    name = "transformer.h.0.mlp.c_fc.weight"
    stored = dict(tiny_gpt2.named_parameters())[name]
    assert tuple(stored.shape) == (8, 32)  # Conv1D: (in, out)
    matrix, note = as_matrix(name, stored, tiny_gpt2)
    assert tuple(matrix.shape) == (32, 8) and note == "transposed from Conv1D (in, out)"
    assert torch.equal(matrix, stored.T)
    layer = model_spectra(tiny_gpt2, [name])[0]
    assert layer["matrix_shape"] == [32, 8] and layer["shape"] == [8, 32] and layer["note"] == note
    untransposed = spectrum_stats(stored)
    assert layer["r_u"] == pytest.approx(untransposed["r_v"], rel=1e-12)
    assert layer["r_v"] == pytest.approx(untransposed["r_u"], rel=1e-12)
    assert layer["r_u"] != pytest.approx(untransposed["r_u"], rel=1e-3)  # the swap matters here


def test_linear_and_embedding_weights_are_read_as_stored(tiny_gpt2):
    head = tiny_gpt2.lm_head.weight  # nn.Linear (out, in), tied to the token embedding
    matrix, note = as_matrix("lm_head.weight", head, tiny_gpt2)
    assert note == "" and matrix is head
    linear = nn.Sequential(nn.Linear(3, 5))
    matrix, note = as_matrix("0.weight", linear[0].weight, linear)
    assert note == "" and tuple(matrix.shape) == (5, 3)
    matrix, note = as_matrix("transformer.wte.weight", tiny_gpt2.transformer.wte.weight, tiny_gpt2)
    assert note == "" and tuple(matrix.shape) == (50, 8)


def test_convolution_kernels_are_reshaped_to_out_by_rest():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 2), nn.Flatten(), nn.Linear(4, 2))
    layer = model_spectra(net, ["0.weight"])[0]
    assert layer["shape"] == [4, 3, 2, 2] and layer["matrix_shape"] == [4, 12]
    assert layer["note"] == "reshaped from (4, 3, 2, 2)"
    assert layer["r_u"] == pytest.approx(spectrum_stats(net[0].weight.reshape(4, 12))["r_u"])
