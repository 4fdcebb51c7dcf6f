"""One checkpoint's audit: choose layers, sample coordinates, compute H_ii, summarise."""

import fnmatch
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ..errors import InputError, UsageError
from ..results import CheckpointResult, LayerResult
from . import fused
from .fused import Block
from .hdiag import DiagonalEngine, LossFn, MicroBatch
from .sampling import sample_indices
from .roundoff import check_positions, model_dtype, other_dtype, recompute, verdict
from .stats import diagonal_stats, geometry_stats, r_diag_values, ratio


def select_layers(model: nn.Module, patterns: Sequence[str] = (),
                  blocks: Mapping[str, Sequence[Block]] | None = None) -> list[str]:
    """Names of the trainable parameter tensors matching any glob in ``patterns`` (all if empty); with ``blocks``
    (``fused.fused_blocks``: parameter name → its q, k, v blocks), a fused parameter is replaced by its blocks'
    names, selected by a glob matching either the block's name or the parameter's."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    blocks = blocks or {}
    known = names + [b.name for bs in blocks.values() for b in bs]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in known):
            raise UsageError(f"--layers {pattern!r} matches no trainable parameter "
                             f"(names look like {names[0]!r})")
    return fused.select(names, blocks, patterns)


def audit_loss(model: nn.Module, loss_fn: LossFn, micro_batches: Sequence[MicroBatch]) -> float:
    """The audit loss Σ_b w_b L_b; a NaN or infinite loss is an input error."""
    try:
        with torch.no_grad():
            loss = sum(mb.weight * float(loss_fn(model, mb.tensors)) for mb in micro_batches)
    except (RuntimeError, IndexError, ValueError, TypeError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"the data does not fit the model: {first}") from err
    if not math.isfinite(loss):
        raise InputError(f"the loss on the audit batch is {loss}: the checkpoint or the data holds non-finite values")
    return loss


def audit_checkpoint(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: Sequence[MicroBatch],
    layers: Sequence[str],
    *,
    coords: int,
    seed: int,
    topk: int = 10,
    chunk_size: int | None = None,
    path: str = "",
    step: int | None = None,
    loss: float | None = None,
    geometry: bool = False,
    dense_max: int = 2048,
    slq: bool = False,
    across: Sequence[str] = (),
    blocks: Mapping[str, Block] | None = None,
    cached: Mapping[str, Mapping] | None = None,
    on_result: Callable[[LayerResult], None] | None = None,
    on_layer: Callable[[int, int, str, int], None] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    make_engine: Callable[..., DiagonalEngine] = DiagonalEngine,
) -> CheckpointResult:
    """Audit ``layers`` of ``model``: ``coords`` seeded coordinates each (SPEC §1–§2).

    With ``geometry``, each layer also gets S_med and r_diag (``geometry_stats``) from the same Hessian
    columns: S_med of the dense block for layers of at most ``dense_max`` entries (every column is computed),
    else of the principal submatrix H[S, S] of the sampled coordinates, or with ``slq`` of the whole block by
    stochastic Lanczos quadrature (``s_med_method`` says which). With ``across`` (layer names), the columns of
    those layers run over all of them together, giving r_diag across layers (``r_diag_across_*``, and pooled
    over their sampled coordinates in ``CheckpointResult.across``: the paper's Figure 15).
    ``blocks`` maps the names of split fused blocks among ``layers`` (``fused.Block.name``) to their block: its
    coordinates are sampled within the block (seeded by the block's shape) and mapped to the fused tensor's indices.
    ``loss`` is the audit loss when already known. ``cached[name]`` (``indices``, ``h_diag``, ``seconds``)
    is earlier work, reused when its indices are the ones this audit samples. ``on_result`` receives each
    newly computed layer (to save it); ``on_layer(position, count, name, work)`` announces each layer with
    its work in coordinate-passes (coordinates × micro-batches); ``on_chunk(n)`` reports progress inside it.
    ``make_engine(model, loss_fn, micro_batches, chunk_size=…, layers=…)`` builds the engine (a ``ShardedEngine``
    under torchrun).
    """
    loss = audit_loss(model, loss_fn, micro_batches) if loss is None else loss
    cached, blocks = cached or {}, blocks or {}
    wanted = list(dict.fromkeys(blocks[n].param if n in blocks else n for n in layers))
    engine = make_engine(model, loss_fn, micro_batches, chunk_size=chunk_size, layers=wanted)
    params = dict(model.named_parameters())
    results, pooled = [], []
    for position, name in enumerate(layers, 1):
        block = blocks.get(name)
        param = block.param if block else name
        shape = block.shape if block else tuple(params[name].shape)
        indices = sample_indices(shape, coords, seed)
        if block:
            indices = block.fused_indices(indices)
        where = {"block": block.label, "of": block.describe()} if block else {}
        if on_layer:
            on_layer(position, len(layers), name, len(indices) * len(micro_batches))
        earlier = cached.get(name)
        if earlier is not None and name not in across and list(earlier["indices"]) == indices.tolist():
            h = np.asarray(earlier["h_diag"], dtype=np.float64)
            stats = diagonal_stats(h, topk) | earlier.get("geometry", {})
            results.append(LayerResult(name, shape, indices, h, stats, earlier["seconds"], True,
                                       earlier.get("s_med_method"), h_diag_method=earlier.get("h_diag_method"),
                                       roundoff=earlier.get("roundoff"), **where))
            continue
        start = time.perf_counter()
        if geometry:
            dense = params[name].numel() <= dense_max
            joint = across if name in across else ()
            cols = engine.columns(name, np.arange(params[name].numel()) if dense else indices, on_chunk, joint)
            at = indices if dense else np.arange(len(indices))
            diag, block, sq, sq_joint = (t.double().cpu().numpy()
                                         for t in (cols.diag, cols.block, cols.sq_norms, cols.sq_norms_across))
            h, extra = diag[at], geometry_stats(block, diag[at], sq[at])
            if joint:
                pooled.append(r_diag_values(h, sq_joint[at]))
                extra |= _mean_median("r_diag_across", pooled[-1])
            method = "dense" if dense else "slq" if slq else "submatrix"
            if method == "slq":
                spectrum = engine.abs_spectrum(name, seed=seed)
                extra |= {"s_med": ratio(spectrum["max_abs"], spectrum["median_abs"]),
                          "eig_max_abs": spectrum["max_abs"], "eig_median_abs": spectrum["median_abs"]}
        else:
            h, extra, method = engine.diagonal(param, indices, on_chunk).double().cpu().numpy(), {}, None
        if not all(map(math.isfinite, h)):
            raise InputError(f"the Hessian diagonal of {name} holds non-finite values")
        results.append(LayerResult(name, shape, indices, h, diagonal_stats(h, topk) | extra,
                                   time.perf_counter() - start, False, method, h_diag_method=engine.methods[param],
                                   **where))
        if on_result:
            on_result(results[-1])
    results = _check_roundoff(model, loss_fn, micro_batches, results, topk, on_result, on_layer, on_chunk)
    summary = {"layers": list(across)} | _mean_median("r_diag", np.concatenate(pooled)) if pooled else None
    return CheckpointResult(path, step, loss, tuple(results), across=summary)


def _check_roundoff(model, loss_fn, micro_batches, results, topk, on_result, on_layer, on_chunk):
    """Each layer with its ``zero_hessian`` flag and ratios, from a recomputation of a few of its entries
    (``engine.roundoff``) unless its cache entry holds one; an all-zero diagonal is zero without one."""
    todo = {la.name: check_positions(la.h_diag) for la in results if la.roundoff is None and la.h_diag.any()}
    if todo and on_layer:
        on_layer(len(results), len(results), f"round-off check of {len(todo)} layers",
                 len(micro_batches) * sum(map(len, todo.values())))
    again = _recompute_layers(model, loss_fn, micro_batches,
                              {la.name: (la.param, la.indices[todo[la.name]]) for la in results if la.name in todo},
                              on_chunk)
    checked = []
    for la in results:
        roundoff = la.roundoff
        if la.name in again:
            at = todo[la.name]
            found = verdict(la.h_diag, at, again[la.name])
            roundoff = {"dtype": str(other_dtype(model_dtype(model))).removeprefix("torch."),
                        "indices": la.indices[at].tolist(), "h_diag": again[la.name].tolist(),
                        "changes": found["changes"].tolist(), "zero_hessian": found["zero_hessian"],
                        "median_zero": found["median_zero"]}
        zero = roundoff["zero_hessian"] if roundoff else not la.h_diag.any()
        stats = diagonal_stats(la.h_diag, topk, zero_hessian=zero, median_zero=bool(roundoff and roundoff["median_zero"]),
                               full=len(la.indices) == la.numel)
        extra = {k: float("nan") if zero else v for k, v in la.stats.items() if k not in stats}
        checked.append(replace(la, stats=stats | extra, zero_hessian=zero, roundoff=roundoff))
        if on_result and la.name in again:
            on_result(checked[-1])
    return checked


def _recompute_layers(model, loss_fn, micro_batches, wanted, on_chunk):
    """``recompute`` for layers given as name → (parameter, indices): the blocks of one fused parameter share it."""
    per_param: dict[str, list] = {}
    for name, (param, idx) in wanted.items():
        per_param.setdefault(param, []).append((name, idx))
    values = recompute(model, loss_fn, micro_batches,
                       {p: np.concatenate([idx for _, idx in parts]) for p, parts in per_param.items()}, on_chunk)
    out = {}
    for param, parts in per_param.items():
        ends = np.cumsum([len(idx) for _, idx in parts])
        out |= {name: piece for (name, _), piece in zip(parts, np.split(values[param], ends[:-1]))}
    return out


def _mean_median(prefix: str, values: np.ndarray) -> dict[str, float]:
    return {f"{prefix}_mean": float(values.mean()) if values.size else float("nan"),
            f"{prefix}_median": float(np.median(values)) if values.size else float("nan")}


def audit_gradient(model: nn.Module, loss_fn: LossFn, micro_batches: Sequence[MicroBatch],
                   names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The true gradient of the audit loss Σ_b w_b L_b with respect to the named tensors."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    for mb in micro_batches:
        grads = torch.autograd.grad(loss_fn(model, mb.tensors), [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                total[n] += mb.weight * g
    return total
