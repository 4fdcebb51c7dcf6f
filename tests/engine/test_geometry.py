"""S_med and r_diag from the engine's Hessian columns, against the dense autograd Hessian in fp64."""

import numpy as np
import pytest
import torch
from torch import nn

from geomaudit.engine.audit import audit_checkpoint
from geomaudit.engine.hdiag import DiagonalEngine, MicroBatch
from geomaudit.engine.sampling import sample_indices
from geomaudit.engine.stats import geometry_stats

from .test_hdiag import dense_hessian


def mlp_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    return model, {"x": x, "y": y}


def ce(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def dense(model, name, batch):
    return dense_hessian(model, name, lambda fwd: ce(fwd, batch)).numpy()


@pytest.mark.parametrize("micro", [12, 5])
def test_columns_give_the_dense_submatrix_and_column_norms(micro):
    model, batch = mlp_and_data()
    pieces = [MicroBatch({k: v[s:s + micro] for k, v in batch.items()}, len(batch["y"][s:s + micro]) / 12)
              for s in range(0, 12, micro)]
    name, idx = "0.weight", sample_indices((6, 5), 9, seed=2)
    cols = DiagonalEngine(model, ce, pieces, chunk_size=4).columns(name, idx)
    h = dense(model, name, batch)
    np.testing.assert_allclose(cols.diag.numpy(), np.diag(h)[idx], rtol=1e-10)
    np.testing.assert_allclose(cols.block.numpy(), h[np.ix_(idx, idx)], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(cols.sq_norms.numpy(), (h[idx] ** 2).sum(1), rtol=1e-10)


def test_s_med_and_r_diag_against_the_dense_hessian():
    model, batch = mlp_and_data()
    layers = ["0.weight", "2.bias", "2.weight"]
    result = audit_checkpoint(model, ce, [MicroBatch(batch, 1.0)], layers, coords=10, seed=0, geometry=True,
                              dense_max=20)
    for layer in result.layers:
        h = dense(model, layer.name, batch)
        s = layer.stats
        if layer.s_med_method == "dense":
            eig = np.abs(np.linalg.eigvalsh(h))
        else:
            eig = np.abs(np.linalg.eigvalsh(h[np.ix_(layer.indices, layer.indices)]))
        assert s["s_med"] == pytest.approx(eig.max() / np.median(eig), rel=1e-8)
        rows = h[layer.indices]
        off = np.sqrt((rows ** 2).sum(1) - np.diag(h)[layer.indices] ** 2)
        r = off / np.abs(np.diag(h)[layer.indices])
        assert s["r_diag_mean"] == pytest.approx(r.mean(), rel=1e-8)
        assert s["r_diag_median"] == pytest.approx(np.median(r), rel=1e-8)
    assert [la.s_med_method for la in result.layers] == ["submatrix", "dense", "dense"]  # 30, 3, 18 entries
    plain = audit_checkpoint(model, ce, [MicroBatch(batch, 1.0)], layers, coords=10, seed=0).layers[0]
    assert plain.h_diag_method == "hessian-backprop" and result.layers[0].h_diag_method == "hvp"  # a Sequential MLP
    np.testing.assert_allclose(result.layers[0].h_diag, plain.h_diag, rtol=1e-12)


def test_geometry_stats_edge_cases():
    # a zero column is left out; a zero diagonal under a non-zero column is infinitely dominated
    s = geometry_stats(np.array([[0.0, 1.0], [1.0, 2.0]]), np.array([0.0, 2.0]), np.array([1.0, 5.0]))
    assert s["r_diag_mean"] == float("inf") and s["r_diag_median"] == float("inf")
    s = geometry_stats(np.zeros((2, 2)), np.zeros(2), np.zeros(2))
    assert np.isnan(s["r_diag_mean"]) and np.isnan(s["s_med"])


def test_too_many_columns_for_memory_is_a_usage_error(monkeypatch):
    from geomaudit.engine import hdiag
    from geomaudit.errors import UsageError

    model, batch = mlp_and_data()
    monkeypatch.setattr(hdiag, "COLUMN_BUDGET_BYTES", 100)
    pieces = [MicroBatch({k: v[s] for k, v in batch.items()}, 0.5) for s in (slice(0, 6), slice(6, 12))]
    with pytest.raises(UsageError, match="need .* GiB"):
        DiagonalEngine(model, ce, pieces).columns("0.weight", range(10))


def test_slq_on_a_matrix_with_a_known_spectrum():
    """Eigenvalues spread evenly over [-1, 3] in a random basis: the median |λ| is 1.0, the max 3."""
    from geomaudit.engine.slq import slq_abs_stats

    eig = np.linspace(-1, 3, 500)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(500, 500)))
    h = torch.tensor(q @ np.diag(eig) @ q.T)
    s = slq_abs_stats(lambda v: h @ v, 500)
    assert s["max_abs"] == pytest.approx(3.0, rel=1e-3)
    assert s["median_abs"] == pytest.approx(np.median(np.abs(eig)), rel=0.10)  # the stated tolerance: 10%


def test_engine_slq_against_the_dense_layer_hessian():
    model, batch = mlp_and_data()
    pieces = [MicroBatch({k: v[s] for k, v in batch.items()}, 0.5) for s in (slice(0, 6), slice(6, 12))]
    eig = np.abs(np.linalg.eigvalsh(dense(model, "0.weight", batch)))
    s = DiagonalEngine(model, ce, pieces).abs_spectrum("0.weight", probes=16)
    assert s["max_abs"] == pytest.approx(eig.max(), rel=1e-6)
    assert s["median_abs"] == pytest.approx(np.median(eig), rel=0.25)
    result = audit_checkpoint(model, ce, pieces, ["0.weight"], coords=10, seed=0, geometry=True, dense_max=20,
                              slq=True)
    assert result.layers[0].s_med_method == "slq" and result.layers[0].stats["eig_max_abs"] == pytest.approx(eig.max())


def test_r_diag_across_layers_against_the_joint_dense_hessian():
    """Oracle: the dense Hessian of the loss in the two weight matrices together (paper Fig. 15's r_diag)."""
    from torch.func import functional_call

    model, batch = mlp_and_data()
    names = ["0.weight", "2.weight"]
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]

    def loss(flat):
        pieces = torch.split(flat, sizes)
        values = {n: p.reshape(params[n].shape) for n, p in zip(names, pieces)}
        return nn.functional.cross_entropy(functional_call(model, values, (batch["x"],)), batch["y"])

    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    joint = torch.autograd.functional.hessian(loss, flat0).numpy()
    for micro in (12, 5):
        pieces = [MicroBatch({k: v[s:s + micro] for k, v in batch.items()}, len(batch["y"][s:s + micro]) / 12)
                  for s in range(0, 12, micro)]
        result = audit_checkpoint(model, ce, pieces, ["0.weight", "0.bias", "2.weight"], coords=7, seed=0,
                                  geometry=True, dense_max=1, across=names)
        pooled = []
        for layer, offset in ((result.layers[0], 0), (result.layers[2], sizes[0])):
            rows = joint[offset + layer.indices]
            d = np.abs(np.diag(joint)[offset + layer.indices])
            r = np.sqrt((rows ** 2).sum(1) - d ** 2) / d
            pooled.append(r)
            assert layer.stats["r_diag_across_mean"] == pytest.approx(r.mean(), rel=1e-8)
            assert layer.stats["r_diag_across_mean"] > layer.stats["r_diag_mean"]  # more off-diagonal mass
        assert "r_diag_across_mean" not in result.layers[1].stats
        assert result.across["layers"] == names
        assert result.across["r_diag_median"] == pytest.approx(np.median(np.concatenate(pooled)), rel=1e-8)
