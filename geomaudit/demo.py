"""The embedded experiment (SPEC §5): Adam and SGD+momentum from one initialisation on real English text.

The corpus is the Python reference manual that ships with CPython (``pydoc_data.topics``, ~65k words), or any
text file. A byte-level BPE is trained on it, a small ``GPT2LMHeadModel`` is initialised once, and two runs
train from that initialisation on the same batches in the same order, saving Trainer-style ``checkpoint-<step>/``
directories (weights, tokenizer, ``optimizer.pt`` in the Trainer's parameter-group order, ``trainer_state.json``).
Those runs are ordinary inputs for every other command.
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .io.optimizer import trainer_parameter_order


@dataclass(frozen=True)
class DemoConfig:
    """The demo's model and training settings (the README gives the reasons for the learning rates)."""

    steps: int = 300
    save_every: int = 50
    batch_size: int = 16
    block: int = 64
    vocab: int = 1024
    width: int = 64
    depth: int = 2
    heads: int = 4
    adam_lr: float = 3e-3
    sgd_lr: float = 0.1
    momentum: float = 0.9
    seed: int = 0


def corpus(text_file: str | None = None) -> str:
    """The demo's text: a file's, or the reference-manual topics of ``pydoc_data`` in a fixed order."""
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


def initial_model(tokenizer, config: DemoConfig):
    """The one initialisation both runs start from (eager attention, no dropout: the geometry of the loss
    itself, not of a random mask)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    gpt2 = GPT2Config(vocab_size=len(tokenizer), n_positions=config.block, n_embd=config.width,
                      n_layer=config.depth, n_head=config.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                      architectures=["GPT2LMHeadModel"])
    gpt2._attn_implementation = "eager"
    return GPT2LMHeadModel(gpt2)


def train_run(init_dir: Path, out_dir: Path, optimizer: str, blocks: torch.Tensor, tokenizer, config: DemoConfig,
              device: torch.device, on_step: Callable[[int, float], None] | None = None) -> list[dict]:
    """Train from ``init_dir`` with ``adam`` or ``sgd`` (+ momentum); checkpoints every ``save_every`` steps."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(init_dir, attn_implementation="eager").to(device).train()
    named = dict(model.named_parameters())
    groups = [{"params": [named[n] for n in names]} for names in trainer_parameter_order(model)]
    if optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=config.adam_lr)
    else:
        opt = torch.optim.SGD(groups, lr=config.sgd_lr, momentum=config.momentum)
    order = torch.Generator().manual_seed(config.seed)  # the same batches, in the same order, for both runs
    log = []
    for step in range(1, config.steps + 1):
        batch = blocks[torch.randint(len(blocks), (config.batch_size,), generator=order)].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"the {optimizer} run diverged at step {step} (loss {loss.item()})")
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append({"step": step, "loss": loss.item()})
        if on_step:
            on_step(step, loss.item())
        if step % config.save_every == 0 or step == config.steps:
            folder = out_dir / f"checkpoint-{step}"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            torch.save(opt.state_dict(), folder / "optimizer.pt")
            _write_state(folder, step, log)
    _write_state(out_dir, config.steps, log)
    return log


def _write_state(folder: Path, step: int, log: list[dict]) -> None:
    state = {"global_step": step, "log_history": log}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
