"""Does the engine's cost rule pick the faster of its two exact methods? Both timed, side by side.

For a Sequential MLP or CNN the engine chooses, before any Hessian work, between the Hessian backpropagation
(``hessian-backprop``) and one HVP per coordinate (``backprop._cheaper``, multiply-adds from the layers' shapes). This
runs both on a grid — the lowest layer alone, a middle layer alone, every tensor; 16, 64 or 200 coordinates; 10, 100
or 1,000 classes — the recursion forced (``_cheaper`` answering yes) and the HVPs forced (``backprop=False``), fastest
of 2 interleaved, and says for each case whether the engine's own choice was the faster one.

    python benchmarks/bench_cost_rule.py --model mlp     # 256-512 (Tanh)-512 (ReLU)-C, batch 256
    python benchmarks/bench_cost_rule.py --model cnn     # 2 conv + max-pool, 32x32 inputs, batch 64
"""

import argparse
import time

import torch
from bench_hdiag import build  # the same MLP and CNN, batches and seeds as the side-by-side benchmark

from geomaudit.engine import backprop
from geomaudit.engine.hdiag import DiagonalEngine, MicroBatch


def seconds(model, loss, batch, layers, coords, recursion: bool) -> float:
    sizes = dict(model.named_parameters())
    saved = backprop._cheaper
    if recursion:
        backprop._cheaper = lambda *args: True
    try:
        start = time.perf_counter()
        engine = DiagonalEngine(model, loss, [MicroBatch(batch, 1.0)], backprop=recursion, layers=layers)
        for name in layers:
            engine.diagonal(name, range(min(coords, sizes[name].numel())))
        return time.perf_counter() - start
    finally:
        backprop._cheaper = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    args = p.parse_args()
    right = 0
    cases = 0
    for classes in args.classes:
        model, loss, batch, params = build(args.model, None, torch.device("cpu"), torch.float32, 0, classes)
        low, mid = list(params)[:2]  # the first layer's weight, and one further up
        every = [n for n, _ in model.named_parameters()]
        for layers in ([low], [mid], every):
            for coords in (16, 64, 200) if layers is every else (16, 64):
                engine = DiagonalEngine(model, loss, [MicroBatch(batch, 1.0)], layers=layers)
                engine.diagonal(layers[0], range(min(coords, model.get_parameter(layers[0]).numel())))
                picks = engine.methods[layers[0]] == "hessian-backprop"
                times = {True: float("inf"), False: float("inf")}
                for recursion in (True, False) * 2:
                    times[recursion] = min(times[recursion], seconds(model, loss, batch, layers, coords, recursion))
                ok = (times[True] <= times[False]) == picks
                right, cases = right + ok, cases + 1
                lost = "" if ok else f", lost {max(times.values()) / min(times.values()):.2f}x"
                print(f"{args.model} {classes:5d} classes, {'every tensor' if layers is every else layers[0]:>12}, "
                      f"{coords:3d} coords: recursion {times[True]:7.3f} s, HVPs {times[False]:7.3f} s; "
                      f"picks {'recursion' if picks else 'HVPs'}: {'right' if ok else 'WRONG'}{lost}", flush=True)
    print(f"{args.model}: the faster method picked in {right} of {cases} cases")


if __name__ == "__main__":
    main()
