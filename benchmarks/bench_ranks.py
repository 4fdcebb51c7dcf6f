"""Wall time of one ``geomaudit rmed`` on 1 process and on N torchrun processes, and that their reports agree.

Builds a GPT-2 checkpoint (``--blocks`` × ``--width``, a byte-level BPE of the repository's example text) in a
temporary folder, then runs, interleaved ``--repeats`` times, each as a fresh command line:

* 1 process, 1 thread   (``OMP_NUM_THREADS=1``: what each torchrun process gets);
* 1 process, all threads (torch's default);
* N processes under ``torchrun --standalone --nproc-per-node N`` (gloo), for each N in ``--ranks``.

Times are whole commands (start-up, loading, audit, writing), the fastest of the repeats. The 1-thread report must
equal every N-process report but for timings (exit 1 otherwise).

    python benchmarks/bench_ranks.py                      # 2x128 GPT-2, batch 8x64, 64 coordinates, 1 and 2 ranks
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(folder: Path, blocks: int, width: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(ROOT))
    from tests.conftest import _gpt2_tokenizer

    tok = _gpt2_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_embd=width, n_layer=blocks, n_head=4, n_positions=128,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, architectures=["GPT2LMHeadModel"])
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def timed_run(label: str, command: list[str], env: dict, out: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(command + ["--json", str(out)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{label} failed:\n{done.stderr[-2000:]}")
    return seconds


def comparable(path: Path) -> dict:
    doc = json.loads(path.read_text())
    doc.pop("created")
    doc["environment"].pop("ranks")
    for ckpt in doc["checkpoints"]:
        for layer in ckpt["layers"]:
            layer.pop("seconds")
    return doc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--coords", type=int, default=64)
    p.add_argument("--ranks", default="2")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp / "ckpt", args.blocks, args.width)
        audit = ["-m", "geomaudit", "rmed", str(tmp / "ckpt"), "--coords", str(args.coords), "--batch-size", "8",
                 "--max-length", "64", "--no-cache"]
        base = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        runs = {"1 process, 1 thread": ([sys.executable, *audit], base | {"OMP_NUM_THREADS": "1"}),
                "1 process, default threads": ([sys.executable, *audit], {k: v for k, v in base.items()
                                                                           if k != "OMP_NUM_THREADS"})}
        for n in map(int, args.ranks.split(",")):
            runs[f"{n} processes (torchrun, gloo)"] = (
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *audit],
                base | {"OMP_NUM_THREADS": "1"})
        seconds = {label: [] for label in runs}
        for _ in range(args.repeats):
            for i, (label, (command, env)) in enumerate(runs.items()):
                seconds[label].append(timed_run(label, command, env, tmp / f"{i}.json"))
        reference = comparable(tmp / "0.json")
        same = {label: comparable(tmp / f"{i}.json") == reference for i, label in enumerate(runs) if "torchrun" in label}
        layers = len(reference["checkpoints"][0]["layers"])
    one = min(seconds["1 process, 1 thread"])
    print(f"geomaudit rmed, GPT-2 {args.blocks}x{args.width}, {layers} tensors x {args.coords} coordinates, batch 8x64, "
          f"CPU ({os.cpu_count()} cores), fastest of {args.repeats}; load {os.getloadavg()[0]:.2f} at the end")
    print(f"{'run':32} {'wall s':>8} {'speed-up':>9}  report")
    for label, values in seconds.items():
        verdict = ("= 1 thread" if same[label] else "DIFFERS") if label in same else ""
        print(f"{label:32} {min(values):8.1f} {one / min(values):8.2f}×  {verdict}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
