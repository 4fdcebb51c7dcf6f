"""Gradient alignment (App. A.6): the adaptive step against a hand-run torch.optim.Adam, the gradient against
autograd, and the command line on a Trainer checkpoint."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel
from typer.testing import CliRunner

from geomaudit.cli import app
from geomaudit.engine.stats import alignment_stats, spearman
from geomaudit.io.optimizer import adam_state, adaptive_step, trainer_parameter_order

runner = CliRunner()


def test_spearman_matches_scipy_with_ties():
    from scipy import stats

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.normal(size=40)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, rel=1e-12)
    assert np.isnan(spearman(np.ones(4), b[:4]))


def test_curves_are_sorted_by_the_hessian_diagonal():
    out = alignment_stats(np.array([3.0, -1.0, 2.0]), np.array([0.3, 0.1, -0.2]), np.array([1.0, 2.0, 3.0]))
    assert out["curves"] == {"h_abs": [1.0, 2.0, 3.0], "grad_abs": [0.1, 0.2, 0.3], "step_abs": [2.0, 3.0, 1.0]}
    assert out["spearman_grad"] == pytest.approx(1.0) and out["spearman_step"] == pytest.approx(-0.5)


def adam_checkpoint(tiny_gpt2_dir, tmp_path, steps=3, lr=1e-2):
    """A checkpoint written after ``steps`` hand-run Adam steps, grouped as the Trainer groups parameters."""
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in names]} for names in trainer_parameter_order(model)]
    opt = torch.optim.Adam(groups, lr=lr)
    ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    before = {}
    for _ in range(steps):
        before = {n: p.detach().clone() for n, p in params.items()}
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    folder = tmp_path / "checkpoint-3"
    model.save_pretrained(folder)
    for f in tiny_gpt2_dir.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    return folder, model, {n: (before[n] - p.detach()) / lr for n, p in params.items()}


def test_adaptive_step_is_the_update_adam_applied(tiny_gpt2_dir, tmp_path):
    folder, model, applied = adam_checkpoint(tiny_gpt2_dir, tmp_path)
    state = adam_state(folder, model)
    assert set(state) == set(applied)
    for name, update in applied.items():
        torch.testing.assert_close(adaptive_step(state[name]), update, rtol=2e-3, atol=1e-6)


def test_alignment_through_the_command_line(tiny_gpt2_dir, tmp_path):
    folder, model, applied = adam_checkpoint(tiny_gpt2_dir, tmp_path)
    name = "transformer.h.1.mlp.c_fc.weight"
    result = runner.invoke(app, ["rmed", str(folder), "--layers", name, "--coords", "20", "--batch-size", "4",
                                 "--alignment", "--precision", "fp64", "--json", "-"])
    assert result.exit_code == 0, result.output
    layer = json.loads(result.stdout)["checkpoints"][0]["layers"][0]
    order = np.argsort(np.abs(layer["h_diag"]), kind="stable")
    idx = np.array(layer["indices"])[order]
    step = applied[name].reshape(-1)[idx].abs().numpy()
    np.testing.assert_allclose(layer["alignment"]["curves"]["step_abs"], step, rtol=2e-3, atol=1e-6)
    assert layer["alignment"]["curves"]["h_abs"] == sorted(np.abs(layer["h_diag"]).tolist())

    from geomaudit.io.checkpoints import load_checkpoint
    from geomaudit.io.data import build_batch, embedded_corpus

    loaded = load_checkpoint(folder)
    batch = build_batch(embedded_corpus(), loaded, batch_size=4, max_length=128, seed=0, source="x")
    m = loaded.model.double()
    grad = torch.autograd.grad(loaded.loss_fn(m, batch.tensors), dict(m.named_parameters())[name])[0]
    np.testing.assert_allclose(layer["alignment"]["curves"]["grad_abs"], grad.reshape(-1)[idx].abs().numpy(),
                               rtol=1e-9, atol=1e-15)


def test_alignment_errors(tiny_gpt2_dir, tmp_path, trainer_runs):
    args = ["--layers", "transformer.ln_f.weight", "--coords", "4", "--batch-size", "2", "--alignment"]
    result = runner.invoke(app, ["rmed", str(tiny_gpt2_dir), *args])
    assert result.exit_code == 3 and "needs the optimizer state" in result.stderr
    sgd = trainer_runs["sgd-0"] / "checkpoint-2"
    result = runner.invoke(app, ["rmed", str(sgd), *args])
    assert result.exit_code == 3 and "needs Adam or AdamW" in result.stderr
    folder = tmp_path / "checkpoint-1"
    shutil.copytree(trainer_runs["adam-0"] / "checkpoint-2", folder)
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    state["param_groups"] = state["param_groups"][:1]
    torch.save(state, folder / "optimizer.pt")
    result = runner.invoke(app, ["rmed", str(folder), *args])
    assert result.exit_code == 3 and "does not fit this model: its parameter groups [" in result.stderr
    (folder / "optimizer.pt").write_bytes(b"junk")
    result = runner.invoke(app, ["rmed", str(folder), *args])
    assert result.exit_code == 3 and "cannot read" in result.stderr


@pytest.fixture(scope="module")
def one_group_run(tiny_gpt2_dir, tmp_path_factory):
    """The most common custom setup: ``Trainer(optimizers=(AdamW(model.parameters()), None))``, one group."""
    from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    from ..trainer_runs import _Sentences

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    out = tmp_path_factory.mktemp("one-group")
    args = TrainingArguments(out, max_steps=2, save_steps=2, per_device_train_batch_size=8, report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=_Sentences(tokenizer, model.config.n_positions),
            data_collator=default_data_collator, processing_class=tokenizer, optimizers=(opt, None)).train()
    return out / "checkpoint-2", model, opt


def test_alignment_of_a_one_group_adamw_trainer_run(one_group_run):
    """The Adam step read from optimizer.pt is the one the live optimizer holds for that very Parameter object
    (the optimizer's own mapping, no parameter numbering involved); Spearman as scipy computes it."""
    from scipy import stats

    folder, model, opt = one_group_run
    assert len(opt.param_groups) == 1 and (folder / "optimizer.pt").is_file()
    names = ["transformer.h.1.mlp.c_fc.bias", "transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.weight"]
    args = ["rmed", str(folder), "--coords", "12", "--batch-size", "4", "--alignment", "--json", "-"]
    result = runner.invoke(app, [*args, *(a for n in names for a in ("--layers", n))])
    assert result.exit_code == 0, result.output
    layers = {la["name"]: la for la in json.loads(result.stdout)["checkpoints"][0]["layers"]}
    params, group = dict(model.named_parameters()), opt.param_groups[0]
    (b1, b2), eps = group["betas"], group["eps"]
    for name in names:
        s = opt.state[params[name]]
        t = float(s["step"])
        by_hand = (s["exp_avg"] / (1 - b1 ** t)) / ((s["exp_avg_sq"] / (1 - b2 ** t)).sqrt() + eps)
        layer = layers[name]
        order = np.argsort(np.abs(layer["h_diag"]), kind="stable")
        step = by_hand.reshape(-1)[np.array(layer["indices"])[order]].abs().double().numpy()
        np.testing.assert_allclose(layer["alignment"]["curves"]["step_abs"], step, rtol=1e-6, atol=1e-12)
        rho = stats.spearmanr(np.abs(layer["h_diag"]), by_hand.reshape(-1)[layer["indices"]].abs()).statistic
        assert layer["alignment"]["spearman_step"] == pytest.approx(rho, abs=1e-9)


@pytest.mark.parametrize("change", ["drop", "reverse"])
def test_a_layout_that_does_not_fit_is_an_input_error(one_group_run, tmp_path, change):
    folder, _, _ = one_group_run
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(folder, copy)
    state = torch.load(copy / "optimizer.pt", weights_only=True)
    group = state["param_groups"][0]
    group["params"] = group["params"][:-1] if change == "drop" else group["params"][::-1]
    torch.save(state, copy / "optimizer.pt")
    result = runner.invoke(app, ["rmed", str(copy), "--layers", "transformer.ln_f.weight", "--coords", "4",
                                 "--batch-size", "2", "--alignment"])
    assert result.exit_code == 3, result.output
    count = len(group["params"])
    assert f"does not fit this model: its parameter groups [{count}] match neither the Trainer's groups" in \
        result.stderr
