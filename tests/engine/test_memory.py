"""The engine's memory bounds: chunks sized from a counted per-tangent cost, no coords × coords matrix without
--smed, H[S, S] under the column budget, and the CPU allocator's failure recognised as out-of-memory."""

import numpy as np
import pytest
import torch
from torch import nn

from geomaudit.engine import hdiag
from geomaudit.engine.hdiag import AllocationCounter, DiagonalEngine, MicroBatch, out_of_memory
from geomaudit.errors import UsageError

from .test_hdiag import assert_close, make_mlp, mlp_data, mse_loss, oracle_diag


def test_allocation_counter_counts_the_bytes_operators_return():
    x = torch.ones(10, dtype=torch.float64)
    with AllocationCounter() as counter:
        y = x * 2          # 80 bytes
        z = y.sum()        # 8 bytes
    assert counter.bytes == 88 and float(z) == 20


def test_chunk_is_capped_by_the_counted_cost_of_one_tangent(monkeypatch):
    """With a budget of 2.5 tangents' worth (as counted on the first coordinate), chunks of 2: values unchanged."""
    model, data = make_mlp(), mlp_data()
    name, idx = "0.weight", np.arange(24)
    param = dict(model.named_parameters())[name]
    with hdiag.only_requires_grad(model, param):
        flat = torch.autograd.grad(mse_loss(model, data), param, create_graph=True)[0].reshape(-1)
        with AllocationCounter() as counter:
            DiagonalEngine(model, mse_loss, [])._columns_at(flat, [param], torch.tensor([0]))
    uncapped = DiagonalEngine(model, mse_loss, [MicroBatch(data, 1.0)], chunk_size=16, backprop=False)
    uncapped.diagonal(name, idx)
    assert uncapped.chunks[name] == 16
    monkeypatch.setitem(hdiag.CHUNK_BUDGET_BYTES, "cpu", int(2.5 * counter.bytes))
    engine = DiagonalEngine(model, mse_loss, [MicroBatch(data, 1.0)], chunk_size=16, backprop=False)
    got = engine.diagonal(name, idx)
    assert engine.chunks[name] == 2
    assert_close(got, oracle_diag(model, name, lambda fwd: mse_loss(fwd, data), idx))


def test_cpu_default_is_one_double_backward_per_coordinate():
    model, data = make_mlp(), mlp_data()
    engine = DiagonalEngine(model, mse_loss, [MicroBatch(data, 1.0)], backprop=False)
    engine.diagonal("0.weight", range(5))
    assert engine.chunk_size == hdiag.DEFAULT_CHUNK["cpu"] == 1 and engine.chunks["0.weight"] == 1


def test_diagonal_alone_holds_no_coords_by_coords_matrix(monkeypatch):
    """Without --smed nothing of size coords² exists: a column budget of 100 bytes does not stop 24 coordinates."""
    monkeypatch.setattr(hdiag, "COLUMN_BUDGET_BYTES", 100)
    model, data = make_mlp(), mlp_data()
    cols = DiagonalEngine(model, mse_loss, [MicroBatch(data, 1.0)])._accumulate("0.weight", range(24), None, False)
    assert cols.block.numel() == 0 and cols.diag.shape == (24,)


def test_submatrix_over_the_column_budget_is_a_usage_error(monkeypatch):
    """One micro-batch: H[S, S] alone (24² fp64 = 4608 bytes) is held, and refused past the budget."""
    model, data = make_mlp(), mlp_data()
    monkeypatch.setattr(hdiag, "COLUMN_BUDGET_BYTES", 4607)
    with pytest.raises(UsageError, match="need 0.0 GiB"):
        DiagonalEngine(model, mse_loss, [MicroBatch(data, 1.0)]).columns("0.weight", range(24))
    monkeypatch.setattr(hdiag, "COLUMN_BUDGET_BYTES", 4608)
    assert DiagonalEngine(model, mse_loss, [MicroBatch(data, 1.0)]).columns("0.weight", range(24)).block.shape == (24, 24)


def test_the_cpu_allocators_failure_counts_as_out_of_memory():
    with pytest.raises(RuntimeError) as caught:
        torch.empty(1 << 62, dtype=torch.uint8)  # the CPU allocator refuses at once: no memory is touched
    assert not isinstance(caught.value, torch.OutOfMemoryError)
    assert out_of_memory(caught.value)
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


class _Cube(torch.autograd.Function):
    """x ↦ x³, whose backward, when run for a batch of tangents (under vmap), first asks the CPU allocator for
    2**62 bytes: a real allocation failure above one tangent, and none for one (the engine's unbatched path)."""

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if torch._C._functorch.is_legacy_batchedtensor(grad):  # is_grads_batched vmaps with these
            torch.empty(1 << 62, dtype=torch.uint8)
        return 3 * x ** 2 * grad


class _Quartic(torch.autograd.Function):
    """x ↦ x⁴/4 with the gradient x³ through _Cube: the Hessian-vector products run _Cube.backward."""

    @staticmethod
    def forward(x):
        return x ** 4 / 4

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _Cube.apply(x) * grad


def test_batched_chunks_halve_on_the_cpu_allocators_failure():
    model = nn.Module()
    model.w = nn.Parameter(torch.linspace(0.5, 1.5, 6, dtype=torch.float64))
    engine = DiagonalEngine(model, lambda m, _: _Quartic.apply(m.w).sum(), [MicroBatch({}, 1.0)], chunk_size=4)
    got = engine.diagonal("w", range(6))
    assert engine.chunks["w"] == 1 and engine.chunk_size == 1  # 4 → 2 → 1, kept for later layers
    torch.testing.assert_close(got, 3 * model.w.detach() ** 2, rtol=1e-12, atol=0)
