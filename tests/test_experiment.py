"""geomaudit.experiment: one initialisation, repeats that differ only in the batch order, random targets, the switch."""

import json

import pytest
import torch
from safetensors.torch import load_file

from geomaudit.errors import InputError, UsageError
from geomaudit.experiment import (OPTIMIZERS, ExperimentConfig, batch_order, compare_steps, initial_model,
                                  random_targets, train_run, train_tokenizer)

TEXT = " ".join(f"The {w} of the reference manual is number {i}." for i, w in enumerate(
    ["grammar", "lexer", "parser", "statement", "expression", "operator", "module", "class"] * 40))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer, 40 blocks of 16 tokens, random targets and the one initialisation, saved."""
    folder = tmp_path_factory.mktemp("experiment")
    config = ExperimentConfig(block=16, vocab=300, width=16, depth=1, heads=2, batch_size=4, seed=3)
    tokenizer = train_tokenizer(TEXT, config.vocab)
    ids = torch.tensor(tokenizer(TEXT)["input_ids"][:40 * 16]).view(40, 16)
    targets = random_targets(tuple(ids.shape), len(tokenizer), config.seed)
    initial_model(tokenizer, config).save_pretrained(folder / "init")
    tokenizer.save_pretrained(folder / "init")
    return folder, config, tokenizer, ids, targets


def test_random_targets_are_drawn_once_per_position_from_the_seed():
    a, b = random_targets((40, 16), 300, 3), random_targets((40, 16), 300, 3)
    assert torch.equal(a, b) and a.shape == (40, 16) and a.dtype == torch.int64
    assert 0 <= int(a.min()) and int(a.max()) < 300 and len(a.unique()) > 250  # uniform over the vocabulary
    assert not torch.equal(a, random_targets((40, 16), 300, 4))


def test_batch_orders_are_epochs_that_differ_between_repeats_only():
    order = batch_order(10, 7, 4, seed=0, repeat=0)  # 28 draws: two whole epochs, then 8 of a third
    assert order.shape == (7, 4)
    flat = order.flatten().tolist()
    assert sorted(flat[:10]) == sorted(flat[10:20]) == list(range(10)) and len(set(flat[20:])) == 8
    assert torch.equal(order, batch_order(10, 7, 4, seed=0, repeat=0))
    assert not torch.equal(order, batch_order(10, 7, 4, seed=0, repeat=1))
    assert not torch.equal(order, batch_order(10, 7, 4, seed=1, repeat=0))


def test_runs_share_the_initialisation_bit_for_bit_and_differ_in_batch_order(setup):
    """Every run's first logged loss is the initial model's loss on its first batch with the kept targets, to the
    bit: the same weights, batches and targets. Repeats see other batches; optimizers of a repeat the same."""
    from transformers import GPT2LMHeadModel

    folder, config, tokenizer, ids, targets = setup
    init = GPT2LMHeadModel.from_pretrained(folder / "init", attn_implementation="eager").train()
    logs, orders = {}, {}
    for repeat in (0, 1):
        orders[repeat] = batch_order(len(ids), 4, config.batch_size, config.seed, repeat)
        for opt in ("adam", "sgdm"):
            schedule = [(1, opt, OPTIMIZERS[opt].lr)]
            logs[opt, repeat] = train_run(folder / "init", folder / f"{opt}-{repeat}", schedule, ids, targets,
                                          orders[repeat], tokenizer, 2, torch.device("cpu"))
    for (opt, repeat), log in logs.items():
        batch = orders[repeat][0]
        with torch.no_grad():
            first = init(input_ids=ids[batch], labels=targets[batch]).loss.item()
        assert log[0]["loss"] == first, (opt, repeat)
    assert logs["adam", 0][0]["loss"] == logs["sgdm", 0][0]["loss"] != logs["adam", 1][0]["loss"]
    assert logs["adam", 0][1]["loss"] != logs["sgdm", 0][1]["loss"]  # the optimizers differ from the first update
    weights = {k: load_file(folder / k / "checkpoint-4" / "model.safetensors") for k in ("adam-0", "adam-1")}
    assert not torch.equal(weights["adam-0"]["transformer.h.0.mlp.c_fc.weight"],
                           weights["adam-1"]["transformer.h.0.mlp.c_fc.weight"])
    state = json.loads((folder / "adam-0" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [e["step"] for e in state["log_history"]] == [1, 2, 3, 4]
    assert sorted(p.name for p in (folder / "adam-0").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (folder / "adam-0" / "checkpoint-2" / "optimizer.pt").is_file()


def test_the_switched_run_is_the_baseline_until_the_switch(setup):
    folder, config, tokenizer, ids, targets = setup
    order = batch_order(len(ids), 4, config.batch_size, config.seed, 0)
    switch = ExperimentConfig(optimizers=("adam", "sgd"), steps=4, switch_at=2).schedules()["sgd-to-adam"]
    assert switch == [(1, "sgd", OPTIMIZERS["sgd"].lr), (3, "adam", OPTIMIZERS["adam"].lr)]
    runs = {name: train_run(folder / "init", folder / f"switch-{name}", schedule, ids, targets, order, tokenizer, 2,
                            torch.device("cpu"))
            for name, schedule in (("sgd", [(1, "sgd", OPTIMIZERS["sgd"].lr)]), ("sgd-to-adam", switch))}
    assert [e["loss"] for e in runs["sgd"][:3]] == [e["loss"] for e in runs["sgd-to-adam"][:3]]
    assert runs["sgd"][3]["loss"] != runs["sgd-to-adam"][3]["loss"]
    assert [e["learning_rate"] for e in runs["sgd-to-adam"]] == [OPTIMIZERS["sgd"].lr] * 2 + [OPTIMIZERS["adam"].lr] * 2
    before = [load_file(folder / f"switch-{n}" / "checkpoint-2" / "model.safetensors") for n in runs]
    assert all(torch.equal(before[0][k], before[1][k]) for k in before[0])
    saved = torch.load(folder / "switch-sgd-to-adam" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert "exp_avg" in saved["state"][0]  # Adam's state from the switch on


def test_a_diverging_run_is_an_input_error(setup):
    folder, config, tokenizer, ids, targets = setup
    order = batch_order(len(ids), 3, config.batch_size, config.seed, 0)
    with pytest.raises(InputError, match="diverged at step"):
        train_run(folder / "init", folder / "diverged", [(1, "sgd", 1e12)], ids, targets, order, tokenizer, 3,
                  torch.device("cpu"))


def test_families_comparisons_and_steps():
    config = ExperimentConfig(optimizers=("rmsprop", "sgdm", "adam"), steps=100, switch_at=40)
    assert list(config.schedules()) == ["rmsprop", "adam", "sgdm", "sgdm-to-rmsprop"]
    assert config.comparisons() == [("rmsprop", "sgdm"), ("adam", "sgdm"), ("sgdm-to-rmsprop", "sgdm"),
                                     ("rmsprop", "sgdm-to-rmsprop")]
    assert config.tag("sgdm-to-rmsprop") == "SGDM→RMSprop"
    assert compare_steps(config) == (50, 100)  # saved every 10: halfway and the end
    assert compare_steps(ExperimentConfig(steps=25, saves=10)) == (14, 25)  # the middle of 2, 4, …, 24, 25


@pytest.mark.parametrize("settings, message", [
    (dict(optimizers=("adam", "lion")), "unknown lion"),
    (dict(optimizers=("adam", "adam", "sgdm")), "names one twice"),
    (dict(optimizers=("adam", "adamw")), "exactly one baseline"),
    (dict(optimizers=("sgd", "sgdm", "adam")), "exactly one baseline"),
    (dict(optimizers=("sgdm",)), "at least one other"),
    (dict(repeats=0), "--repeats must be at least 1"),
    (dict(coords=0), "--coords must be at least 1"),
    (dict(saves=0), "--saves must be at least 1"),
    (dict(steps=1), "--steps must be at least 2"),
    (dict(targets="noise"), "--targets must be real or random"),
    (dict(switch_at=300), "--switch-at must be a step from 1 to 299"),
    (dict(switch_at=0), "--switch-at must be a step from 1 to 299"),
    (dict(blocks=8), "--blocks must be at least the batch of 16 blocks"),
])
def test_bad_settings_are_usage_errors(settings, message):
    with pytest.raises(UsageError, match=message):
        ExperimentConfig(**settings).validate()


def test_random_targets_train_on_fewer_blocks_with_their_own_learning_rates():
    real, rand = ExperimentConfig(), ExperimentConfig(targets="random")
    assert real.train_blocks is None and rand.train_blocks == 256
    assert ExperimentConfig(targets="random", blocks=64).train_blocks == 64
    assert real.schedules()["adam"] == [(1, "adam", OPTIMIZERS["adam"].lr)]
    assert rand.schedules()["sgdm"] == [(1, "sgdm", OPTIMIZERS["sgdm"].lr_random)]
    assert rand.describe()["optimizers"]["adam"]["lr"] == OPTIMIZERS["adam"].lr_random
