"""Loading Hugging Face checkpoints: the task's loss equals transformers' own, in every precision it can."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from geomaudit.io.tasks import IGNORE_INDEX, TASKS, infer_task
from geomaudit.errors import UsageError


def _ids(gen, vocab, shape):
    return torch.randint(5, vocab, shape, generator=gen)


@pytest.mark.parametrize("problem", [None, "regression", "multi_label_classification"])
def test_classification_loss_matches_transformers(problem):
    gen = torch.Generator().manual_seed(0)
    num_labels = 1 if problem == "regression" else 3
    config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, num_labels=num_labels, problem_type=problem)
    model = BertForSequenceClassification(config).eval()
    ids = _ids(gen, 40, (5, 7))
    if problem == "regression":
        labels = torch.randn(5, generator=gen)
    elif problem == "multi_label_classification":
        labels = (torch.rand(5, 3, generator=gen) > 0.5).float()
    else:
        labels = torch.tensor([0, 2, 1, 1, 0])
    batch = {"input_ids": ids, "labels": labels}
    assert TASKS["classification"].loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)


def test_language_model_losses_match_transformers():
    gen = torch.Generator().manual_seed(1)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)).eval()
    ids = _ids(gen, 50, (3, 9))
    labels = ids.clone()
    labels[0, 6:] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels}
    assert TASKS["causal-lm"].loss(gpt2, batch).item() == pytest.approx(gpt2(**batch).loss.item(), rel=1e-6)

    bert = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=16)).eval()
    ids = _ids(gen, 40, (3, 9))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 2] = ids[:, 2]
    batch = {"input_ids": ids, "labels": labels}
    assert TASKS["masked-lm"].loss(bert, batch).item() == pytest.approx(bert(**batch).loss.item(), rel=1e-6)


def test_fp64_loss_is_computed_in_fp64():
    """transformers' loss casts logits to fp32; ours keeps the audit precision."""
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).double().eval()
    ids = _ids(torch.Generator().manual_seed(2), 50, (2, 9))
    loss = TASKS["causal-lm"].loss(model, {"input_ids": ids, "labels": ids})
    logits = model(input_ids=ids).logits
    exact = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    assert loss.dtype == torch.float64 and abs(loss.item() - exact.item()) < 1e-13


@pytest.mark.parametrize("arch,labels,task", [
    ("GPT2LMHeadModel", False, "causal-lm"), ("LlamaForCausalLM", True, "causal-lm"),
    ("BertForMaskedLM", False, "masked-lm"), ("BertForSequenceClassification", False, "classification"),
    ("BertModel", True, "classification"),
])
def test_infer_task(arch, labels, task):
    assert infer_task(arch, labels).name == task


def test_headless_model_without_labels_asks_for_a_task():
    with pytest.raises(UsageError, match="has no loss head"):
        infer_task("BertModel", False)


def test_load_checkpoint_refuses_what_is_not_a_checkpoint(tmp_path):
    """The library entry point checks its path itself (the command line finds runs first)."""
    from geomaudit.errors import InputError
    from geomaudit.io.checkpoints import load_checkpoint

    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(InputError, match="has no config.json"):
        load_checkpoint(tmp_path)
