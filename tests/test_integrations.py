"""``GeometryCallback`` inside real ``Trainer.train()`` runs of the tiny GPT-2, against ``geomaudit rmed``."""

import json
import math

import jsonschema
import numpy as np
import pytest
import torch
from transformers import TrainerCallback
from typer.testing import CliRunner

from geomaudit.cli import app
from geomaudit.errors import UsageError
from geomaudit.integrations import GeometryCallback
from geomaudit.report.document import schema

from .trainer_runs import OPTIMIZERS, _Sentences

LAYERS = ["transformer.h.1.mlp.*"]
NAMES = ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.bias", "transformer.h.1.mlp.c_proj.weight",
         "transformer.h.1.mlp.c_proj.bias"]


class Recorder(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, W&B): keeps every log it is shown."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**logs, "step": state.global_step})


def _trainer(out_dir, model_dir, callbacks=(), steps=4):
    from transformers import AutoTokenizer, GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    args = TrainingArguments(out_dir, max_steps=steps, save_steps=2, logging_steps=1, per_device_train_batch_size=8,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **OPTIMIZERS["adam"])
    return Trainer(model=model, args=args, train_dataset=_Sentences(tokenizer, model.config.n_positions),
                   data_collator=default_data_collator, processing_class=tokenizer, callbacks=list(callbacks))


def _callback(examples_jsonl, every=2) -> GeometryCallback:
    return GeometryCallback(every=every, data=str(examples_jsonl), coords=6, layers=LAYERS, batch_size=8)


@pytest.fixture(scope="module")
def runs(tiny_gpt2_dir, examples_jsonl, tmp_path_factory) -> dict:
    """One run with the callback (attached first, a recorder behind it as the integration), one without."""
    recorder = Recorder()
    audited = _trainer(tmp_path_factory.mktemp("audited"), tiny_gpt2_dir, [recorder])
    _callback(examples_jsonl).attach(audited)
    audited.train()
    plain = _trainer(tmp_path_factory.mktemp("plain"), tiny_gpt2_dir)
    plain.train()
    return {"audited": audited, "plain": plain, "recorder": recorder}


def test_r_med_values_are_logged_at_the_audit_steps(runs):
    logged = {e["step"]: e for e in runs["audited"].state.log_history if "geomaudit/loss" in e}
    assert sorted(logged) == [2, 4]
    for entry in logged.values():
        per_layer = [entry[f"geomaudit/r_med_stab/{name}"] for name in NAMES]
        assert all(math.isfinite(v) and v > 0 for v in per_layer)
        assert entry["geomaudit/r_med_stab_median"] == pytest.approx(np.median(per_layer))
        assert entry["geomaudit/r_med_stab_max"] == max(per_layer)
        assert entry["geomaudit/r_med_stab_median"] >= 1 and 0 < entry["geomaudit/loss"] < 10
        assert "loss" in entry  # joined the Trainer's own log of that step
    seen = {e["step"]: e for e in runs["recorder"].logs if "geomaudit/loss" in e}
    assert {s: seen[s]["geomaudit/loss"] for s in seen} == {s: logged[s]["geomaudit/loss"] for s in logged}
    with open(f"{runs['audited'].args.output_dir}/checkpoint-4/trainer_state.json") as f:
        assert [e["step"] for e in json.load(f)["log_history"] if "geomaudit/loss" in e] == [2, 4]


def test_passed_to_the_trainer_it_logs_to_the_history_and_the_callbacks_after_it(tiny_gpt2_dir, examples_jsonl,
                                                                                  tmp_path):
    before, after = Recorder(), Recorder()
    trainer = _trainer(tmp_path, tiny_gpt2_dir, [before, _callback(examples_jsonl, every=1), after], steps=2)
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history if "geomaudit/r_med_stab_median" in e] == [1, 2]
    assert [e["step"] for e in after.logs if "geomaudit/r_med_stab_median" in e] == [1, 2]
    assert not any("geomaudit/loss" in e for e in before.logs)  # why attach() exists: integrations come first


def test_json_reports_validate_and_match_rmed_on_the_saved_checkpoints(runs, examples_jsonl):
    out = runs["audited"].args.output_dir
    for step in (2, 4):
        with open(f"{out}/geomaudit-step-{step}.json") as f:
            live = json.load(f)
        jsonschema.validate(live, schema())
        assert live["command"] == "rmed" and live["settings"]["every"] == 2
        assert live["model"]["class"] == "GPT2LMHeadModel" and live["model"]["task"] == "causal-lm"
        result = CliRunner().invoke(app, ["rmed", f"{out}/checkpoint-{step}", "--data", str(examples_jsonl),
                                          "--coords", "6", "--layers", LAYERS[0], "--batch-size", "8", "--json", "-"])
        assert result.exit_code == 0, result.output
        saved = json.loads(result.stdout)
        assert live["data"]["fingerprint"] == saved["data"]["fingerprint"]
        (a,), (b,) = live["checkpoints"], saved["checkpoints"]
        assert a["step"] == step and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert [la["name"] for la in a["layers"]] == [la["name"] for la in b["layers"]] == NAMES
        for la, lb in zip(a["layers"], b["layers"]):
            assert la["indices"] == lb["indices"]
            np.testing.assert_allclose(la["h_diag"], lb["h_diag"], rtol=1e-4, atol=1e-10)


def test_training_is_not_disturbed(runs):
    def losses(trainer):
        return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]

    assert len(losses(runs["plain"])) == 4
    assert losses(runs["audited"]) == losses(runs["plain"])


def test_audit_leaves_mode_flags_grads_and_attention_alone(tiny_gpt2_dir, examples_jsonl):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).train()
    model.transformer.wte.weight.requires_grad_(False)
    torch.manual_seed(0)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    flags, attention = {n: p.requires_grad for n, p in model.named_parameters()}, model.config._attn_implementation
    callback = GeometryCallback(every=1, coords=4, layers=LAYERS, batch_size=4, max_length=32,
                                tokenizer=AutoTokenizer.from_pretrained(tiny_gpt2_dir))
    result = callback.audit(model, step=0)
    assert [la.name for la in result.layers] == NAMES and callback._prepared[1].source.startswith("embedded")
    assert model.training and model.config._attn_implementation == attention != "eager"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())


def test_tensor_data_and_attach_once(tiny_gpt2_dir, tmp_path):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    ids = torch.randint(0, model.config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(0))
    callback = GeometryCallback(every=1, data={"input_ids": ids}, coords=3, layers=["transformer.ln_f.*"])
    callback.audit(model, step=7, output_dir=str(tmp_path))
    report = json.loads((tmp_path / "geomaudit-step-7.json").read_text())
    jsonschema.validate(report, schema())
    assert report["data"]["shapes"] == {"input_ids": [3, 8], "labels": [3, 8]}
    assert not model.training
    trainer = _trainer(tmp_path / "run", tiny_gpt2_dir, [callback])
    callback.attach(trainer).attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    assert trainer.callback_handler.callbacks.count(callback) == 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"every": 0}, "every must be at least 1"),
    ({"every": 1, "metric": "r_diag"}, "metric must be one of"),
    ({"every": 1, "coords": 0}, "--coords must be at least 1"),
])
def test_bad_settings_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        GeometryCallback(**kwargs)


def test_default_data_needs_a_tokenizer(tiny_gpt2_dir):
    from transformers import GPT2LMHeadModel

    with pytest.raises(UsageError, match="needs data= when the Trainer has no processing_class"):
        GeometryCallback(every=1).audit(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), step=1)
