"""On a CUDA device the engine gives the CPU's numbers (skipped where torch sees no GPU)."""

import numpy as np
import pytest
import torch

from geomaudit.engine.audit import audit_checkpoint
from geomaudit.io.checkpoints import load_checkpoint
from geomaudit.io.data import build_batch, embedded_corpus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_cuda_matches_cpu(tiny_gpt2_dir, precision):
    dtype = torch.float64 if precision == "fp64" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = False
    results = []
    for device in ("cpu", "cuda"):
        loaded = load_checkpoint(tiny_gpt2_dir)
        batch = build_batch(embedded_corpus(), loaded, batch_size=8, max_length=64, seed=0, source="corpus")
        model = loaded.model.to(device=device, dtype=dtype)
        micro = batch.micro_batches(loaded, 3, torch.device(device), dtype)
        layers = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.ln_2.bias"]
        results.append(audit_checkpoint(model, loaded.loss_fn, micro, layers, coords=40, seed=0))
    cpu, cuda = results
    assert cpu.loss == pytest.approx(cuda.loss, rel=1e-5)
    for a, b in zip(cpu.layers, cuda.layers):
        assert a.indices.tolist() == b.indices.tolist()
        tol = 1e-9 if precision == "fp64" else 2e-3
        np.testing.assert_allclose(b.h_diag, a.h_diag, rtol=tol, atol=tol * np.abs(a.h_diag).max())
