"""How the learning rates of ``geomaudit experiment`` were picked: training loss only, never R_med.

The paper (Sec. 4, App. A.1): "We tuned and chose the best (initial) learning rate of SGD+M. The (initial) learning
rate of Adam was set as a value under which Adam converged faster than SGD+M with its best learning rate." Here every
optimizer trains the experiment's model from its one initialisation on repeat 0's batch order, for each learning rate
of a grid spaced by about 3; the score is the mean training loss of the last 10% of the steps (inf if it diverged).
The baseline gets its best rate; each adaptive optimizer the best of its grid, which must beat the baseline's.

    python benchmarks/sweep_lr.py [--steps 300] [--targets real|random] [--blocks N] [--optimizers sgdm,adam]
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from geomaudit.experiment import (ExperimentConfig, batch_order, corpus, initial_model, random_targets,
                                  token_blocks, train_run, train_tokenizer)

GRIDS = {
    "sgd": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
    "sgdm": (0.01, 0.03, 0.1, 0.3, 1.0),
    "adam": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "adamw": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "amsgrad": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "rmsprop": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
    "adagrad": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--targets", choices=("real", "random"), default="real")
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--optimizers", default=",".join(GRIDS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    config = ExperimentConfig(steps=args.steps, targets=args.targets, blocks=args.blocks, seed=args.seed)
    words = corpus()
    tokenizer = train_tokenizer(words, config.vocab)
    ids = token_blocks(words, tokenizer, config.block)[:config.train_blocks]
    targets = ids if config.targets == "real" else random_targets(tuple(ids.shape), len(tokenizer), config.seed)
    order = batch_order(len(ids), config.steps, config.batch_size, config.seed, 0)
    tail = max(1, config.steps // 10)
    print(f"{args.targets} targets, {len(ids)} blocks, {config.steps} steps of {config.batch_size} blocks; "
          f"score: mean training loss of the last {tail} steps; threads {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init"
        initial_model(tokenizer, config).save_pretrained(init)
        tokenizer.save_pretrained(init)
        for name in args.optimizers.split(","):
            scores = {}
            for lr in GRIDS[name]:
                start = time.perf_counter()
                try:
                    log = train_run(init, Path(tmp) / f"{name}-{lr}", [(1, name, lr)], ids, targets, order, tokenizer,
                                    config.steps, torch.device("cpu"))
                    scores[lr] = sum(e["loss"] for e in log[-tail:]) / tail
                except Exception as err:  # a diverged run (non-finite loss) scores inf
                    scores[lr] = math.inf
                    print(f"  {name} lr {lr:g}: {err}")
                print(f"  {name} lr {lr:g}: {scores[lr]:.4f} ({time.perf_counter() - start:.1f} s)", flush=True)
            best = min(scores, key=scores.get)
            cells = ", ".join(f"{lr:g}: " + ("diverged" if s == math.inf else f"{s:.3f}" if s < 100 else f"{s:.3g}")
                              for lr, s in scores.items())
            rows.append(f"| `{name}` | {cells} | {best:g} |")
    print("\n| optimizer | score at each learning rate | best |\n|---|---|---:|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
