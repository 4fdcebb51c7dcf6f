"""Benchmark the exact Hessian-diagonal engine against a naive one-HVP-per-coordinate loop.

Measured side by side in one run, on the same model, batch and parameter tensor:

* fwd+bwd -- one loss forward and a full ``loss.backward()`` over every parameter (the unit);
* naive   -- per coordinate i: a fresh forward, a ``create_graph`` backward for the audited tensor
             and one Hessian-vector product with the one-hot e_i, keeping entry i;
* engine  -- ``DiagonalEngine.diagonal`` on ``--coords`` sampled coordinates (the audit's own path),
             with its automatic chunk size and, for reference, with a sweep of explicit chunk sizes.

Per-coordinate times are printed as multiples of fwd+bwd (lower is better); naive/engine is the
speed-up. The engine's values are checked against the naive loop's -- a fast wrong answer fails.

    python benchmarks/bench_hdiag.py                       # tiny GPT-2 on CPU (or BERT-small on a GPU)
    python benchmarks/bench_hdiag.py --device cuda --precision tf32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from geomaudit.engine import hdiag
from geomaudit.engine.hdiag import DiagonalEngine, MicroBatch, only_requires_grad
from geomaudit.engine.sampling import sample_indices
from geomaudit.errors import GeomauditError
from geomaudit.io.checkpoints import model_output_loss
from geomaudit.runtime import resolve_device, set_precision

MODELS = ("gpt2-tiny", "bert-small")
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
DEFAULT_SWEEP = {"cpu": (1, 4, 16, 64), "cuda": (16, 64, 256)}
# relative agreement demanded of engine vs naive (see rel_diff): both are fp32 sums of the same
# products in a different order; tf32 matmuls make the batched and unbatched kernels round differently
TOLERANCE = {"fp32": 1e-3, "tf32": 5e-2}
TARGET_SPEEDUP = {"cuda": 3.0, "cpu": 1.0}   # naive/engine at least this
TARGET_COST_CUDA_FP32 = 1.0                  # engine per coordinate at most this × fwd+bwd


# ----------------------------------------------------------------------------- model and batch

def build(model_name: str, layers: int | None, batch_shape: tuple[int, int] | None, device: torch.device,
          dtype: torch.dtype, seed: int):
    """The model (eval mode, eager attention, random init from ``seed``), its batch and audited tensors."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if model_name == "gpt2-tiny":
        n_layer = layers or 2
        b, t = batch_shape or (8, 64)
        config = transformers.GPT2Config(vocab_size=1000, n_positions=max(64, t), n_embd=128, n_layer=n_layer,
                                         n_head=4, bos_token_id=0, eos_token_id=0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        ids = torch.randint(0, config.vocab_size, (b, t), generator=gen)
        batch = {"input_ids": ids, "labels": ids.clone()}
        block = f"transformer.h.{n_layer // 2}"
        params = {f"{block}.attn.c_attn.weight": "attention qkv",
                  f"{block}.mlp.c_fc.weight": "MLP in",
                  f"{block}.ln_1.weight": "LayerNorm",
                  "transformer.wte.weight": "word embedding (tied)"}
    elif model_name == "bert-small":
        n_layer = layers or 4
        b, t = batch_shape or (32, 128)
        config = transformers.BertConfig(hidden_size=512, num_hidden_layers=n_layer, num_attention_heads=8,
                                         intermediate_size=2048, max_position_embeddings=max(512, t), num_labels=2)
        model = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
        ids = torch.randint(0, config.vocab_size, (b, t), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                 "labels": torch.randint(0, 2, (b,), generator=gen)}
        layer = f"bert.encoder.layer.{n_layer // 2}"
        params = {f"{layer}.attention.self.query.weight": "attention query",
                  f"{layer}.intermediate.dense.weight": "MLP in",
                  f"{layer}.attention.output.LayerNorm.weight": "LayerNorm",
                  "bert.embeddings.word_embeddings.weight": "word embedding"}
    else:
        raise SystemExit(f"--model must be one of {', '.join(MODELS)}")
    model = model.to(device=device, dtype=dtype).eval()
    batch = {k: v.to(device) for k, v in batch.items()}
    if model.config._attn_implementation != "eager":
        raise SystemExit(f"expected eager attention, got {model.config._attn_implementation}")
    return model, batch, params


# ----------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(result, seconds) of ``fn()``, with the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def forward_backward(model, loss_fn, batch) -> None:
    """The unit of cost: a training step's loss forward and full backward (gradients allocated afresh)."""
    loss_fn(model, batch).backward()


def fb_seconds(model, loss_fn, batch, device) -> float:
    """One timed forward+backward; the gradients are dropped again so that they do not sit in memory."""
    model.zero_grad(set_to_none=True)
    _, seconds = timed(lambda: forward_backward(model, loss_fn, batch), device)
    model.zero_grad(set_to_none=True)
    return seconds


def naive_diagonal(model, loss_fn, batch, name: str, indices) -> torch.Tensor:
    """H_ii the obvious way: per coordinate a fresh forward, a create_graph backward and one HVP with e_i.

    Only the audited tensor requires grad, as in the engine, so the comparison measures graph reuse
    and batching, not the freezing of the other parameters.
    """
    param = dict(model.named_parameters())[name]
    values = []
    with only_requires_grad(model, param):
        for i in indices:
            i = int(i)
            loss = loss_fn(model, batch)
            (grad,) = torch.autograd.grad(loss, param, create_graph=True, allow_unused=True)
            if grad is None or not grad.requires_grad:  # loss at most linear in the tensor
                values.append(torch.zeros((), dtype=param.dtype, device=param.device))
                continue
            e_i = torch.zeros_like(param)
            e_i.view(-1)[i] = 1
            (hv,) = torch.autograd.grad(grad, param, grad_outputs=e_i, allow_unused=True)
            values.append(hv.reshape(-1)[i] if hv is not None else torch.zeros((), dtype=param.dtype,
                                                                                device=param.device))
            del loss, grad, e_i, hv
    return torch.stack(values)


def effective_chunk(engine: DiagonalEngine, param: torch.Tensor) -> int:
    """The chunk ``engine`` will use for ``param`` (its request capped by the tangent memory budget)."""
    return engine._chunk_for(param)  # private: the benchmark reports what the engine decides


@dataclass
class EngineRun:
    """One engine configuration on one layer."""

    label: str                    # "auto" or the requested chunk size
    requested: int | None
    chunk: int | None = None      # what the engine used (memory cap); lowered again on OOM back-off
    seconds: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    status: str = "ok"            # ok | OOM | backed-off | unbatched | same (as the engine column) | error: ...
    values: torch.Tensor | None = None

    def best(self) -> float | None:
        return min(self.seconds) if self.seconds else None


def run_engine(run: EngineRun, model, loss_fn, micro, name, idx, device, warm: bool) -> None:
    """One timed ``diagonal`` call of a fresh engine (or an untimed warm-up on a few coordinates)."""
    if run.status not in ("ok", "backed-off"):
        return
    param = dict(model.named_parameters())[name]
    # after an out-of-memory back-off, later calls start from the size the engine settled on, as it does across layers
    request = run.chunk if run.status == "backed-off" else run.requested
    engine = DiagonalEngine(model, loss_fn, micro, chunk_size=request)
    chunk = effective_chunk(engine, param)
    run.chunk = chunk if run.chunk is None else min(run.chunk, chunk)
    if warm:  # one chunk's worth: builds the graph, the allocator's pools and the vmap plan once, untimed
        idx = idx[: min(len(idx), chunk)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values, seconds = timed(lambda: engine.diagonal(name, idx), device)
        except OOM:
            run.status = "OOM"
            values = None
        except RuntimeError as err:
            run.status = "error: " + (str(err).splitlines() or [type(err).__name__])[0][:60]
            values = None
    WARNINGS.update(f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught)
    if values is None:
        _free(device)
        return
    if not engine.batched:
        run.status = "unbatched"  # the engine fell back to one HVP per coordinate: timings say nothing of chunks
    elif engine.chunk_size is not None and engine.chunk_size < run.chunk:
        run.status, run.chunk = "backed-off", engine.chunk_size  # halved on out-of-memory inside the engine
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        run.peak_mib = peak if run.peak_mib is None else max(run.peak_mib, peak)
    if not warm:
        run.seconds.append(seconds)
        run.values = values.detach()
    _free(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


WARNINGS: set[str] = set()


# ----------------------------------------------------------------------------- agreement

def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max_i |a_i - b_i| / max(|b_i|, 1e-3·max_j |b_j|): relative, with entries far below the layer's scale
    (exact zeros of unused embedding rows, say) compared against that scale instead of themselves."""
    a, b = a.double().cpu(), b.double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    scale = float(b.abs().max()) if len(b) else 0.0
    if scale == 0.0:
        return float((a - b).abs().max()) if len(a) else 0.0
    return float(((a - b).abs() / b.abs().clamp_min(1e-3 * scale)).max())


def naive_positions(engine_values: torch.Tensor, k: int) -> list[int]:
    """k positions into the sampled coordinates: half spread evenly, half the largest |H_ii| (so the check
    cannot pass on zeros alone); the naive loop is timed and compared on these."""
    n = len(engine_values)
    k = min(k, n)
    spread = [round(j * (n - 1) / max(1, (k + 1) // 2 - 1)) for j in range((k + 1) // 2)] if n > 1 else [0]
    chosen = list(dict.fromkeys(spread))
    for j in engine_values.abs().argsort(descending=True).tolist():
        if len(chosen) >= k:
            break
        if j not in chosen:
            chosen.append(j)
    return sorted(chosen)


# ----------------------------------------------------------------------------- per layer

@dataclass
class LayerResult:
    name: str
    role: str
    shape: tuple
    numel: int
    coords: int
    naive_coords: int
    fb_seconds: list[float] = field(default_factory=list)
    naive_seconds: list[float] = field(default_factory=list)   # per coordinate, one sample per pass
    naive_status: str = "ok"
    engine: EngineRun | None = None
    sweep: list[EngineRun] = field(default_factory=list)
    rel_diff_naive: float | None = None
    rel_diff_sweep: dict = field(default_factory=dict)

    def fb(self) -> float:
        return min(self.fb_seconds)

    def naive(self) -> float | None:
        return min(self.naive_seconds) if self.naive_seconds else None

    def per_coord(self, run: EngineRun) -> float | None:
        best = run.best()
        return best / self.coords if best is not None else None


def bench_layer(model, batch, name, role, args, device, sweep_sizes) -> LayerResult:
    loss_fn = model_output_loss
    micro = [MicroBatch(batch, 1.0)]
    param = dict(model.named_parameters())[name]
    idx = torch.as_tensor(sample_indices(tuple(param.shape), args.coords, args.seed), device=device)
    res = LayerResult(name, role, tuple(param.shape), param.numel(), len(idx), 0)
    res.engine = EngineRun("auto" if args.chunk_size is None else str(args.chunk_size), args.chunk_size)
    res.sweep = [EngineRun(str(k), k) for k in sweep_sizes]
    runs = [res.engine, *res.sweep]
    for run in runs:  # what each configuration will use; one equal to the engine column's is not timed twice
        run.chunk = effective_chunk(DiagonalEngine(model, loss_fn, micro, chunk_size=run.requested), param)
        if run is not res.engine and run.chunk == res.engine.chunk:
            run.status = "same"

    # warm-up: the full backward, every engine configuration, and the values that pick the naive coordinates
    for _ in range(2):
        fb_seconds(model, loss_fn, batch, device)
    for run in runs:
        run_engine(run, model, loss_fn, micro, name, idx, device, warm=True)
    run_engine(res.engine, model, loss_fn, micro, name, idx, device, warm=False)
    if res.engine.values is None:
        return res
    positions = naive_positions(res.engine.values, args.naive_coords)
    naive_idx = idx[positions]
    res.naive_coords = len(naive_idx)
    try:
        naive_diagonal(model, loss_fn, batch, name, naive_idx[:1])  # warm-up
    except OOM:
        res.naive_status = "OOM"
        _free(device)

    # interleaved repeats, so that load drifting on a shared machine hits every column alike
    naive_values = None
    for r in range(args.repeats):
        res.fb_seconds.append(fb_seconds(model, loss_fn, batch, device))
        if res.naive_status == "ok":
            try:
                naive_values, s = timed(lambda: naive_diagonal(model, loss_fn, batch, name, naive_idx), device)
                res.naive_seconds.append(s / len(naive_idx))
            except OOM:
                res.naive_status = "OOM"
                _free(device)
        for run in runs:
            if run is res.engine and r == 0:
                continue  # its first timed call happened above
            run_engine(run, model, loss_fn, micro, name, idx, device, warm=False)

    if naive_values is not None:
        res.rel_diff_naive = rel_diff(res.engine.values[positions], naive_values)
    for run in res.sweep:
        if run.values is not None:
            res.rel_diff_sweep[run.label] = rel_diff(run.values, res.engine.values)
    return res


# ----------------------------------------------------------------------------- report

def fmt_x(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3f}×" if x < 0.1 else f"{x:.2f}×")


def fmt_sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def render(results: list[LayerResult], sweep_sizes, device_kind: str) -> list[str]:
    headers = ["layer", "numel", "fwd+bwd ms", "naive/coord", "engine/coord", "naive/engine"]
    headers += [f"chunk {k}" for k in sweep_sizes] + ["rel diff"]
    rows, notes = [], []
    for res in results:
        fb = res.fb() if res.fb_seconds else None
        naive = res.naive()
        eng = res.per_coord(res.engine) if res.engine else None
        eng_cell = fmt_x(eng / fb if eng is not None and fb else None)
        if res.engine is not None:
            eng_cell += f" [{res.engine.chunk}]" + ("" if res.engine.status == "ok" else f" {res.engine.status}")
        naive_cell = fmt_x(naive / fb if naive is not None and fb else None)
        row = [res.name, str(res.numel), f"{fb * 1e3:.1f}" if fb else "-",
               naive_cell if res.naive_status == "ok" else res.naive_status,
               eng_cell,
               f"{naive / eng:.1f}" if naive is not None and eng else "-"]
        for run in res.sweep:
            pc = res.per_coord(res.engine if run.status == "same" else run)
            cell = fmt_x(pc / fb if pc is not None and fb else None)
            if run.status == "same":
                cell = cell + "=" if pc is not None else "(as engine)"
                if run.chunk != run.requested:
                    notes.append(f"= {res.name}: chunk {run.requested} is capped to {run.chunk} by the tangent "
                                 "memory budget, as the engine column is")
            elif run.status in ("OOM", "unbatched") or run.status.startswith("error"):
                cell = run.status if pc is None else f"{cell} {run.status}"
            elif run.chunk is not None and run.chunk != run.requested:
                cell += "*"
                why = "halved on OOM" if run.status == "backed-off" else "capped by the tangent memory budget"
                notes.append(f"* {res.name}: chunk {run.requested} ran as {run.chunk} ({why})")
            row.append(cell)
        worst = max([d for d in [res.rel_diff_naive, *res.rel_diff_sweep.values()] if d is not None], default=None)
        row.append(fmt_sci(res.rel_diff_naive) + ("" if worst == res.rel_diff_naive else f" ({fmt_sci(worst)})"))
        rows.append(row)
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(headers)]

    def join(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in pairs)

    line = join(headers)
    out = [line, "-" * len(line), *(join(r) for r in rows)]
    if any(r.status == "same" for res in results for r in res.sweep):
        notes.insert(0, "= the engine column's configuration (same effective chunk): measured once, shown again")
    out += list(dict.fromkeys(notes))
    if device_kind == "cuda":  # what each configuration costs in memory decides the default as much as its speed
        out += ["", "peak GPU memory allocated during one diagonal() call, GiB (model and batch included):"]
        for res in results:
            cells = [f"engine [{res.engine.chunk}] {_gib(res.engine.peak_mib)}"] if res.engine else []
            cells += [f"chunk {r.label} {_gib(r.peak_mib)}" for r in res.sweep if r.status != "same"]
            out.append(f"  {res.name}: " + ", ".join(cells))
    return out


def _gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.2f}"


def verdict(results, device_kind: str, precision: str, tol: float) -> tuple[list[str], bool]:
    """Target lines, best chunk per layer, and whether every value agreed."""
    lines, agree = [], True
    target = TARGET_SPEEDUP[device_kind]
    for res in results:
        fb, naive = (res.fb() if res.fb_seconds else None), res.naive()
        eng = res.per_coord(res.engine) if res.engine else None
        checks = []
        diffs = [d for d in [res.rel_diff_naive, *res.rel_diff_sweep.values()] if d is not None]
        if res.rel_diff_naive is None:  # nothing to compare: the engine or the naive loop did not run (OOM)
            checks.append("values NOT CHECKED (engine or naive loop did not finish)")
        else:
            ok_values = max(diffs) <= tol
            agree &= ok_values
            checks.append(f"values {'agree' if ok_values else 'DISAGREE'} (max rel diff {fmt_sci(max(diffs))}, "
                          f"tol {tol:g})")
        if naive is not None and eng:
            checks.append(f"speed-up {naive / eng:.1f} {'>=' if naive / eng >= target else '< '} {target:g} "
                          f"{'ok' if naive / eng >= target else 'MISS'}")
        if device_kind == "cuda" and precision == "fp32" and eng is not None and fb:
            ok = eng / fb <= TARGET_COST_CUDA_FP32
            checks.append(f"cost {eng / fb:.2f}× fwd+bwd {'<=' if ok else '> '} {TARGET_COST_CUDA_FP32:g} "
                          f"{'ok' if ok else 'MISS'}")
        timed_runs = [(res.per_coord(r), r) for r in [res.engine, *res.sweep] if r and r.best() is not None]
        auto_pc = res.per_coord(res.engine) if res.engine else None
        if timed_runs and auto_pc is not None and fb:
            best_pc, best_run = min(timed_runs, key=lambda t: t[0])
            if best_run is res.engine or best_run.chunk == res.engine.chunk:
                checks.append(f"engine's chunk {res.engine.chunk} is the fastest measured")
            else:
                slower = auto_pc / best_pc
                checks.append(f"fastest: chunk {best_run.chunk} at {best_pc / fb:.3f}× vs the engine's "
                              f"{res.engine.chunk} at {auto_pc / fb:.3f}× ({slower:.2f}× slower"
                              f"{', within noise' if slower < 1.1 else ''})")
        lines.append(f"{res.name}: " + "; ".join(checks))
    return lines, agree


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default=None,
                   help="default: gpt2-tiny on CPU, bert-small on CUDA")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--coords", type=int, default=None, help="coordinates per layer for the engine (default: "
                   "200, the audit's default, on CUDA; 64 on CPU to keep the run within ~3 minutes)")
    p.add_argument("--naive-coords", type=int, default=8, help="coordinates per pass of the naive loop (default 8)")
    p.add_argument("--blocks", type=int, default=None, help="transformer blocks in the model "
                   "(default 2 for gpt2-tiny, 4 for bert-small); the audited block is the middle one")
    p.add_argument("--params", nargs="+", default=None, metavar="NAME",
                   help="parameter names to audit instead of the four representative ones")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of every measurement; the fastest counts")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="chunk size of the main engine column (default: the engine's automatic choice)")
    p.add_argument("--sweep", default=None, help="comma-separated chunk sizes for the reference columns "
                   "(default 1,4,16,64 on CPU, 16,64,256 on CUDA; '' for none)")
    p.add_argument("--batch", default=None, metavar="BxT", help="examples x tokens (default 8x64 for gpt2-tiny, "
                   "32x128 for bert-small)")
    p.add_argument("--precision", choices=tuple(TOLERANCE), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the measurements as JSON")
    args = p.parse_args(argv)
    if args.batch is not None:
        try:
            b, t = (int(v) for v in args.batch.lower().split("x"))
            assert b > 0 and t > 1
        except (ValueError, AssertionError):
            p.error(f"--batch takes examples x tokens like 8x64, got {args.batch!r}")
        args.batch = (b, t)
    if any(v is not None and v < 1 for v in (args.coords, args.naive_coords, args.repeats, args.chunk_size)):
        p.error("--coords, --naive-coords, --repeats and --chunk-size must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except GeomauditError as err:
        raise SystemExit(f"error: {err}") from None
    kind = device.type if device.type == "cuda" else "cpu"
    dtype = set_precision(args.precision)
    try:  # name the ops that vmap runs one tangent at a time (private switch; silent when absent)
        torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    except AttributeError:
        pass
    model_name = args.model or ("bert-small" if kind == "cuda" else "gpt2-tiny")
    if args.coords is None:
        args.coords = 200 if kind == "cuda" else 64
    sweep_sizes = (DEFAULT_SWEEP[kind] if args.sweep is None
                   else tuple(int(s) for s in args.sweep.split(",") if s.strip()))
    model, batch, params = build(model_name, args.blocks, args.batch, device, dtype, args.seed)
    if args.params:
        known = dict(model.named_parameters())
        missing = [n for n in args.params if n not in known]
        if missing:
            raise SystemExit(f"no parameter {missing[0]!r}; names look like {next(iter(known))!r}")
        params = {n: "" for n in args.params}

    import transformers
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items())
    print(f"geomaudit Hessian-diagonal benchmark: {model_name} ({type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{model.config.num_hidden_layers} layers, eager attention, eval mode)")
    if kind == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev_name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        dev_name = platform.processor() or platform.machine()
    print(f"device {device} ({dev_name}) | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"python {platform.python_version()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}, {os.cpu_count()} CPUs, "
          f"load {load:.1f}) | precision {args.precision} ({dtype})")
    print(f"batch {shapes} | one micro-batch")
    chunk = (f"automatic (MAX_CHUNK {hdiag.MAX_CHUNK[kind]}, tangent budget "
             f"{hdiag.TANGENT_BUDGET_BYTES[kind] >> 20} MiB)" if args.chunk_size is None else args.chunk_size)
    print(f"engine: {args.coords} sampled coordinates per layer, chunk {chunk}"
          f" | naive: {args.naive_coords} coordinates per pass | {args.repeats} interleaved repeats, fastest counts")
    if kind == "cpu" and load > (os.cpu_count() or 1):
        print(f"WARNING: load {load:.1f} exceeds the {os.cpu_count()} CPUs: other processes share the cores, "
              "timings are noisy (ratios are taken from interleaved repeats to limit the damage)")
    print(flush=True)

    results = []
    started = time.perf_counter()
    for name, role in params.items():
        t0 = time.perf_counter()
        try:
            res = bench_layer(model, batch, name, role, args, device, sweep_sizes)
        except OOM:  # the plain forward+backward itself does not fit
            _free(device)
            p = dict(model.named_parameters())[name]
            res = LayerResult(name, role, tuple(p.shape), p.numel(), 0, 0, naive_status="OOM",
                              engine=EngineRun("auto", args.chunk_size, status="OOM"))
            model.zero_grad(set_to_none=True)
        results.append(res)
        print(f"  measured {name} {res.shape} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    print("per-coordinate time as a multiple of one forward+backward (lower is better); "
          "engine/coord [its chunk]; naive/engine = speed-up;")
    print("rel diff = engine vs naive on the naive coordinates (in brackets: worst incl. sweep vs engine)")
    print()
    for line in render(results, sweep_sizes, kind):
        print(line)
    print()
    tol = TOLERANCE[args.precision]
    lines, agree = verdict(results, kind, args.precision, tol)
    target = f"targets on {kind}: engine >= {TARGET_SPEEDUP[kind]:g}× faster per coordinate than naive"
    if kind == "cuda" and args.precision == "fp32":
        target += f", per-coordinate cost <= {TARGET_COST_CUDA_FP32:g}× fwd+bwd"
    print(target)
    for line in lines:
        print("  " + line)
    if WARNINGS:
        print("warnings raised inside the engine:")
        for w in sorted(WARNINGS):
            print("  " + w[:200])
    print(f"total {time.perf_counter() - started:.0f} s")

    if args.json:
        doc = {"model": model_name, "device": str(device), "device_name": dev_name, "torch": torch.__version__,
               "transformers": transformers.__version__, "threads": torch.get_num_threads(), "load": load,
               "precision": args.precision, "batch": {k: list(v.shape) for k, v in batch.items()},
               "coords": args.coords, "repeats": args.repeats, "max_chunk": hdiag.MAX_CHUNK[kind],
               "warnings": sorted(WARNINGS), "layers": []}
        for res in results:
            d = asdict(res)
            for run in [d["engine"], *d["sweep"]]:
                if run:
                    run.pop("values", None)
            d["fwd_bwd_s"] = res.fb() if res.fb_seconds else None
            d["naive_per_coord_s"] = res.naive()
            doc["layers"].append(d)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, default=str)
        print(f"wrote {args.json}")
    if not agree:
        print("FAILED: the engine's values disagree with the naive loop")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
