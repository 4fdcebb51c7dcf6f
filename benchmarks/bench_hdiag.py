"""Exact Hessian diagonal entries, side by side: geomaudit's engine against the ways a user would get them.

On the same model, batch, parameter tensor and sampled coordinates, in one run:

* fwd+bwd  -- one loss forward and a full ``loss.backward()`` over every parameter: the unit of cost;
* engine   -- ``DiagonalEngine.diagonal`` (the audit's own path, its automatic settings);
* loop     -- the retained-graph loop: one forward, one ``create_graph`` backward for the audited tensor,
              then per coordinate i one double-backward ``grad(g[i], θ, retain_graph=True)`` through that graph
              (what PyHessian-style code does; only θ requires grad, as in the engine);
* func     -- ``torch.func`` forward-over-reverse: ``vmap(jvp(grad(loss)))`` over one-hot tangents, in chunks;
* curvlinops -- ``curvlinops.HessianLinearOperator`` (3.x) applied to one-hot columns (the ``bench`` extra);
* backpack -- BackPACK's ``DiagHessian`` (``--model mlp`` or ``cnn``: it supports Sequential models): the exact diagonal
              of every entry of every layer in one extended backward; per coordinate = its time / coordinates.

Every per-coordinate time is a multiple of fwd+bwd (lower is better), the minimum over ``--repeats`` interleaved
repeats (so load drifting on a shared machine hits every method alike; the methods take turns at going first after
the fwd+bwd, so that none always inherits the allocator state another left); the unit is the fastest fwd+bwd of the
run (it is the same pass for every layer). Every method's values are checked against
the loop's; the run exits 1 if any disagrees. Beside the times, the multiply-adds of the matrix products the engine
and the loop run for the layer (``MatmulWork``, counted once, not timed) give their ratio without the noise.

    python benchmarks/bench_hdiag.py                         # tiny GPT-2 (2x128), batch 8x64, 64 coordinates
    python benchmarks/bench_hdiag.py --model bert-mini       # BERT 4x256, batch 8x64
    python benchmarks/bench_hdiag.py --model gpt2-small --methods engine,loop   # GPT-2 small (124M), batch 8x64
    python benchmarks/bench_hdiag.py --model mlp             # Sequential MLP: + BackPACK, engine's exact backprop
    python benchmarks/bench_hdiag.py --model mlp --classes 1000   # a wide output: the engine's cost rule picks HVPs
    python benchmarks/bench_hdiag.py --model cnn             # Sequential CNN (2 conv + pooling, 32x32 inputs): + BackPACK
    python benchmarks/bench_hdiag.py --device cuda --model bert-small --precision tf32
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

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from geomaudit.engine.hdiag import DiagonalEngine, MicroBatch, only_requires_grad
from geomaudit.engine.sampling import sample_indices
from geomaudit.io.tasks import TASKS
from geomaudit.runtime import resolve_device, set_precision

METHODS = ("engine", "loop", "func", "curvlinops", "backpack")
TOLERANCE = {"fp64": 1e-9, "fp32": 1e-3, "tf32": 5e-2}  # max rel diff to the loop (see rel_diff)
FUNC_CHUNK = {"cpu": 8, "cuda": 64}


# ----------------------------------------------------------------------------- models

def build(name: str, batch: tuple[int, int] | None, device, dtype, seed: int, classes: int = 10):
    """(model, loss_fn(model, batch), batch, {parameter: role}, loss_module for curvlinops/backpack)."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        n, _ = batch or (256, 0)
        model = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, classes))
        data = {"x": torch.randn(n, 256, generator=gen), "y": torch.randint(0, classes, (n,), generator=gen)}
        params = {"0.weight": "Linear 1", "2.weight": "Linear 2", "4.weight": "Linear 3 (output)", "2.bias": "bias"}
        return (model.to(device=device, dtype=dtype).eval(), lambda m, t: nn.functional.cross_entropy(m(t["x"]), t["y"]),
                {k: v.to(device) if k == "y" else v.to(device, dtype) for k, v in data.items()}, params)
    if name == "cnn":
        n, _ = batch or (64, 0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(32 * 8 * 8, classes))
        data = {"x": torch.randn(n, 3, 32, 32, generator=gen), "y": torch.randint(0, classes, (n,), generator=gen)}
        params = {"0.weight": "convolution 1", "3.weight": "convolution 2", "3.bias": "bias",
                  "7.weight": "Linear (output)"}
        return (model.to(device=device, dtype=dtype).eval(), lambda m, t: nn.functional.cross_entropy(m(t["x"]), t["y"]),
                {k: v.to(device) if k == "y" else v.to(device, dtype) for k, v in data.items()}, params)
    if name in ("gpt2-tiny", "gpt2-small"):
        b, t = batch or (8, 64)
        config = (transformers.GPT2Config(vocab_size=1000, n_positions=max(64, t), n_embd=128, n_layer=2, n_head=4,
                                          bos_token_id=0, eos_token_id=0) if name == "gpt2-tiny"
                  else transformers.GPT2Config())  # GPT-2 small: 12 blocks × 768, vocabulary 50,257 (124M)
        model = transformers.GPT2LMHeadModel(config)
        ids = torch.randint(0, config.vocab_size, (b, t), generator=gen)
        data, task = {"input_ids": ids, "labels": ids.clone()}, "causal-lm"
        mid = config.n_layer // 2 - 1  # block 1 of 2, block 5 of 12
        params = {"transformer.h.0.attn.c_attn.weight": "attention qkv",
                  f"transformer.h.{mid}.mlp.c_fc.weight": "MLP in", f"transformer.h.{mid}.ln_1.weight": "LayerNorm",
                  "transformer.wte.weight": "word embedding (tied)"}
    elif name in ("bert-mini", "bert-small"):
        layers, hidden = (4, 256) if name == "bert-mini" else (4, 512)
        b, t = batch or ((8, 64) if name == "bert-mini" else (32, 128))
        config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                         intermediate_size=4 * hidden, max_position_embeddings=512, num_labels=2)
        model = transformers.BertForSequenceClassification(config)
        ids = torch.randint(0, config.vocab_size, (b, t), generator=gen)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                "labels": torch.randint(0, 2, (b,), generator=gen)}
        task = "classification"
        params = {"bert.encoder.layer.1.attention.self.query.weight": "attention query",
                  "bert.encoder.layer.2.intermediate.dense.weight": "MLP in",
                  "bert.encoder.layer.2.output.LayerNorm.weight": "LayerNorm",
                  "bert.embeddings.word_embeddings.weight": "word embedding"}
    else:
        raise SystemExit("--model must be mlp, cnn, gpt2-tiny, gpt2-small, bert-mini or bert-small")
    model.config._attn_implementation = "eager"  # SDPA has no double backward
    model = model.to(device=device, dtype=dtype).eval()
    return model, TASKS[task].loss, {k: v.to(device) for k, v in data.items()}, params


# ----------------------------------------------------------------------------- the methods

def engine_diag(model, loss_fn, batch, name, idx):
    engine = DiagonalEngine(model, loss_fn, [MicroBatch(batch, 1.0)], layers=[name])  # as `rmed --layers name`
    values = engine.diagonal(name, idx)
    METHOD_NOTES[name] = engine.methods[name] + (f" [{engine.chunks[name]}]" if name in engine.chunks else "")
    return values


def loop_diag(model, loss_fn, batch, name, idx):
    param = dict(model.named_parameters())[name]
    with only_requires_grad(model, param):
        (g,) = torch.autograd.grad(loss_fn(model, batch), param, create_graph=True)
        g = g.reshape(-1)
        return torch.stack([torch.autograd.grad(g[i], param, retain_graph=True)[0].reshape(-1)[i] for i in idx])


def func_diag(model, loss_fn, batch, name, idx):
    param = dict(model.named_parameters())[name]
    shape = param.shape

    def loss_of(flat):
        return loss_fn(_Swapped(model, {name: flat.reshape(shape)}), batch)

    flat = param.detach().reshape(-1)
    hvp = vmap(lambda v: jvp(grad(loss_of), (flat,), (v,))[1], chunk_size=FUNC_CHUNK[flat.device.type])
    out, block = [], _block(flat.numel())
    for start in range(0, len(idx), block):  # the one-hot tangents of a block of coordinates at a time
        sel = idx[start:start + block]
        tangents = torch.zeros(len(sel), flat.numel(), dtype=flat.dtype, device=flat.device)
        tangents[torch.arange(len(sel)), sel] = 1
        out.append(hvp(tangents)[torch.arange(len(sel)), sel])
    return torch.cat(out)


def _block(numel: int) -> int:
    """One-hot columns per call: 64, fewer for large tensors (a 30522×256 embedding's 64 columns alone are 2 GB)."""
    return max(1, min(64, (1 << 25) // numel))


class _Swapped:
    """The model called with some tensors swapped in (``functional_call``), keeping its ``config`` for the loss."""

    def __init__(self, model, tensors):
        self.model, self.tensors, self.config = model, tensors, getattr(model, "config", None)

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.tensors, args, kwargs)


class _Forward(nn.Module):
    """The model as curvlinops wants it: batch dict in, output the loss module reads out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits


class _TaskLoss(nn.Module):
    """geomaudit's task loss on (logits, labels), mean reduction (curvlinops scales per batch with it)."""

    reduction = "mean"

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, logits, labels):
        if self.causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten())


def curvlinops_diag(model, loss_fn, batch, name, idx):
    from curvlinops import HessianLinearOperator

    param = dict(model.named_parameters())[name]
    if isinstance(model, nn.Sequential):
        func, loss, data = model, nn.CrossEntropyLoss(), [(batch["x"], batch["y"])]
    else:
        func, loss = _Forward(model), _TaskLoss(causal=model.config.model_type == "gpt2")
        data = [(batch, batch["labels"])]
    with only_requires_grad(model, param):
        op = HessianLinearOperator(func, loss, [param], data, check_deterministic=False,
                                   batch_size_fn=lambda x: (x["input_ids"] if isinstance(x, dict) else x).shape[0])
        out, block = [], _block(param.numel())
        for start in range(0, len(idx), block):
            sel = idx[start:start + block]
            cols = torch.zeros(param.numel(), len(sel), dtype=param.dtype, device=param.device)
            cols[sel, torch.arange(len(sel))] = 1
            out.append((op @ cols)[sel, torch.arange(len(sel))])
    return torch.cat(out)


def backpack_model(model):
    """A copy of the model extended by BackPACK (its hooks stay on the copy), and its extended loss."""
    import copy

    from backpack import extend

    return extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())


def backpack_all(extended, batch):
    """BackPACK's DiagHessian: every entry of every parameter of a Sequential, from one extended backward."""
    from backpack import backpack
    from backpack.extensions import DiagHessian

    model, loss = extended
    model.zero_grad(set_to_none=True)
    with backpack(DiagHessian()):
        loss(model(batch["x"]), batch["y"]).backward()
    out = {n: p.diag_h.detach().reshape(-1).clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        del p.diag_h
    return out


def engine_all(model, loss_fn, batch):
    """The engine's whole diagonal of every parameter, as an audit of every layer in full computes it."""
    engine = DiagonalEngine(model, loss_fn, [MicroBatch(batch, 1.0)])
    out = {n: engine.diagonal(n, range(p.numel())) for n, p in model.named_parameters()}
    METHOD_NOTES["(all)"] = ", ".join(sorted(set(engine.methods.values())))
    return out


METHOD_NOTES: dict[str, str] = {}


# ----------------------------------------------------------------------------- measuring

def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def fwd_bwd(model, loss_fn, batch, device) -> float:
    model.zero_grad(set_to_none=True)
    _, seconds = timed(lambda: loss_fn(model, batch).backward(), device)
    model.zero_grad(set_to_none=True)
    return seconds


class MatmulWork(TorchDispatchMode):
    """Counts the multiply-adds of the matrix products (mm, addmm, bmm, baddbmm) and convolutions (forward, and each
    gradient a convolution's backward computes) run under it: the arithmetic that dominates an HVP, counted exactly
    where times on a shared machine move by a few percent."""

    def __enter__(self):
        self.macs = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name in ("mm", "addmm", "bmm", "baddbmm"):
            a, b = args[-2:]
            self.macs += a.numel() * b.shape[-1]
        elif name == "convolution":  # (input, weight, ..., transposed, ...): each output entry, one weight slice
            self.macs += (args[0] if args[6] else out).numel() * args[1][0].numel()
        elif name == "convolution_backward":  # (grad_output, input, weight, ..., transposed, ..., output_mask)
            self.macs += sum(args[10][:2]) * (args[1] if args[7] else args[0]).numel() * args[2][0].numel()
        return out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max_i |a_i - b_i| / max(|b_i|, 1e-3 max|b|): relative, entries far below the layer's scale against the scale."""
    a, b = a.double().cpu(), b.double().cpu()
    scale = float(b.abs().max())
    if not torch.isfinite(a).all():
        return math.inf
    if scale == 0.0:
        return float((a - b).abs().max())
    return float(((a - b).abs() / b.abs().clamp_min(1e-3 * scale)).max())


def available(method: str, model) -> str | None:
    """Why a method cannot run here, or None."""
    if method in ("curvlinops", "backpack"):
        try:
            __import__(method)
        except ImportError:
            return f"not installed (pip install --no-deps {'curvlinops-for-pytorch' if method == 'curvlinops' else ''}"\
                   f" backpack-for-pytorch einops einconv unfoldNd opt-einsum linear_operator)"
    if method == "backpack" and not isinstance(model, nn.Sequential):
        return "supports Sequential models only"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "fp64"))
    p.add_argument("--batch", help="BxT (or N for mlp)")
    p.add_argument("--coords", type=int, default=64)
    p.add_argument("--classes", type=int, default=10, help="output units of --model mlp or cnn")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--params", nargs="*", help="parameter names (default: four of the model's tensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the measurements here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), set_precision(args.precision)
    batch_shape = tuple(int(v) for v in args.batch.split("x")) + (0,) if args.batch else None
    model, loss_fn, batch, params = build(args.model, batch_shape[:2] if batch_shape else None, device, dtype,
                                          args.seed, args.classes)
    if args.params:
        params = {n: "" for n in args.params}
    methods = [m for m in args.methods.split(",") if m]
    skipped = {m: why for m in methods if (why := available(m, model))}
    methods = [m for m in methods if m not in skipped]
    named = dict(model.named_parameters())
    idx = {n: torch.as_tensor(sample_indices(tuple(named[n].shape), args.coords, args.seed), device=device)
           for n in params}
    per_layer = [m for m in methods if m != "backpack"]
    fns = {"engine": engine_diag, "loop": loop_diag, "func": func_diag, "curvlinops": curvlinops_diag}
    times: dict = {n: {m: [] for m in per_layer} | {"fwd+bwd": []} for n in params}
    values: dict = {n: {} for n in params}
    backpack_times: list[float] = []
    all_times: list[float] = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in params:  # warm-up: every method once on a few coordinates
            fwd_bwd(model, loss_fn, batch, device)
            for m in per_layer:
                fns[m](model, loss_fn, batch, n, idx[n][:4])
        if "backpack" in methods:
            extended = backpack_model(model)
            backpack_all(extended, batch)
            engine_all(model, loss_fn, batch)
        work = {n: {} for n in params}  # matrix-product multiply-adds of the engine and the loop, counted once
        for n in params:
            for m in [m for m in ("engine", "loop") if m in per_layer]:
                with MatmulWork() as counter:
                    fns[m](model, loss_fn, batch, n, idx[n])
                work[n][m] = counter.macs
        for r in range(args.repeats):
            for n in params:
                times[n]["fwd+bwd"].append(fwd_bwd(model, loss_fn, batch, device))
                for m in per_layer[r % len(per_layer):] + per_layer[:r % len(per_layer)]:  # each goes first in turn
                    out, s = timed(lambda: fns[m](model, loss_fn, batch, n, idx[n]), device)
                    times[n][m].append(s / len(idx[n]))
                    values[n][m] = out.detach()
            if "backpack" in methods:
                out, s = timed(lambda: backpack_all(extended, batch), device)
                backpack_times.append(s)
                for n in params:
                    values[n]["backpack"] = out[n][idx[n].cpu()].to(device)
                mine, s = timed(lambda: engine_all(model, loss_fn, batch), device)
                all_times.append(s)
                all_diff = max(rel_diff(mine[n], out[n].to(device)) for n in out)
    total_entries = sum(p.numel() for p in model.parameters())
    print(f"{args.model} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
          f"{args.precision}, torch {torch.__version__}, {torch.get_num_threads()} threads, load {load:.2f} at start; "
          f"batch {({k: tuple(v.shape) for k, v in batch.items()})}; {args.coords} coordinates per layer; "
          f"min of {args.repeats} interleaved repeats; {time.perf_counter() - started:.0f} s")
    for m, why in skipped.items():
        print(f"{m}: skipped, {why}")
    print("per-coordinate time as a multiple of one forward+backward (lower is better); rel diff: worst method "
          "against the loop")
    counted = all(len(work[n]) == 2 for n in params)
    cols = ["fwd+bwd ms", *per_layer] + (["backpack (all)"] if "backpack" in methods else []) + ["engine method",
                                                                                                 "rel diff"] \
        + (["matmul work engine/loop"] if counted else [])
    rows, ok, doc = [], True, []
    unit = min(t for n in params for t in times[n]["fwd+bwd"])  # the same pass for every layer: its fastest
    for n in params:
        fb = unit
        cells = [f"{fb * 1e3:.1f}"]
        row = {"layer": n, "role": params[n], "numel": named[n].numel(), "coords": len(idx[n]), "fwd_bwd_s": fb}
        for m in per_layer:
            row[m] = min(times[n][m]) / fb
            cells.append(f"{row[m]:.2f}×")
        if "backpack" in methods:
            row["backpack_all_entries"] = min(backpack_times) / fb
            cells.append(f"{row['backpack_all_entries']:.2f}× for {total_entries:,}")
        ref = values[n]["loop"] if "loop" in values[n] else values[n][methods[0]]
        diffs = {m: rel_diff(v, ref) for m, v in values[n].items()}
        worst = max(diffs.values())
        ok &= worst <= TOLERANCE[args.precision]
        row["method"], row["rel_diff"] = METHOD_NOTES.get(n, ""), diffs
        cells += [row["method"], f"{worst:.1e}"]
        if counted:
            row["matmul_work_engine_over_loop"] = work[n]["engine"] / work[n]["loop"]
            cells.append(f"{row['matmul_work_engine_over_loop']:.3f}")
        rows.append([n, *cells])
        doc.append(row)
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(["layer", *cols])]
    print("  ".join(h.ljust(w) if c == 0 else h.rjust(w) for c, (h, w) in enumerate(zip(["layer", *cols], widths))))
    for r in rows:
        print("  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))))
    if all_times:
        fb_all = unit
        print(f"every entry of every parameter ({total_entries:,}): engine ({METHOD_NOTES['(all)']}) "
              f"{min(all_times) / fb_all:.2f}× fwd+bwd, BackPACK DiagHessian {min(backpack_times) / fb_all:.2f}×; "
              f"rel diff {all_diff:.1e}")
        ok &= all_diff <= TOLERANCE[args.precision]
    if "loop" in per_layer and "engine" in per_layer:
        ratios = ", ".join(f"{r['engine'] / r['loop']:.3f}" for r in doc)
        slower = [f"{r['layer']} (+{r['engine'] / r['loop'] - 1:.1%})" for r in doc if r["engine"] > r["loop"]]
        print(f"engine/loop time per layer: {ratios}; " + ("at or below the loop on every layer" if not slower else
              f"above the loop on: {', '.join(slower)}"))
        if counted:
            more = [r["layer"] for r in doc if r["matmul_work_engine_over_loop"] > 1]
            print("engine/loop matrix-product work per layer: "
                  + ", ".join(f"{r['matmul_work_engine_over_loop']:.3f}" for r in doc) + "; "
                  + ("no more than the loop's on every layer" if not more else f"MORE than the loop's on: {more}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": str(device), "precision": args.precision,
                       "torch": torch.__version__, "threads": torch.get_num_threads(), "load": load,
                       "repeats": args.repeats, "layers": doc}, f, indent=2)
    if not ok:
        print(f"FAILED: values disagree beyond {TOLERANCE[args.precision]:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
