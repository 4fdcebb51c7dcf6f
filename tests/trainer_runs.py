"""Real Hugging Face ``Trainer`` runs of a tiny GPT-2 on CPU, for trajectory tests.

Every run starts from the same saved initialisation and sees the same sentences; only the optimizer and
the seed (batch order, dropout) differ. Adam falls clearly within a few steps; SGD with momentum, slower.
"""

import json
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "python_reference.jsonl"
OPTIMIZERS = {
    "adam": {"optim": "adamw_torch", "learning_rate": 1e-2, "weight_decay": 0.0},
    "sgd": {"optim": "sgd", "learning_rate": 1e-1, "optim_args": "momentum=0.9"},
}


class _Sentences(torch.utils.data.Dataset):
    """The example sentences tokenized to one padded length; padding is left out of the loss."""

    def __init__(self, tokenizer, max_length: int):
        texts = [json.loads(line)["text"] for line in EXAMPLES.read_text().splitlines() if line.strip()]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        self.rows = [{"input_ids": i, "attention_mask": m, "labels": y}
                     for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def train_run(out_dir: Path, optimizer: str, seed: int, model_dir: Path, steps: int = 6, save_every: int = 2) -> Path:
    """Train the model saved at ``model_dir`` for ``steps`` steps with ``optimizer`` ("adam" or "sgd").

    ``out_dir`` ends up as a Trainer output_dir: ``checkpoint-<step>/`` every ``save_every`` steps (weights,
    tokenizer, optimizer state, trainer_state.json) and, at the root, the tokenizer and trainer_state.json.
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    args = TrainingArguments(out_dir, max_steps=steps, save_steps=save_every, logging_steps=1,
                             per_device_train_batch_size=8, report_to=[], use_cpu=True, disable_tqdm=True,
                             seed=seed, **OPTIMIZERS[optimizer])
    trainer = Trainer(model=model, args=args, train_dataset=_Sentences(tokenizer, model.config.n_positions),
                      data_collator=default_data_collator, processing_class=tokenizer)
    trainer.train()
    trainer.save_state()
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
