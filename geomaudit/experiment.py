"""The paper's protocol on this machine (Sec. 4, App. A.1–A.4; SPEC §5): repeats from one initialisation.

A small ``GPT2LMHeadModel`` is initialised once. Each optimizer trains ``repeats`` runs from that
initialisation that differ only in the order of the batches; repeat r of every optimizer sees the same
batches in the same order, so run r of one optimizer and run r of another form a pair (``compare --paired``).
The text is the Python reference manual that ships with CPython (``pydoc_data.topics``, ~65k words) or any
file, tokenized by a byte-level BPE trained on it and cut into blocks. With ``targets="random"`` every
position's target token is drawn once from a seeded generator and kept (Sec. 4.2): the model must memorise.
Runs are saved as Trainer-style ``checkpoint-<step>/`` directories (weights, tokenizer, ``optimizer.pt`` in the
Trainer's parameter-group order, ``trainer_state.json``), so they are ordinary inputs for every other command.
The runs are then compared per layer with the baseline (SGD+M or SGD) at equal steps and at matched loss.
"""

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .errors import InputError, UsageError
from .io.optimizer import trainer_parameter_order
from .pipeline import AuditConfig, CompareConfig, Progress, run_compare


def _groups(groups: list[list[torch.Tensor]], **decay) -> list[dict]:
    """The Trainer's two parameter groups (weights, then biases and norms); ``weight_decay`` on the first only."""
    return [{"params": groups[0], **decay}, {"params": groups[1], **({"weight_decay": 0.0} if decay else {})}]


@dataclass(frozen=True)
class Optimizer:
    """One optimizer of the protocol: its name in ratios, learning rate and the other settings (as the paper's)."""

    tag: str  # as in the paper's R^{tag}_med
    lr: float  # real targets
    lr_random: float  # random targets
    adaptive: bool
    settings: str
    build: Callable[[list[list[torch.Tensor]], float], torch.optim.Optimizer] = field(repr=False)


BETAS = (0.9, 0.98)  # the paper's Adam and AMSGrad momentum parameters on its language-model tasks (Sec. 4.1, A.2)
# Learning rates, real and random targets: the best of a grid for 300 steps of this model, by training loss
# (benchmarks/sweep_lr.py; the README has the grid and the scores)
OPTIMIZERS = {
    "sgd": Optimizer("SGD", 0.3, 3.0, False, "no momentum (App. A.1, A.4)",
                     lambda g, lr: torch.optim.SGD(_groups(g), lr=lr)),
    "sgdm": Optimizer("SGDM", 0.1, 0.3, False, "momentum 0.9 (Sec. 4.1)",
                      lambda g, lr: torch.optim.SGD(_groups(g), lr=lr, momentum=0.9)),
    "adam": Optimizer("Adam", 1e-3, 3e-3, True, "betas (0.9, 0.98) (Sec. 4.1)",
                      lambda g, lr: torch.optim.Adam(_groups(g), lr=lr, betas=BETAS)),
    "adamw": Optimizer("AdamW", 1e-3, 3e-3, True, "betas (0.9, 0.98), weight decay 0.01 on weights, not on biases "
                       "and norms (the Trainer's groups)",
                       lambda g, lr: torch.optim.AdamW(_groups(g, weight_decay=0.01), lr=lr, betas=BETAS)),
    "amsgrad": Optimizer("AMSGrad", 3e-3, 3e-3, True, "betas (0.9, 0.98) (App. A.2)",
                         lambda g, lr: torch.optim.Adam(_groups(g), lr=lr, betas=BETAS, amsgrad=True)),
    "rmsprop": Optimizer("RMSprop", 1e-4, 1e-4, True, "momentum 0.9, alpha 0.99 (App. A.2)",
                         lambda g, lr: torch.optim.RMSprop(_groups(g), lr=lr, momentum=0.9)),
    "adagrad": Optimizer("Adagrad", 3e-2, 1e-2, True, "no momentum (App. A.1)",
                         lambda g, lr: torch.optim.Adagrad(_groups(g), lr=lr)),
}
BASELINES = ("sgdm", "sgd")
RANDOM_BLOCKS = 256
TARGETS = ("real", "random")


@dataclass(frozen=True)
class ExperimentConfig:
    """The protocol's settings; the defaults are ``geomaudit demo``'s (the README says how they were picked)."""

    optimizers: tuple[str, ...] = ("adam", "sgdm")
    repeats: int = 4
    steps: int = 300
    targets: str = "real"
    switch_at: int | None = None  # App. A.4: a run of the baseline that switches to the first adaptive optimizer
    blocks: int | None = None  # train on the first N blocks of the text (default: all)
    text: str | None = None
    coords: int = 12
    layers: tuple[str, ...] = ()  # globs of the layers audited (default: every layer)
    seed: int = 0
    device: str = "auto"
    saves: int = 10  # checkpoints per run, evenly spaced
    batch_size: int = 16
    block: int = 64
    vocab: int = 1024
    width: int = 64
    depth: int = 2
    heads: int = 4

    def validate(self) -> None:
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown:
            raise UsageError(f"--optimizers: unknown {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise UsageError(f"--optimizers names one twice: {','.join(self.optimizers)}")
        base = [o for o in self.optimizers if o in BASELINES]
        if len(base) != 1 or len(self.optimizers) < 2:
            raise UsageError("--optimizers needs exactly one baseline (sgdm or sgd), which every other optimizer is "
                             f"compared with, and at least one other; got {','.join(self.optimizers)}")
        for name in ("repeats", "coords", "saves", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps < 2:
            raise UsageError(f"--steps must be at least 2, got {self.steps}")
        if self.targets not in TARGETS:
            raise UsageError(f"--targets must be real or random, got {self.targets!r}")
        if self.switch_at is not None and not 1 <= self.switch_at < self.steps:
            raise UsageError(f"--switch-at must be a step from 1 to {self.steps - 1}, got {self.switch_at}")
        if self.blocks is not None and self.blocks < self.batch_size:
            raise UsageError(f"--blocks must be at least the batch of {self.batch_size} blocks, got {self.blocks}")

    @property
    def baseline(self) -> str:
        return next(o for o in self.optimizers if o in BASELINES)

    @property
    def adaptive(self) -> list[str]:
        return [o for o in self.optimizers if o not in BASELINES]

    @property
    def save_every(self) -> int:
        return max(1, self.steps // self.saves)

    @property
    def train_blocks(self) -> int | None:
        """``blocks``, or by default every block for real targets and 256 for random ones: memorising needs every
        target seen many times (300 steps of 16 blocks are 19 epochs of 256), as the paper's 60 epochs did."""
        return self.blocks if self.blocks is not None or self.targets == "real" else RANDOM_BLOCKS

    def lr(self, optimizer: str) -> float:
        return OPTIMIZERS[optimizer].lr if self.targets == "real" else OPTIMIZERS[optimizer].lr_random

    def schedules(self) -> dict[str, list[tuple[int, str, float]]]:
        """Run families: name → [(first step, optimizer, learning rate), …]; the adaptive optimizers, the baseline,
        then the switched run if any."""
        runs = {o: [(1, o)] for o in (*self.adaptive, self.baseline)}
        if self.switch_at is not None:
            runs[self.switched] = [(1, self.baseline), (self.switch_at + 1, self.adaptive[0])]
        return {family: [(step, o, self.lr(o)) for step, o in s] for family, s in runs.items()}

    @property
    def switched(self) -> str:
        return f"{self.baseline}-to-{self.adaptive[0]}"

    def tag(self, family: str) -> str:
        return "→".join(OPTIMIZERS[o].tag for _, o, _ in self.schedules()[family])

    def comparisons(self) -> list[tuple[str, str]]:
        """(A, B) families, ratio R_B / R_A: the baseline against each adaptive optimizer, as the paper's ratio
        R_SGDM / R_Adam; with a switch, the baseline against the switched run and the switched run against the
        adaptive optimizer it switched to (App. A.4: does the gap close?)."""
        pairs = [(o, self.baseline) for o in self.adaptive]
        if self.switch_at is not None:
            pairs += [(self.switched, self.baseline), (self.adaptive[0], self.switched)]
        return pairs

    def describe(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("device",)}
        d["optimizers"] = {o: {"tag": OPTIMIZERS[o].tag, "lr": self.lr(o), "settings": OPTIMIZERS[o].settings}
                           for o in self.optimizers}
        return d


def derived_seed(seed: int, *parts) -> int:
    """A seed for one purpose (``"order", 3``; ``"targets"``) derived from the experiment's seed."""
    digest = hashlib.sha256("/".join(map(str, ("geomaudit", seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def corpus(text_file: str | None = None) -> str:
    """The text: a file's, or the reference-manual topics of ``pydoc_data`` in a fixed order."""
    if text_file:
        return Path(text_file).read_text(encoding="utf-8")
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def train_tokenizer(text: str, vocab: int):
    """A byte-level BPE trained on ``text``, wrapped as a transformers fast tokenizer with ``<|endoftext|>``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text.splitlines(), vocab_size=vocab, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def token_blocks(text: str, tokenizer, block: int) -> torch.Tensor:
    """The whole text as consecutive blocks of ``block`` token ids (the tail is dropped)."""
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


def random_targets(shape: tuple[int, ...], vocab: int, seed: int) -> torch.Tensor:
    """Sec. 4.2: a target token for every position, uniform over the vocabulary, drawn once from a generator
    seeded by ``seed`` alone, so every optimizer and every repeat learns the same targets."""
    return torch.randint(vocab, shape, generator=torch.Generator().manual_seed(derived_seed(seed, "targets")))


def batch_order(blocks: int, steps: int, batch_size: int, seed: int, repeat: int) -> torch.Tensor:
    """(steps, batch_size) block indices: epochs of a seeded permutation (every block once per epoch). The
    generator depends on the seed and the repeat only: what makes repeats differ, and all optimizers of one
    repeat see the same batches in the same order."""
    gen = torch.Generator().manual_seed(derived_seed(seed, "order", repeat))
    need = steps * batch_size
    order = torch.cat([torch.randperm(blocks, generator=gen) for _ in range(math.ceil(need / blocks))])
    return order[:need].view(steps, batch_size)


def initial_model(tokenizer, config: ExperimentConfig):
    """The one initialisation every run starts from (eager attention, no dropout: the geometry of the loss
    itself, not of a random mask)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    gpt2 = GPT2Config(vocab_size=len(tokenizer), n_positions=config.block, n_embd=config.width,
                      n_layer=config.depth, n_head=config.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                      architectures=["GPT2LMHeadModel"])
    gpt2._attn_implementation = "eager"
    return GPT2LMHeadModel(gpt2)


def train_run(init_dir: Path, out_dir: Path, schedule: Sequence[tuple[int, str, float]], ids: torch.Tensor,
              targets: torch.Tensor, order: torch.Tensor, tokenizer, save_every: int, device: torch.device,
              on_step: Callable[[int, float], None] | None = None) -> list[dict]:
    """Train from ``init_dir`` on the batches ``order`` picks from ``ids`` (inputs) and ``targets`` (labels),
    with the optimizers of ``schedule`` ([(first step, name, learning rate), …]; the learning rate is constant, as
    in the paper's translation task); a checkpoint every ``save_every`` steps."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(init_dir, attn_implementation="eager").to(device).train()
    named = dict(model.named_parameters())
    groups = [[named[n] for n in names] for names in trainer_parameter_order(model)]
    starts, steps = {step: (name, lr) for step, name, lr in schedule}, len(order)
    log, opt, name, lr = [], None, None, None
    for step in range(1, steps + 1):
        if step in starts:
            name, lr = starts[step]
            opt = OPTIMIZERS[name].build(groups, lr)
        batch = order[step - 1]
        loss = model(input_ids=ids[batch].to(device), labels=targets[batch].to(device)).loss
        if not math.isfinite(loss.item()):
            raise InputError(f"the {name} run {out_dir.name} diverged at step {step} (loss {loss.item()})")
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append({"step": step, "loss": loss.item(), "learning_rate": lr,
                    "epoch": round(step * len(batch) / len(ids), 4)})
        if on_step:
            on_step(step, loss.item())
        if step % save_every == 0 or step == steps:
            folder = out_dir / f"checkpoint-{step}"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            torch.save(opt.state_dict(), folder / "optimizer.pt")
            _write_state(folder, step, log)
    _write_state(out_dir, steps, log)
    tokenizer.save_pretrained(out_dir)
    return log


def _write_state(folder: Path, step: int, log: list[dict]) -> None:
    state = {"global_step": step, "log_history": log}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")


def compare_steps(config: ExperimentConfig) -> tuple[int, ...]:
    """The equal-step columns, as the paper's tables have them: the saved step halfway through, and the end."""
    saved = sorted({*range(config.save_every, config.steps + 1, config.save_every), config.steps})
    return tuple(sorted({saved[(len(saved) - 1) // 2], saved[-1]}))


def run_experiment(folder: Path, config: ExperimentConfig, progress: Progress | None = None) -> dict:
    """Train every run, compare each pair of families at equal steps and at matched loss, write the reports.

    Returns ``{"documents": {file stem: compare report}, "comparisons": [(A, B, stem), …], "logs": {run: log},
    "seconds": {"training": …, "audit": …}}``; the reports are also written to ``folder/<stem>.json``.
    """
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    from .report.document import write_json
    from .runtime import resolve_device

    config.validate()
    progress = progress or Progress()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = resolve_device(config.device)
    start = time.perf_counter()
    words = corpus(config.text)
    progress.status(f"training a byte-level BPE ({config.vocab} tokens) on "
                    f"{config.text or 'the Python reference manual'}")
    tokenizer = train_tokenizer(words, config.vocab)
    ids = token_blocks(words, tokenizer, config.block)
    if len(ids) < 2 * config.batch_size:
        raise InputError(f"the text gives only {len(ids)} blocks of {config.block} tokens: too short to train on")
    if config.train_blocks is not None and len(ids) < config.train_blocks:
        raise InputError(f"--blocks {config.train_blocks}: the text gives only {len(ids)} blocks of {config.block} "
                         "tokens")
    ids = ids[:config.train_blocks]
    targets = ids if config.targets == "real" else random_targets(tuple(ids.shape), len(tokenizer), config.seed)
    folder.mkdir(parents=True, exist_ok=True)
    audit_rows = torch.randperm(len(ids), generator=torch.Generator().manual_seed(derived_seed(config.seed, "audit")))
    audit_rows = audit_rows[:config.batch_size]  # a batch of training blocks, with their targets
    save_file({"input_ids": ids[audit_rows].contiguous(), "labels": targets[audit_rows].contiguous()},
              folder / "audit-batch.safetensors")
    init = folder / "init"
    initial_model(tokenizer, config).save_pretrained(init)
    tokenizer.save_pretrained(init)

    logs, runs = {}, {}
    schedules = config.schedules()
    total = config.repeats * len(schedules)
    for repeat in range(config.repeats):
        order = batch_order(len(ids), config.steps, config.batch_size, config.seed, repeat)
        for family, schedule in schedules.items():
            name = f"{family}-{repeat}"
            if progress.on_layer:
                progress.on_layer(len(logs) + 1, total, f"training {name} on {device}", config.steps)
            logs[name] = train_run(init, folder / name, schedule, ids, targets, order, tokenizer, config.save_every,
                                   device, on_step=lambda step, loss: progress.on_chunk and progress.on_chunk(1))
            runs.setdefault(family, []).append(str(folder / name))
    trained = time.perf_counter()

    audit = AuditConfig(runs[config.baseline][0], str(folder / "audit-batch.safetensors"), coords=config.coords,
                        layers=config.layers, batch_size=config.batch_size, seed=config.seed, device=config.device,
                        cache_dir=str(folder / "cache"))
    described = config.describe() | {
        "blocks_trained": len(ids), "seconds_training": round(trained - start, 1),
        "runs": [{"run": str(folder / n), "family": n.rsplit("-", 1)[0], "repeat": int(n.rsplit("-", 1)[1]),
                  "final_loss": log[-1]["loss"]} for n, log in logs.items()]}
    documents, comparisons = {}, []
    for a, b in config.comparisons():
        for mode in ("steps", "loss"):
            stem = f"compare-{a}-{mode}" if b == config.baseline else f"compare-{a}-vs-{b}-{mode}"
            settings = replace(audit, steps=compare_steps(config)) if mode == "steps" else audit
            spec = CompareConfig(tuple(runs[a]), tuple(runs[b]), match_loss=mode == "loss", paired=True)
            try:
                document = run_compare(settings, spec, progress)
            except InputError as err:  # no matched loss within the tolerance: say so, keep the rest
                progress.status(f"no {mode} comparison of {a} and {b}: {err}")
                continue
            document["experiment"] = described | {"compared": {"a": a, "b": b, "ratio": ratio_name(config, a, b)}}
            write_json(document, folder / f"{stem}.json")
            documents[stem] = document
            comparisons.append((a, b, stem))
    return {"documents": documents, "comparisons": comparisons, "logs": logs,
            "seconds": {"training": trained - start, "audit": time.perf_counter() - trained}}


def ratio_name(config: ExperimentConfig, a: str, b: str) -> str:
    """``R_SGDM/R_Adam`` for B = sgdm, A = adam, as the paper writes the ratio."""
    return f"R_{config.tag(b)}/R_{config.tag(a)}"
