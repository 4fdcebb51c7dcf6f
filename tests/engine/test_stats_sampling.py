"""diagonal_stats on hand-computed arrays, seeded coordinate sampling, and Lemma 1 (paper App. B.2).

Oracles: numbers worked out by hand in each test (stats); the documented contract of sample_indices
(sampling); for Lemma 1, gradient descent run on the quadratic itself, with R_med taken from the
engine's H_ii through diagonal_stats.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from geomaudit.engine.hdiag import DiagonalEngine, MicroBatch
from geomaudit.engine.sampling import sample_indices
from geomaudit.engine.stats import diagonal_stats



# ---------------------------------------------------------------- diagonal_stats

def test_stats_even_count_with_a_zero_and_a_negative():
    """|h| = [1, 2, 4, 0] → sorted [0, 1, 2, 4]: median (1+2)/2 = 1.5, max 4."""
    s = diagonal_stats(np.array([1.0, -2.0, 4.0, 0.0]), topk=2)
    assert s["median_abs"] == 1.5
    assert s["max_abs"] == 4.0
    assert s["mean_abs"] == 7.0 / 4.0
    assert s["r_med"] == pytest.approx(4.0 / 1.5, rel=1e-15)  # 2.666…
    assert s["r_med_stab"] == pytest.approx(4.0 / (1.5 + 0.004), rel=1e-15)  # 2.659574…
    assert s["topk"] == 2
    assert s["r_topk"] == pytest.approx(2.0 / 1.5, rel=1e-15)  # 2nd largest is 2
    assert s["zero_frac"] == 0.25


def test_stats_odd_count_and_topk():
    """|h| = [3, 9, 1, 5, 2] → sorted [1, 2, 3, 5, 9]: median 3, max 9, 3rd largest 3, 2nd largest 5."""
    h = np.array([3.0, -9.0, 1.0, 5.0, -2.0])
    s = diagonal_stats(h, topk=2)
    assert s["median_abs"] == 3.0
    assert s["r_med"] == 3.0
    assert s["r_med_stab"] == pytest.approx(9.0 / 3.009, rel=1e-15)
    assert s["r_topk"] == pytest.approx(5.0 / 3.0, rel=1e-15)
    assert s["zero_frac"] == 0.0
    assert s["mean_abs"] == 4.0
    assert diagonal_stats(h, topk=3)["r_topk"] == 1.0  # 3rd largest = 3 = median
    assert diagonal_stats(h, topk=1)["r_topk"] == 3.0  # k = 1 is the max itself


def test_stats_topk_is_capped_at_the_count():
    """k = min(topk, n): with topk 10 and 4 values the 'k-th largest' is the smallest, here 1."""
    s = diagonal_stats(np.array([1.0, 6.0, 2.0, 4.0]), topk=10)  # median (2+4)/2 = 3
    assert s["topk"] == 4
    assert s["r_topk"] == pytest.approx(1.0 / 3.0, rel=1e-15)
    assert s["r_med"] == 2.0


def test_stats_default_topk_is_ten():
    """h = 1..20: median 10.5; the 10th largest is 11."""
    s = diagonal_stats(np.arange(1.0, 21.0))
    assert s["topk"] == 10
    assert s["r_topk"] == pytest.approx(11.0 / 10.5, rel=1e-15)
    assert s["r_med"] == pytest.approx(20.0 / 10.5, rel=1e-15)


def test_stats_zero_median_gives_inf_and_stab_stays_finite():
    """|h| = [0, 0, 0, 5]: median 0 → r_med = inf; r_med_stab = 5 / (0 + 0.005) = 1000."""
    s = diagonal_stats(np.array([0.0, 0.0, -0.0, 5.0]), topk=1)
    assert s["median_abs"] == 0.0
    assert s["r_med"] == math.inf
    assert s["r_med_stab"] == pytest.approx(1000.0, rel=1e-12)
    assert s["r_topk"] == math.inf  # 5 / 0
    assert s["zero_frac"] == 0.75
    assert math.isnan(diagonal_stats(np.array([0.0, 0.0, 0.0, 5.0]), topk=4)["r_topk"])  # 0 / 0


def test_stats_all_zero_is_nan():
    """0/0 everywhere: nan, not inf and not an exception; zero_frac 1."""
    s = diagonal_stats(np.zeros(6))
    assert math.isnan(s["r_med"]) and math.isnan(s["r_med_stab"]) and math.isnan(s["r_topk"])
    assert s["zero_frac"] == 1.0 and s["max_abs"] == 0.0


def test_stats_single_value_and_empty():
    s = diagonal_stats(np.array([-2.5]))
    assert s["r_med"] == 1.0 and s["r_topk"] == 1.0 and s["topk"] == 1
    assert s["r_med_stab"] == pytest.approx(2.5 / (2.5 + 0.0025), rel=1e-15)
    with pytest.raises(ValueError):
        diagonal_stats(np.array([]))


# ---------------------------------------------------------------- sample_indices

@pytest.mark.parametrize("shape", [(8, 24), (30, 8), (1000, 1000), (4, 5, 6)])
def test_sample_indices_are_sorted_unique_in_range_and_seeded(shape):
    numel = int(np.prod(shape))
    a = sample_indices(shape, 20, seed=3)
    b = sample_indices(shape, 20, seed=3)
    c = sample_indices(shape, 20, seed=4)
    assert a.dtype == np.int64 and a.shape == (20,)
    assert np.array_equal(a, b)  # same seed, same shape: same coordinates
    assert not np.array_equal(a, c)  # another seed: other coordinates
    assert np.all(np.diff(a) > 0)  # sorted and unique
    assert a.min() >= 0 and a.max() < numel
    assert a.max() > numel // 2 and a.min() < numel // 2  # spread over the tensor, not a prefix


def test_small_layers_are_taken_in_full():
    for shape, n in [((8,), 8), ((8,), 200), ((3, 4), 12), ((3, 4), 13), ((2, 3, 2), 100)]:
        numel = int(np.prod(shape))
        assert sample_indices(shape, n, seed=0).tolist() == list(range(numel))
    assert len(sample_indices((3, 4), 11, seed=0)) == 11  # one short of full: a sample


def test_sample_indices_are_uniform_over_seeds():
    """Each of 10 coordinates is drawn by ~3/10 of 2000 seeds (binomial sd ≈ 20.5; band is ±6 sd)."""
    counts = np.zeros(10, dtype=int)
    for seed in range(2000):
        counts[sample_indices((10,), 3, seed)] += 1
    assert counts.sum() == 6000
    assert np.all(np.abs(counts - 600) < 123), counts


# ---------------------------------------------------------------- Lemma 1 (App. B.2)

class DiagonalQuadratic(nn.Module):
    """f(x) = Σ λ_i x_i² / 2 with a single parameter vector x."""

    def __init__(self, lam, x0):
        super().__init__()
        self.register_buffer("lam", torch.as_tensor(lam, dtype=torch.float64))
        self.x = nn.Parameter(torch.as_tensor(x0, dtype=torch.float64).clone())

    def forward(self):
        return 0.5 * (self.lam * self.x ** 2).sum()


def quadratic_loss(model, tensors):
    return model()


def engine_rmed(model):
    """R_med of the quadratic from the engine's exact H_ii of every coordinate."""
    engine = DiagonalEngine(model, quadratic_loss, [MicroBatch({}, 1.0)], chunk_size=64)
    h = engine.diagonal("x", range(model.x.numel()))
    assert torch.equal(h, model.lam)  # H_ii = λ_i exactly
    return diagonal_stats(h.numpy())["r_med"]


def gd_losses(model, steps):
    """Losses f(x^(0)), …, f(x^(steps)) of GD with η = 1/λ_1, gradients by autograd."""
    eta = 1.0 / float(model.lam.max())
    losses = []
    for _ in range(steps + 1):
        loss = model()
        losses.append(float(loss.detach()))
        (g,) = torch.autograd.grad(loss, model.x)
        with torch.no_grad():
            model.x -= eta * g
    return losses


D = 1000  # even, as in the lemma


def spike_spectrum(m):
    """λ_1 = 1 and the other d−1 eigenvalues spread around m: R_med ≈ 1/m, and most of f(x⁽⁰⁾) lies
    on the coordinates near the median, so halving the loss takes ∝ R_med steps."""
    return np.r_[1.0, m * np.linspace(1.5, 0.5, D - 1)]


def signs(seed):
    return np.random.default_rng(seed).choice([-1.0, 1.0], D)


SPECTRA = {
    "spike-0.3": spike_spectrum(0.3),
    "spike-0.01": spike_spectrum(0.01),
    "geometric": np.geomspace(1.0, 1e-3, D),
    "two-level": np.r_[np.ones(D // 2), np.full(D // 2, 0.05)],
}


@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("spectrum", list(SPECTRA), ids=list(SPECTRA))
def test_lemma1_gd_halves_the_loss_within_T_steps(spectrum, p):
    """Lemma 1: after T = (p/2)·R_med·log d steps of GD with η = 1/λ_1 from x = ±1,
    f(x^(T)) ≤ (1/2 + d^(−p))·f(x^(0)); R_med from diagonal_stats of the engine's H_ii."""
    lam = SPECTRA[spectrum]
    model = DiagonalQuadratic(lam, signs(0))
    r_med = engine_rmed(model)
    assert r_med == pytest.approx(lam.max() / np.median(lam), rel=1e-12)
    T = math.ceil(p / 2 * r_med * math.log(D))  # f is non-increasing along GD, so rounding up is safe
    losses = gd_losses(model, T)
    assert losses[-1] <= (0.5 + D ** -p) * losses[0]
    assert all(b <= a for a, b in zip(losses, losses[1:]))  # η = 1/λ_1: every factor |1 − λ_i/λ_1| ≤ 1


def test_larger_rmed_needs_more_steps_to_halve():
    """Same family (one spike, the rest around m): steps to halve f grow with R_med, and stay ≤ T."""
    steps, rmeds = [], []
    for m in (0.3, 0.1, 0.03, 0.01):
        model = DiagonalQuadratic(spike_spectrum(m), signs(1))
        r_med = engine_rmed(model)
        T = math.ceil(0.5 * r_med * math.log(D))  # p = 1
        losses = gd_losses(model, T)
        halved = [t for t, f in enumerate(losses) if f <= 0.5 * losses[0]]
        assert halved, "not halved within T steps"
        steps.append(halved[0])
        rmeds.append(r_med)
    assert rmeds == sorted(rmeds) and rmeds[-1] > 25 * rmeds[0]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), (rmeds, steps)  # strictly increasing
    assert steps[-1] >= 10 * steps[0], steps
