"""Coverage and width of the per-layer R_med interval (geomaudit.engine.interval), measured by simulation.

For layers whose full diagonal is known — synthetic ones, and every H_ii of five tensors of a tiny GPT-2 (width
32, 2 blocks, random tokens, computed exactly by the engine) — draw n coordinates many times, as audits with other
seeds would, and count how often the interval holds θ_n (the median over draws of the largest sampled |H_ii|, over
the layer's median |H_ii|, computed exactly). Also the naive percentile bootstrap, for contrast.

    python benchmarks/interval_coverage.py [--draws 2000]
"""

import argparse
import math

import numpy as np
import torch
import transformers
from scipy.special import gammaln

from geomaudit.engine.hdiag import DiagonalEngine, MicroBatch
from geomaudit.engine.interval import CONFIDENCE, r_med_interval
from geomaudit.io.tasks import TASKS


def estimand(diagonal: np.ndarray, n: int) -> float:
    a = np.sort(np.abs(diagonal))
    j = np.arange(n, len(a) + 1)
    log_cdf = gammaln(j + 1) - gammaln(j - n + 1) - gammaln(len(a) + 1) + gammaln(len(a) - n + 1)
    return float(a[j[np.argmax(log_cdf >= math.log(0.5))] - 1] / np.median(a))


def naive(sample: np.ndarray, rng) -> tuple[float, float]:
    boot = rng.choice(sample, size=(300, len(sample)))
    return tuple(np.percentile(boot.max(axis=1) / np.median(boot, axis=1), [2.5, 97.5]))


def real_layers() -> dict[str, np.ndarray]:
    config = transformers.GPT2Config(vocab_size=200, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 200, (8, 32), generator=torch.Generator().manual_seed(0))
    engine = DiagonalEngine(model, TASKS["causal-lm"].loss, [MicroBatch({"input_ids": ids, "labels": ids}, 1.0)],
                            chunk_size=64)
    params = dict(model.named_parameters())
    names = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_proj.weight",
             "transformer.h.1.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.weight"]
    out = {}
    for name in names:
        h = engine.diagonal(name, np.arange(params[name].numel())).double().numpy()
        out[f"GPT-2 {name.removeprefix('transformer.')}"] = h[h != 0]  # rows of tokens absent from the batch
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    layers = {"Pareto(3) |H_ii|, N = 1e5": rng.pareto(3.0, 100_000) + 1,
              "log-normal σ = 1.5, N = 1e5": np.exp(rng.normal(0, 1.5, 100_000)),
              "half-normal, N = 1e5": np.abs(rng.normal(size=100_000))} | real_layers()
    print(f"| layer | N | n | coverage ({CONFIDENCE:.0%} stated) | median width (high/low) | naive bootstrap |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, diagonal in layers.items():
        for n in (50, 200):
            theta = estimand(diagonal, n)
            hits, naive_hits, widths = 0, 0, []
            for _ in range(args.draws):
                sample = rng.choice(diagonal, n, replace=False)
                low, high = r_med_interval(sample)
                hits += low <= theta <= high
                widths.append(high / low)
                if _ < 300:
                    nl, nh = naive(sample, rng)
                    naive_hits += nl <= theta <= nh
            print(f"| {name} | {len(diagonal)} | {n} | {hits / args.draws:.3f} | ×{np.median(widths):.1f} | "
                  f"{naive_hits / min(300, args.draws):.2f} |")


if __name__ == "__main__":
    main()
