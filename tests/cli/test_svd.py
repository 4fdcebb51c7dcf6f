"""``geomaudit svd`` end to end: tiny GPT-2, a Trainer run, a state dict with --model; schema; every error path."""

import json
import textwrap

import jsonschema
import pytest
import torch
from safetensors.torch import load_file, save_file

from geomaudit.cli import app
from geomaudit.engine.svd import spectrum_stats
from geomaudit.report.document import schema

from .invoke import report, runner

C_FC = "transformer.h.0.mlp.c_fc.weight"


def svd_json(*args: str) -> dict:
    return report("svd", *args)


def fail(args: list[str], code: int, phrase: str) -> None:
    result = runner.invoke(app, ["svd", *args])
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert phrase in result.stderr, result.stderr


def test_table_lists_the_weight_matrices_with_the_convention(tiny_gpt2_dir):
    result = runner.invoke(app, ["svd", str(tiny_gpt2_dir)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())  # titles and captions wrap at the table's width
    for text in ("matrices as (out, in), GPT-2 Conv1D weights transposed", "k at 0.9 of Σσ²", C_FC, "64×16",
                 "transformer.wte.weight", "R_u", "R_v", "stable rank", "σ_1", "low-rank", "exact",
                 "18 tensors with fewer than 2 dimensions skipped"):
        assert text in out, text
    assert "ln_1" not in out and ".bias" not in out


def test_json_report_reads_weights_as_out_in(tiny_gpt2_dir):
    document = svd_json(str(tiny_gpt2_dir))
    assert document["command"] == "svd" and "data" not in document and "checkpoints" not in document
    assert document["settings"] == {"layers": [], "rank": None, "energy": 0.9, "top": 10, "exact_max": 4096,
                                    "steps": None, "every": None, "model": None, "merge": False}
    assert document["svd"]["convention"] == "(out, in); GPT-2 Conv1D weights transposed"
    (ckpt,) = document["svd"]["checkpoints"]
    layers = {layer["name"]: layer for layer in ckpt["layers"]}
    assert ckpt["skipped_1d"] == 18 and len(layers) == 10  # wte, wpe, and 4 Conv1D weights in each of 2 blocks
    stored = load_file(tiny_gpt2_dir / "model.safetensors")
    fc = layers[C_FC]
    assert fc["shape"] == [16, 64] and fc["matrix_shape"] == [64, 16]
    assert fc["note"] == "transposed from Conv1D (in, out)"
    reference = spectrum_stats(stored[C_FC])  # the untransposed stored tensor: its R_v is the report's R_u
    assert fc["r_u"] == pytest.approx(reference["r_v"], rel=1e-12)
    assert fc["r_v"] == pytest.approx(reference["r_u"], rel=1e-12)
    assert fc["top_singular_values"] == pytest.approx(reference["top_singular_values"], rel=1e-12)
    wte = layers["transformer.wte.weight"]
    assert wte["note"] == "" and wte["matrix_shape"] == wte["shape"] == list(stored["transformer.wte.weight"].shape)
    for layer in layers.values():
        assert layer["method"] == "exact" and layer["threshold"] == 1
        assert 1 <= layer["k"] <= min(layer["matrix_shape"]) and layer["energy_top_k"] >= 0.9 - 1e-12
        assert layer["low_rank"] == (layer["k"] <= 1) and len(layer["top_singular_values"]) == 10


def test_rank_fixes_k_for_every_layer(tiny_gpt2_dir):
    document = svd_json(str(tiny_gpt2_dir), "--rank", "3", "--layers", "transformer.h.1.*")
    assert document["settings"]["rank"] == 3 and document["settings"]["energy"] is None
    (ckpt,) = document["svd"]["checkpoints"]
    assert [layer["k"] for layer in ckpt["layers"]] == [3, 3, 3, 3] and ckpt["skipped_1d"] == 8
    stored = load_file(tiny_gpt2_dir / "model.safetensors")["transformer.h.1.attn.c_proj.weight"]
    layer = next(la for la in ckpt["layers"] if la["name"] == "transformer.h.1.attn.c_proj.weight")
    assert layer["r_u"] == pytest.approx(spectrum_stats(stored.T, rank=3)["r_u"], rel=1e-12)
    result = runner.invoke(app, ["svd", str(tiny_gpt2_dir), "--rank", "3", "--layers", "transformer.h.1.*"])
    assert "k = --rank 3" in " ".join(result.stdout.split())


def test_energy_option_moves_k(tiny_gpt2_dir):
    low = svd_json(str(tiny_gpt2_dir), "--energy", "0.3", "--layers", C_FC)["svd"]["checkpoints"][0]["layers"][0]
    high = svd_json(str(tiny_gpt2_dir), "--energy", "1", "--layers", C_FC)["svd"]["checkpoints"][0]["layers"][0]
    assert low["k"] < high["k"] == 16 and high["energy_top_k"] == pytest.approx(1.0)


def test_every_checkpoint_of_a_trainer_run(trainer_runs):
    run = trainer_runs["adam-0"]
    document = svd_json(str(run), "--layers", C_FC)
    assert [c["step"] for c in document["svd"]["checkpoints"]] == [2, 4, 6]
    assert document["trajectories"][0]["steps"] == [2, 4, 6]
    sigma = []
    for ckpt in document["svd"]["checkpoints"]:
        (layer,) = ckpt["layers"]
        stored = load_file(run / f"checkpoint-{ckpt['step']}" / "model.safetensors")[C_FC]
        assert layer["r_u"] == pytest.approx(spectrum_stats(stored.T)["r_u"], rel=1e-12)
        sigma.append(layer["top_singular_values"][0])
    assert len(set(sigma)) == 3  # each step's own weights
    picked = svd_json(str(run), "--layers", C_FC, "--steps", "4,6")
    assert [c["step"] for c in picked["svd"]["checkpoints"]] == [4, 6]
    result = runner.invoke(app, ["svd", str(run), "--every", "6", "--layers", C_FC])
    assert result.exit_code == 0, result.output
    assert "step 6" in " ".join(result.stdout.split()) and "step 2" not in " ".join(result.stdout.split())


def test_state_dict_with_model_factory_reshapes_kernels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tinyconv.py").write_text(textwrap.dedent("""
        from torch import nn

        def build():
            return nn.Sequential(nn.Conv2d(3, 4, 2), nn.Flatten(), nn.Linear(4, 2))
    """))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 2), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    save_file(net.state_dict(), tmp_path / "conv.safetensors")
    document = svd_json("conv.safetensors", "--model", "tinyconv:build")
    assert document["model"]["format"] == "state_dict" and document["settings"]["model"] == "tinyconv:build"
    conv, linear = document["svd"]["checkpoints"][0]["layers"]
    assert conv["matrix_shape"] == [4, 12] and conv["note"] == "reshaped from (4, 3, 2, 2)"
    assert linear["matrix_shape"] == [2, 4] and linear["note"] == ""
    assert conv["r_v"] == pytest.approx(spectrum_stats(net[0].weight.reshape(4, 12))["r_v"], rel=1e-12)
    result = runner.invoke(app, ["svd", "conv.safetensors", "--model", "tinyconv:build"])
    assert "matrices as (out, in);" in " ".join(result.stdout.split()) and "Conv1D" not in result.stdout


def test_headless_checkpoint_leaves_out_the_head_transformers_adds(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=16)).save_pretrained(tmp_path)
    result = runner.invoke(app, ["svd", str(tmp_path), "--json", "-"])
    assert result.exit_code == 0, result.output
    assert "classifier.bias, classifier.weight (added by transformers, not in the checkpoint) left out" in result.stderr
    document = json.loads(result.stdout)
    jsonschema.validate(document, schema())
    names = [layer["name"] for layer in document["svd"]["checkpoints"][0]["layers"]]
    assert document["model"]["initialised"] == ["classifier.bias", "classifier.weight"]
    assert "classifier.weight" not in names and "bert.pooler.dense.weight" in names and len(names) == 10


def test_schema_ties_the_sections_to_the_command(tiny_gpt2_dir):
    document = svd_json(str(tiny_gpt2_dir), "--layers", C_FC)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document | {"command": "rmed"}, schema())  # rmed needs data and checkpoints
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in document.items() if k != "svd"}, schema())
    layer = document["svd"]["checkpoints"][0]["layers"][0]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document | {"svd": {"convention": "", "checkpoints": [
            {"path": "x", "step": None, "skipped_1d": 0, "layers": [layer | {"method": "guess"}]}]}}, schema())


@pytest.mark.parametrize("args, code, phrase", [
    (["--rank", "3", "--energy", "0.8"], 2, "give --rank or --energy, not both"),
    (["--energy", "1.5"], 2, "--energy is a share of the spectrum's energy in (0, 1], got 1.5"),
    (["--energy", "0"], 2, "in (0, 1], got 0.0"),
    (["--rank", "0"], 2, "--rank must be at least 1, got 0"),
    (["--layers", "nothing.*"], 2, "--layers 'nothing.*' matches no trainable parameter"),
    (["--layers", "*ln_f*"], 2, "the selected layers hold no tensor with 2 or more dimensions"),
    (["--steps", "3"], 2, "step 3 is not in the trajectory"),
])
def test_usage_errors(tiny_gpt2_dir, args, code, phrase):
    fail([str(tiny_gpt2_dir), *args], code, phrase)


def test_missing_checkpoint_is_an_input_error(tmp_path):
    fail([str(tmp_path / "absent")], 3, "does not exist")


def test_json_folder_must_exist_before_the_work(tiny_gpt2_dir, tmp_path):
    fail([str(tiny_gpt2_dir), "--json", str(tmp_path / "no" / "r.json")], 2, "does not exist")


def test_non_finite_weights_are_an_input_error(tiny_gpt2_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan"
    shutil.copytree(tiny_gpt2_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"][1, 2] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    fail([str(broken), "--layers", "*mlp*"], 3,
         "the weight transformer.h.0.mlp.c_fc.weight holds non-finite values (NaN or inf): its spectrum is undefined")
