"""geomaudit.compare: pairing checkpoints by step / by loss, per-layer mean (std) and ratios, the summary."""

import math

import numpy as np
import pytest

from geomaudit.compare import (Point, auto_levels, compare_layers, layer_rows, pair_by_loss, pair_by_step,
                               summarize)


def run(name, steps, losses=None, values=None):
    """A run: one point per step; losses default to 1/step, values to {} (enough for pairing tests)."""
    losses = losses or [1.0 / s for s in steps]
    return [Point(name, s, x, values or {}) for s, x in zip(steps, losses)]


# --- pairing by step ---------------------------------------------------------------------------

def test_pair_by_step_keeps_common_steps_in_order():
    a = run("a", [6, 2, 4])
    b = run("b", [2, 4, 6, 8])
    pairings = pair_by_step([a], [b])
    assert [p.step for p in pairings] == [2, 4, 6]
    assert [p.label for p in pairings] == ["step 2", "step 4", "step 6"]
    for p in pairings:
        assert p.mode == "step" and p.level is None and p.refused is None
        assert [q.step for q in p.a] == [p.step] and [q.step for q in p.b] == [p.step]
        assert p.a[0].run == "a" and p.b[0].run == "b"
    # ascending whatever the order of the checkpoints (or of a set of these integers: 1000, 8, 33)
    assert [p.step for p in pair_by_step([run("a", [1000, 33, 8])], [run("b", [8, 1000, 33])])] == [8, 33, 1000]


def test_pair_by_step_needs_a_step_in_every_run():
    # step 4 is in A and in the first B run, not in the second B run
    pairings = pair_by_step([run("a", [2, 4])], [run("b1", [2, 4]), run("b2", [2, 6])])
    assert [p.step for p in pairings] == [2]
    assert [q.run for q in pairings[0].b] == ["b1", "b2"]


def test_pair_by_step_without_common_step_raises():
    with pytest.raises(ValueError, match="share no step"):
        pair_by_step([run("a", [1, 3])], [run("b", [2, 4])])


def test_pairing_needs_runs_on_both_sides():
    with pytest.raises(ValueError, match="side B"):
        pair_by_step([run("a", [1])], [])
    with pytest.raises(ValueError, match="side A"):
        pair_by_step([[]], [run("b", [1])])


# --- pairing by loss ---------------------------------------------------------------------------

def test_auto_levels_span_the_overlap_from_high_to_low():
    a1 = run("a1", [0, 1, 2, 3], [4.0, 2.0, 1.0, 0.5])
    a2 = run("a2", [0, 1, 2, 3], [3.5, 2.5, 1.5, 1.0])
    b = run("b", [0, 1, 2], [3.0, 2.9, 2.0])
    # lo = max(0.5, 1.0, 2.0) = 2.0; hi = min(4.0, 3.5, 3.0) = 3.0
    assert auto_levels([a1, a2], [b]) == pytest.approx([3.0, 2.5, 2.0])
    assert auto_levels([a1, a2], [b], n=5) == pytest.approx([3.0, 2.75, 2.5, 2.25, 2.0])
    assert auto_levels([a1], [b], n=1) == pytest.approx([3.0])


def test_auto_levels_single_common_loss_gives_one_level():
    a = run("a", [0, 1], [3.0, 2.0])
    b = run("b", [0, 1], [2.0, 1.0])
    assert auto_levels([a], [b], n=4) == [2.0]


def test_auto_levels_without_overlap_raises():
    a = run("a", [0, 1], [3.0, 2.0])
    b = run("b", [0, 1], [1.5, 1.0])
    with pytest.raises(ValueError, match="the loss curves do not overlap"):
        auto_levels([a], [b])


def test_pair_by_loss_picks_closest_points():
    # A (fast) reaches loss 1.0 at step 20; B (slow) at step 300
    a = run("a", [10, 20, 30], [2.0, 1.01, 0.5])
    b = run("b", [100, 200, 300, 400], [2.02, 1.5, 0.995, 0.8])
    p1, p2 = pair_by_loss([a], [b], levels=[2.0, 1.0])
    assert (p1.mode, p1.level, p1.step, p1.label) == ("loss", 2.0, None, "loss 2.000")
    assert (p1.a[0].step, p1.b[0].step) == (10, 100)
    assert (p2.a[0].step, p2.b[0].step) == (20, 300)
    assert p1.refused is None and p2.refused is None  # |2.02-2|/2 = 1%, |1.01-1|/1 = 1% <= 2%


def test_pair_by_loss_refuses_beyond_tolerance():
    a = run("a", [10, 20], [1.0, 0.25])
    b = run("b", [100, 200], [1.0, 0.3])
    p_ok, p_far = pair_by_loss([a], [b], levels=[1.0, 0.25])
    assert p_ok.refused is None
    # B's closest loss to 0.25 is 0.3: 20% off
    assert p_far.refused is not None
    assert "0.25" in p_far.refused and "0.3" in p_far.refused
    assert "step 200" in p_far.refused and "20.0%" in p_far.refused
    # a tolerance wide enough accepts it; the boundary itself is accepted (|loss - level| / level <= tol)
    assert pair_by_loss([a], [b], levels=[0.25], tolerance=0.25)[0].refused is None
    assert pair_by_loss([a], [b], levels=[1.0], tolerance=0.0)[0].refused is None
    c = run("c", [1], [1.25])  # 25% from 1.0, exactly (binary fractions)
    assert pair_by_loss([c], [c], levels=[1.0], tolerance=0.25)[0].refused is None
    assert pair_by_loss([c], [c], levels=[1.0], tolerance=0.2499)[0].refused is not None


def test_pair_by_loss_ties_go_to_the_earlier_step():
    a = run("a", [30, 10, 20], [0.75, 1.25, 1.0])  # an exact match beats the tie around it
    b = run("b", [30, 10], [0.75, 1.25])  # a tie: both 0.25 from 1.0 (exact in binary), listed late step first
    (p,) = pair_by_loss([a], [b], levels=[1.0], tolerance=0.5)
    assert p.a[0].step == 20
    assert p.b[0].step == 10


def test_pair_by_loss_default_levels_and_bad_arguments():
    a = run("a", [0, 1, 2], [3.0, 2.5, 2.0])
    b = run("b", [0, 1, 2], [3.0, 2.5, 2.0])
    assert [p.level for p in pair_by_loss([a], [b], None)] == pytest.approx([3.0, 2.5, 2.0])
    with pytest.raises(ValueError):
        pair_by_loss([a], [b], levels=[0.0])
    with pytest.raises(ValueError):
        pair_by_loss([a], [b], levels=[-1.0])
    with pytest.raises(ValueError):
        pair_by_loss([a], [b], levels=[1.0], tolerance=-0.01)
    with pytest.raises(ValueError, match="nan"):
        pair_by_loss([a], [run("b", [0], [math.nan])], levels=[1.0])


# --- per-layer rows ----------------------------------------------------------------------------

def test_layer_rows_two_seeds_per_side():
    # "partial" is missing from b2: not a layer of every point, so no row
    a = [run("a1", [5], [1.0], {"l1": 2.0, "partial": 1.0, "l2": 10.0}),
         run("a2", [5], [1.0], {"l2": 14.0, "l1": 4.0, "partial": 1.0})]
    b = [run("b1", [5], [1.0], {"l2": 30.0, "l1": 6.0, "partial": 3.0}),
         run("b2", [5], [1.0], {"l1": 12.0, "l2": 42.0})]
    (pairing,) = pair_by_step(a, b)
    rows = layer_rows(pairing)
    assert [r.name for r in rows] == ["l1", "l2"]  # order of the first point of side A
    l1, l2 = rows
    # l1: A = {2, 4}: mean 3, std sqrt(((2-3)^2 + (4-3)^2) / 1) = sqrt(2); B = {6, 12}: mean 9, std sqrt(18)
    assert (l1.a_mean, l1.b_mean) == pytest.approx((3.0, 9.0))
    assert (l1.a_std, l1.b_std) == pytest.approx((math.sqrt(2.0), math.sqrt(18.0)))
    assert l1.ratio == pytest.approx(3.0)
    # l2: A = {10, 14}: mean 12, std sqrt(8); B = {30, 42}: mean 36, std sqrt(72); ratio 3
    assert (l2.a_mean, l2.a_std, l2.b_mean, l2.b_std, l2.ratio) == pytest.approx(
        (12.0, math.sqrt(8.0), 36.0, math.sqrt(72.0), 3.0))
    inverted = layer_rows(pairing, reference="b")
    assert [r.ratio for r in inverted] == pytest.approx([1 / 3, 1 / 3])
    assert inverted[0].a_mean == l1.a_mean and inverted[0].b_std == l1.b_std
    with pytest.raises(ValueError):
        layer_rows(pairing, reference="c")


def test_layer_rows_single_run_std_is_zero():
    (pairing,) = pair_by_step([run("a", [1], [1.0], {"w": 2.0})], [run("b", [1], [1.0], {"w": 5.0})])
    (row,) = layer_rows(pairing)
    assert (row.a_std, row.b_std, row.ratio) == (0.0, 0.0, 2.5)


def test_layer_rows_drop_non_finite_means():
    a = [run("a1", [1], [1.0], {"inf": math.inf, "nan": 1.0, "ok": 1.0, "zero": 0.0}),
         run("a2", [1], [1.0], {"inf": 1.0, "nan": 1.0, "ok": 3.0, "zero": 0.0})]
    b = [run("b1", [1], [1.0], {"inf": 1.0, "nan": math.nan, "ok": 4.0, "zero": 1.0}),
         run("b2", [1], [1.0], {"inf": 1.0, "nan": 1.0, "ok": 4.0, "zero": 1.0})]
    rows = layer_rows(pair_by_step(a, b)[0])
    assert [r.name for r in rows] == ["ok", "zero"]
    assert rows[0].ratio == pytest.approx(2.0)
    assert rows[1].ratio == math.inf  # finite means, zero reference: an undefined ratio, kept as inf


# --- summary -----------------------------------------------------------------------------------

def test_summarize_hand_numbers():
    s = summarize([2.0, 8.0, 0.5, 4.0])
    assert s["n_layers"] == 4
    assert s["frac_above_1"] == 0.75
    # geometric mean: (2 * 8 * 0.5 * 4) ** (1/4) = 32 ** 0.25
    assert s["geo_mean"] == pytest.approx(32 ** 0.25)
    # sign test: 3 above, 1 below, n = 4: p = 2 * P[X <= 1] = 2 * (1 + 4) / 16
    assert s["sign_p"] == pytest.approx(10 / 16)
    assert s["ci_low"] <= s["geo_mean"] <= s["ci_high"]


def test_summarize_ties_count_in_fraction_but_not_in_sign_test():
    s = summarize([1.0, 1.0, 2.0, 3.0])
    assert s["frac_above_1"] == 0.5
    assert s["sign_p"] == pytest.approx(0.5)  # n = 2, k = 2: 2 * P[X <= 0] = 2 / 4
    assert summarize([1.0, 1.0])["sign_p"] == 1.0  # nothing left to test


@pytest.mark.parametrize("above,below", [(0, 1), (3, 1), (5, 5), (9, 2), (1, 14), (20, 7), (0, 30)])
def test_sign_p_matches_scipy_binomtest(above, below):
    from scipy import stats

    ratios = [2.0] * above + [0.5] * below
    expected = stats.binomtest(above, above + below, 0.5, alternative="two-sided").pvalue
    assert summarize(ratios)["sign_p"] == pytest.approx(expected, rel=1e-12)


def test_bootstrap_reproduces_the_documented_draws():
    ratios = [0.7, 1.3, 2.0, 5.0, 1.1, 0.9, 3.0]
    s = summarize(ratios, seed=7, n_boot=500, confidence=0.9)
    # the same draws, one resample at a time: indices from default_rng(seed).integers(0, n, (n_boot, n))
    idx = np.random.default_rng(7).integers(0, len(ratios), size=(500, len(ratios)))
    boot = sorted(math.prod(ratios[i] for i in row) ** (1 / len(row)) for row in idx)

    def percentile(q):  # linear interpolation between order statistics (numpy's default)
        pos = q / 100 * (len(boot) - 1)
        lo = math.floor(pos)
        return boot[lo] + (boot[min(lo + 1, len(boot) - 1)] - boot[lo]) * (pos - lo)

    assert s["ci_low"] == pytest.approx(percentile(5.0), rel=1e-9)
    assert s["ci_high"] == pytest.approx(percentile(95.0), rel=1e-9)
    assert s["ci_low"] < s["geo_mean"] < s["ci_high"]
    assert summarize(ratios, seed=7, n_boot=500, confidence=0.9) == s  # seeded: same input, same interval
    assert summarize(ratios, seed=8, n_boot=500, confidence=0.9)["ci_low"] != s["ci_low"]


def test_bootstrap_of_equal_ratios_is_a_point():
    s = summarize([2.5] * 6)
    assert s["geo_mean"] == pytest.approx(2.5)
    assert s["ci_low"] == s["ci_high"] == s["geo_mean"]
    assert s["frac_above_1"] == 1.0
    assert s["sign_p"] == pytest.approx(2 / 2**6)


def test_summarize_drops_non_finite_and_non_positive():
    s = summarize([2.0, math.inf, math.nan, 0.0, -3.0, 0.5, 8.0])
    assert s["n_layers"] == 3
    assert s["geo_mean"] == pytest.approx(2.0)  # (2 * 0.5 * 8) ** (1/3)
    assert s["frac_above_1"] == pytest.approx(2 / 3)


def test_summarize_empty():
    expected = dict(n_layers=0, frac_above_1=None, geo_mean=None, ci_low=None, ci_high=None, sign_p=None,
                    n_repeats=1, repeats_above_1=None, ci_over=None, effect=None)
    assert summarize([]) == expected
    assert summarize([math.nan, math.inf, 0.0]) == expected
    with pytest.raises(ValueError):
        summarize([2.0], confidence=1.0)


# --- paired repeats ----------------------------------------------------------------------------

def test_paired_rows_give_the_mean_and_std_of_per_repeat_ratios():
    a = [run("adam-0", [5], [1.0], {"w": 2.0, "b": 1.0}), run("adam-1", [5], [1.0], {"w": 4.0, "b": 3.0})]
    b = [run("sgdm-0", [5], [1.0], {"w": 6.0, "b": 2.0}), run("sgdm-1", [5], [1.0], {"w": 4.0, "b": 12.0})]
    (pairing,) = pair_by_step(a, b)
    w, bias = layer_rows(pairing, paired=True)
    # w: per-repeat ratios 6/2 = 3 and 4/4 = 1: mean 2, std sqrt(((3-2)^2 + (1-2)^2) / 1) = sqrt(2)
    assert w.ratios == (3.0, 1.0) and w.ratio_mean == 2.0 and w.ratio_std == pytest.approx(math.sqrt(2.0))
    assert w.ratio == pytest.approx(5.0 / 3.0)  # the ratio of the means is kept beside them
    # b: 2/1 = 2 and 12/3 = 4
    assert bias.ratios == (2.0, 4.0) and bias.ratio_mean == 3.0 and bias.ratio_std == pytest.approx(math.sqrt(2.0))
    assert [r.ratios for r in layer_rows(pairing, reference="b", paired=True)] == [(1 / 3, 1.0), (0.5, 0.25)]
    assert layer_rows(pairing)[0].ratios is None  # unpaired: no per-repeat ratios
    (one,) = pair_by_step(a[:1], b[:1])
    assert layer_rows(one, paired=True)[0].ratio_std == 0.0
    (uneven,) = pair_by_step(a, b[:1])
    with pytest.raises(ValueError, match="as many runs on each side"):
        layer_rows(uneven, paired=True)


def test_summarize_repeats_by_layers_hand_numbers():
    # 3 repeats x 4 layers; the last layer is undefined in one repeat, so it is left out
    r = np.array([[2.0, 0.5, 4.0, math.inf],
                  [2.0, 2.0, 1.0, 3.0],
                  [8.0, 1.0, 0.25, 3.0]])
    s = summarize(r, n_boot=4000)
    logs = np.log(r[:, :3])
    assert s["n_layers"] == 3 and s["n_repeats"] == 3 and s["ci_over"] == "repeats and layers"
    assert s["geo_mean"] == pytest.approx(math.exp(logs.mean()))  # (2*.5*4 * 2*2*1 * 8*1*.25) ** (1/9) = 32 ** (1/9)
    assert s["geo_mean"] == pytest.approx(32 ** (1 / 9))
    # per layer, geometric means over repeats: (32)^(1/3) > 1, 1^(1/3) = 1 (a tie), 1^(1/3) = 1
    assert s["frac_above_1"] == pytest.approx(1 / 3) and s["sign_p"] == 1.0
    # per repeat, over layers: 4^(1/3) > 1, 4^(1/3) > 1, 2^(1/3) > 1
    assert s["repeats_above_1"] == 3
    assert s["ci_low"] < s["geo_mean"] < s["ci_high"] and s["effect"] == "none"


def test_the_interval_over_repeats_and_layers_holds_the_run_to_run_variation():
    # every layer agrees within a repeat, the repeats disagree: layers alone look certain, repeats do not
    r = np.array([[3.0] * 10, [0.5] * 10, [2.0] * 10, [0.6] * 10])
    paired = summarize(r, seed=1)
    assert paired["ci_low"] < 1 < paired["ci_high"] and paired["effect"] == "none"
    per_run = summarize(r[0])
    assert per_run["ci_low"] == per_run["ci_high"] == pytest.approx(3.0) and per_run["effect"] == "above_1"
    assert per_run["n_repeats"] == 1 and per_run["ci_over"] == "layers" and per_run["repeats_above_1"] is None
    # the same layer values in every repeat: the interval is the layers' bootstrap interval
    same = summarize(np.tile([2.0, 4.0, 0.5, 3.0, 1.5], (4, 1)), seed=3)
    alone = summarize([2.0, 4.0, 0.5, 3.0, 1.5], seed=3)
    assert (same["ci_low"], same["ci_high"]) == pytest.approx((alone["ci_low"], alone["ci_high"]))


def test_bootstrap_over_repeats_and_layers_reproduces_the_documented_draws():
    r = np.exp(np.random.default_rng(0).normal(0.2, 0.5, size=(3, 5)))
    s = summarize(r, seed=4, n_boot=300, confidence=0.8)
    rng = np.random.default_rng(4)
    layers, repeats = rng.integers(0, 5, size=(300, 5)), rng.integers(0, 3, size=(300, 3))
    boot = [math.exp(np.log(r[np.ix_(ri, li)]).mean()) for ri, li in zip(repeats, layers)]
    assert (s["ci_low"], s["ci_high"]) == pytest.approx(tuple(np.percentile(boot, [10, 90])), rel=1e-12)


def test_verdict_claims_no_more_than_the_interval():
    from geomaudit.compare import verdict

    clear = summarize(np.array([[2.0, 3.0, 2.5, 1.8], [2.2, 2.6, 3.1, 1.9], [1.9, 2.8, 2.4, 2.1]]))
    text = verdict(clear, "R_SGDM/R_Adam")
    assert text.startswith("effect, R_SGDM/R_Adam above 1: geometric-mean R_SGDM/R_Adam")
    assert "over 3 repeats × 4 layers" in text and "above 1 on 4 of 4 layers" in text and "in 3 of 3 repeats" in text
    reverse = verdict(summarize(1 / np.array([[2.0, 3.0, 2.5], [2.2, 2.6, 3.1]])), "B/A")
    assert reverse.startswith("effect, B/A below 1")
    mixed = verdict(summarize(np.array([[3.0] * 4, [0.5] * 4, [2.0] * 4, [0.6] * 4])), "B/A")
    assert mixed.startswith("no clear effect: ") and "an interval that includes 1" in mixed
    single = verdict(summarize([2.0, 3.0, 2.5, 1.8]), "B/A")
    assert single.startswith("B/A above 1 in this one run per side") and "repeat the runs" in single
    assert "effect" not in single.split(".")[0]
    assert verdict(summarize([math.inf]), "B/A").startswith("nothing to compare")
    assert verdict(None).startswith("nothing to compare")


# --- layers left out, saturated R_med_stab ------------------------------------------------------

def test_zero_hessian_layers_are_left_out_and_named():
    a = [Point("a", 1, 1.0, {"w": 2.0, "key": float("nan")}, excluded={"key": "Hessian zero to round-off"})]
    b = [Point("b", 1, 1.0, {"w": 6.0, "key": 37.0})]  # round-off in B looks like a number, but A says zero
    rows, left_out = compare_layers(pair_by_step([a], [b])[0])
    assert [r.name for r in rows] == ["w"] and rows[0].ratio == pytest.approx(3.0)
    assert left_out == [{"name": "key", "reason": "Hessian zero to round-off (A)"}]
    undefined = [Point("b", 1, 1.0, {"w": math.inf, "key": 1.0})]
    rows, left_out = compare_layers(pair_by_step([[Point("a", 1, 1.0, {"w": 1.0, "key": 1.0})]], [undefined])[0])
    assert [r.name for r in rows] == ["key"] and left_out == [
        {"name": "w", "reason": "the metric undefined (median |H_ii| = 0) in B"}]


def test_saturated_layers_use_r_med_on_both_sides():
    """R_med_stab = R/(1 + R/1000): A at R_med 50 (stab 47.6), B at R_med 40000 (stab 975.6). The stabilised ratio
    20.5 understates the real 800; both sides switch to R_med, also A where it does not saturate."""
    stab = lambda r: r / (1 + r / 1000)
    a = [Point("a", 1, 1.0, {"c_attn": stab(50.0), "mlp": stab(10.0)}, fallback={"c_attn": 50.0, "mlp": 10.0})]
    b = [Point("b", 1, 1.0, {"c_attn": stab(40000.0), "mlp": stab(20.0)}, saturated=frozenset({"c_attn"}),
               fallback={"c_attn": 40000.0, "mlp": 20.0})]
    rows, left_out = compare_layers(pair_by_step([a], [b])[0])
    c_attn, mlp = rows
    assert (c_attn.a_mean, c_attn.b_mean, c_attn.ratio, c_attn.metric) == pytest.approx((50.0, 40000.0, 800.0, "r_med"))
    assert mlp.metric is None and mlp.ratio == pytest.approx(stab(20.0) / stab(10.0))
    assert left_out == []
    with_inf = [Point("b", 1, 1.0, {"c_attn": 1000.0, "mlp": 1.0}, saturated=frozenset({"c_attn"}),
                      fallback={"c_attn": math.inf, "mlp": 1.0})]  # median 0: R_med infinite, stab exactly 1000
    rows, left_out = compare_layers(pair_by_step([a], [with_inf])[0])
    assert [r.name for r in rows] == ["mlp"]
    assert left_out == [{"name": "c_attn", "reason": "r_med undefined (median |H_ii| = 0) in B"}]


def test_fail_above_skips_zero_layers_and_judges_saturated_ones_on_r_med():
    from geomaudit.gates import fail_above

    def layer(name, r_med, stab, zero=False, sat=False):
        return {"name": name, "zero_hessian": zero, "saturated": sat, "stats": {"r_med": r_med, "r_med_stab": stab}}

    doc = {"checkpoints": [{"path": "ckpt", "step": None, "layers": [
        layer("key.bias", None, None, zero=True), layer("mlp", 20.0, 19.6), layer("c_attn", 5000.0, 833.3, sat=True)]}]}
    notes = []
    reason = fail_above(doc, 2000, "r_med_stab", notes.append)  # R_med_stab (833) could never pass 1000
    assert reason == ("r_med_stab is above --fail-above 2000 in 1 of 2 layers: c_attn at ckpt (5000, r_med: "
                      "r_med_stab saturates there)")
    assert notes == ["--fail-above skips key.bias: Hessian zero to round-off, no ratio"]
    assert fail_above(doc, 6000, "r_med_stab") is None  # the zero layer's null is not an infinite ratio
    doc["checkpoints"][0]["layers"][0]["zero_hessian"] = False
    assert "key.bias at ckpt (undefined)" in fail_above(doc, 6000, "r_med_stab")  # undefined, not zero: counts


def test_per_layer_intervals_say_whether_a_ratio_is_above_1():
    """B's interval above A's in every run: ▲ (above); below: ▼; touching or missing: no claim."""
    def point(run, values, bounds, **kw):
        return Point(run, 1, 1.0, values, bounds=bounds, **kw)

    a = [point("a1", {"x": 2.0, "y": 2.0, "z": 2.0, "w": 2.0}, {"x": (1.0, 3.0), "y": (1.0, 3.0), "z": (1.0, 3.0),
                                                              "w": (1.0, 3.0)}),
         point("a2", {"x": 2.5, "y": 2.0, "z": 2.0, "w": 2.0}, {"x": (1.5, 3.5), "y": (1.0, 3.0), "z": (1.0, 3.5),
                                                              "w": (1.0, math.nan)})]
    b = [point("b1", {"x": 9.0, "y": 0.4, "z": 4.0, "w": 9.0}, {"x": (4.0, 20.0), "y": (0.1, 0.8), "z": (3.4, 9.0),
                                                              "w": (4.0, 20.0)})]
    pairing = pair_by_step([[p] for p in a], [b])[0]
    apart = {r.name: r.apart for r in layer_rows(pairing)}
    assert apart == {"x": "above", "y": "below", "z": "overlap", "w": None}  # z: 3.4 < a2's 3.5
    assert {r.name: r.apart for r in layer_rows(pairing, reference="b")} == {
        "x": "below", "y": "above", "z": "overlap", "w": None}
    sat = [point("b1", {"x": 990.0}, {"x": (900.0, 999.0)}, saturated=frozenset({"x"}), fallback={"x": 1e5},
                 fallback_bounds={"x": (2.0, 4e5)})]
    plain = [point("a1", {"x": 50.0}, {"x": (40.0, 80.0)}, fallback={"x": 52.0}, fallback_bounds={"x": (41.0, 85.0)})]
    (row,) = layer_rows(pair_by_step([plain], [sat])[0])
    assert row.metric == "r_med" and row.apart == "overlap"  # R_med's intervals decide, and they overlap
