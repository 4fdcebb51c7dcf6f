"""Shared fixtures: tiny Hugging Face checkpoints saved with real tokenizers, and real-text data files."""

import json
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "python_reference.jsonl"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models: intra-op threads only add synchronisation (and thrash on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """Every test starts with an empty result cache of its own."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("GEOMAUDIT_CACHE_DIR", str(folder))
    return folder


def example_rows() -> list[dict]:
    return [json.loads(line) for line in EXAMPLES.read_text().splitlines()]


def _bert_tokenizer():
    from transformers import BertTokenizerFast

    words = sorted({w.strip('.,;:()"').lower() for r in example_rows() for w in r["text"].split()} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words[:195]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def _gpt2_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([r["text"] for r in example_rows()], vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def save_tiny_bert(folder: Path, tokenizer) -> Path:
    """A BertForSequenceClassification (2 blocks × 16, 2 labels) with ``tokenizer``, saved in ``folder``."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2,
                        architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_gpt2(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A GPT2LMHeadModel (2 blocks × 16) initialised from ``seed``, with ``tokenizer``, saved in ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        architectures=["GPT2LMHeadModel"])
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A saved BertForSequenceClassification (2 labels) with a WordPiece tokenizer of the example text."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), _bert_tokenizer())


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A saved GPT2LMHeadModel with a byte-level BPE tokenizer trained on the example text."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), _gpt2_tokenizer())


@pytest.fixture(scope="session")
def examples_jsonl() -> Path:
    return EXAMPLES


@pytest.fixture(scope="session")
def trainer_runs(tiny_gpt2_dir, tmp_path_factory) -> dict[str, Path]:
    """Real Trainer runs from the same tiny GPT-2, 6 steps, checkpoints at 2, 4, 6: two seeds of Adam and of SGD.

    All lie in one ``runs/`` folder (``trainer_runs["adam-0"].parent``), so ``runs/adam-*`` globs the Adam runs.
    """
    from .trainer_runs import train_run

    parent = tmp_path_factory.mktemp("trainer") / "runs"
    return {f"{opt}-{seed}": train_run(parent / f"{opt}-{seed}", opt, seed, tiny_gpt2_dir)
            for opt in ("adam", "sgd") for seed in (0, 1)}


@pytest.fixture(scope="session")
def loss_runs(tiny_gpt2_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Adam saved every step for 6 steps; SGD+M every 2 steps for 16, so that the loss curves overlap."""
    from .trainer_runs import train_run

    parent = tmp_path_factory.mktemp("loss-runs")
    return (train_run(parent / "adam", "adam", 0, tiny_gpt2_dir, steps=6, save_every=1),
            train_run(parent / "sgd", "sgd", 0, tiny_gpt2_dir, steps=16, save_every=2))
