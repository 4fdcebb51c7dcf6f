"""``GeometryCallback`` inside real ``Trainer.train()`` runs of the tiny GPT-2, against ``geomaudit rmed``."""

import inspect
import json
import logging
import math

import jsonschema
import numpy as np
import pytest
import torch
from transformers import TrainerCallback
from typer.testing import CliRunner

from geomaudit.cli import app
from geomaudit.errors import InputError, UsageError
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
    for step, entry in logged.items():  # the integrations see the per-layer values too
        assert {k: seen[step][k] for k in entry if k.startswith("geomaudit/")} == {
            k: v for k, v in entry.items() if k.startswith("geomaudit/")}
    with open(f"{runs['audited'].args.output_dir}/checkpoint-4/trainer_state.json") as f:
        assert [e["step"] for e in json.load(f)["log_history"] if "geomaudit/loss" in e] == [2, 4]


def test_passed_to_the_trainer_it_logs_to_the_history_and_the_callbacks_after_it(tiny_gpt2_dir, examples_jsonl,
                                                                                  tmp_path):
    before, after = Recorder(), Recorder()
    trainer = _trainer(tmp_path, tiny_gpt2_dir, [before, _callback(examples_jsonl, every=1), after], steps=2)
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history if "geomaudit/r_med_stab_median" in e] == [1, 2]
    assert all(f"geomaudit/r_med_stab/{n}" in e for e in trainer.state.log_history if "geomaudit/loss" in e
               for n in NAMES)
    assert [e["step"] for e in after.logs if "geomaudit/r_med_stab_median" in e] == [1, 2]
    assert not any("geomaudit/r_med_stab/" in k for e in after.logs for k in e)  # the console comes after it
    assert not any("geomaudit/loss" in e for e in before.logs)  # why attach() exists: integrations come first


@pytest.mark.parametrize("attach", [True, False])
def test_the_console_gets_the_summary_only(tiny_gpt2_dir, examples_jsonl, tmp_path, capsys, attach):
    recorder, callback = Recorder(), _callback(examples_jsonl)
    trainer = _trainer(tmp_path, tiny_gpt2_dir, [recorder] + ([] if attach else [callback]), steps=2)
    if attach:  # disable_tqdm: PrinterCallback prints the logs, last
        callback.attach(trainer)
    trainer.train()
    printed = [line for line in capsys.readouterr().out.splitlines() if "geomaudit/" in line]
    assert len(printed) == 1 and "'geomaudit/r_med_stab_median'" in printed[0] and "'loss'" in printed[0]
    assert "geomaudit/r_med_stab_max" in printed[0] and "geomaudit/loss" in printed[0]
    assert "geomaudit/r_med_stab/" not in printed[0]
    per_layer = {f"geomaudit/r_med_stab/{n}" for n in NAMES}
    assert per_layer <= set(trainer.state.log_history[-2 if "train_runtime" in trainer.state.log_history[-1]
                                                       else -1])
    seen = [e for e in recorder.logs if "geomaudit/loss" in e]  # the recorder runs where integrations run
    assert per_layer <= set(seen[0]) if attach else not seen


class FreezeAtStep(TrainerCallback):
    """A real fault for one audit: the audited layers are frozen (``requires_grad`` off) from the end of step
    ``step`` — after its optimizer step — until the next step begins, so no layer matches the callback's glob
    then, while training itself is unchanged."""

    def __init__(self, step: int, model):
        self.step, self.params = step, [p for n, p in model.named_parameters() if n in NAMES]

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for p in self.params:
                p.requires_grad_(False)

    def on_step_begin(self, args, state, control, **kwargs):
        for p in self.params:
            p.requires_grad_(True)


def test_a_failing_audit_is_a_warning_and_training_goes_on(runs, tiny_gpt2_dir, examples_jsonl, tmp_path, caplog):
    trainer = _trainer(tmp_path, tiny_gpt2_dir)
    trainer.add_callback(FreezeAtStep(2, trainer.model))
    trainer.add_callback(_callback(examples_jsonl))
    with caplog.at_level(logging.WARNING, logger="geomaudit"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("geomaudit")]
    assert warnings == ["geomaudit: the audit at step 2 failed and was skipped; training goes on (UsageError: "
                        "--layers 'transformer.h.1.mlp.*' matches no trainable parameter (names look like "
                        "'transformer.wte.weight'))"]
    assert trainer.state.global_step == 4
    assert [e["step"] for e in trainer.state.log_history if "geomaudit/loss" in e] == [4]
    assert not (tmp_path / "geomaudit-step-2.json").exists() and (tmp_path / "geomaudit-step-4.json").is_file()
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    assert losses == [(e["step"], e["loss"]) for e in runs["plain"].state.log_history if "loss" in e]


def test_bad_data_or_layers_fail_before_training(tiny_gpt2_dir, tmp_path):
    from transformers import GPT2Config

    vocab = GPT2Config.from_pretrained(tiny_gpt2_dir).vocab_size
    ids = torch.full((2, 4), 5)
    cases = [(GeometryCallback(every=1, data={"input_ids": ids + vocab}, coords=3), InputError,
              f"tensors given to GeometryCallback has token id {vocab + 5}, beyond the model's vocabulary"),
             (GeometryCallback(every=1, data={"input_ids": ids, "attention_mask": torch.ones(2, 7)}), InputError,
              "GeometryCallback's audit batch from tensors given to GeometryCallback does not fit the model: "
              "IndexError: The shape of the mask"),
             (GeometryCallback(every=1, layers=["encoder.*"], coords=3), UsageError, "matches no trainable")]
    for callback, error, message in cases:
        trainer = _trainer(tmp_path, tiny_gpt2_dir, [callback])
        with pytest.raises(error, match=message):
            trainer.train()
        assert trainer.state.global_step == 0


def test_defaults_are_the_rmed_command_s():
    from geomaudit.cli.rmed import rmed

    command = {n: p.default for n, p in inspect.signature(rmed).parameters.items()}
    callback = {n: p.default for n, p in inspect.signature(GeometryCallback).parameters.items()}
    for name in ("coords", "batch_size", "micro_batch", "max_length", "seed", "topk"):
        assert callback[name] == command[name], name
    assert callback["metric"] == "r_med_stab" and command["metric"] is None  # rmed's default, see gate_metric


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


def test_report_merges_the_per_step_files_into_one_trajectory(runs, tmp_path):
    """``geomaudit report geomaudit-step-*.json``: one trajectory, as tables and as the per-layer line plot."""
    from matplotlib.figure import Figure

    from geomaudit.cli.report import read_report
    from geomaudit.report.document import merge_trajectory
    from geomaudit.report.plots import _rmed_figure

    from .cli.invoke import run

    out = runs["audited"].args.output_dir
    files = [f"{out}/geomaudit-step-4.json", f"{out}/geomaudit-step-2.json"]  # in any order
    singles = {step: json.loads(open(f"{out}/geomaudit-step-{step}.json").read()) for step in (2, 4)}
    merged = merge_trajectory([read_report(f) for f in files], files)
    jsonschema.validate(merged, schema())
    assert merged["checkpoints"] == [singles[2]["checkpoints"][0], singles[4]["checkpoints"][0]]
    assert run("report", *files).stdout == run("report", files[1]).stdout + run("report", files[0]).stdout

    png = tmp_path / "trajectory.png"
    assert run("report", *files, "--plot", str(png)).exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    lines = {line.get_label(): line for line in _rmed_figure(Figure, merged, "r_med_stab").axes[0].get_lines()}
    for name in NAMES:  # the legend drops the shared prefix
        line = lines[name.removeprefix("transformer.h.1.mlp.")]
        assert list(line.get_xdata()) == [2, 4]
        expected = [next(la for la in singles[s]["checkpoints"][0]["layers"] if la["name"] == name)["stats"][
            "r_med_stab"] for s in (2, 4)]
        np.testing.assert_allclose(line.get_ydata(), expected)


def test_reports_that_are_not_one_audit_do_not_merge(runs, tmp_path):
    from .cli.invoke import run

    out = runs["audited"].args.output_dir
    step2, step4 = f"{out}/geomaudit-step-2.json", f"{out}/geomaudit-step-4.json"
    assert "both hold step 2" in run("report", step2, step2, code=3).stderr

    def edited(name: str, edit) -> str:
        document = json.loads(open(step4).read())
        edit(document)
        path = tmp_path / name
        path.write_text(json.dumps(document))
        return str(path)

    other = edited("coords.json", lambda d: d["settings"].update(coords=7))
    assert f"{other} and {step2} are not reports of one audit: their settings differ" in run(
        "report", step2, other, code=3).stderr
    other = edited("data.json", lambda d: d["data"].update(fingerprint="sha256:" + "0" * 64))
    assert "their data differ" in run("report", step2, other, code=3).stderr
    other = edited("nostep.json", lambda d: d["checkpoints"][0].update(step=None))
    assert f"{other} holds a checkpoint without a step" in run("report", step2, other, code=3).stderr
    other = str(tmp_path / "svd.json")
    run("svd", f"{out}/checkpoint-4", "--json", other)
    assert f"{other} is a svd report: only rmed reports" in run("report", step2, other, code=3).stderr
