"""Every error path: one sentence on stderr, its exit code (SPEC §4), no traceback, no partial output."""

import json
import shutil
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from geomaudit.cli import app

runner = CliRunner()

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    def mse(model, batch):
        return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()

    def broken(model, batch):
        return 1 / 0
""")


class Opaque:
    """Pickled by reference: loading it needs code execution, which weights_only refuses."""


def fail(args: list[str], code: int, *phrases: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    return result.stderr


@pytest.fixture
def plain(tmp_path, monkeypatch):
    """A working directory with a model factory module, its state dict and pre-tokenized data."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tinymlp.py").write_text(FACTORY)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    save_file(model.state_dict(), tmp_path / "mlp.safetensors")
    save_file({"x": torch.randn(10, 3), "y": torch.randn(10)}, tmp_path / "data.safetensors")
    return tmp_path


def test_plain_state_dict_with_factory_and_loss_works(plain):
    result = runner.invoke(app, ["rmed", "mlp.safetensors", "--model", "tinymlp:build", "--loss", "tinymlp:mse",
                                 "--data", "data.safetensors", "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["model"]["format"] == "state_dict" and document["model"]["task"] == "custom"
    assert [layer["name"] for layer in document["checkpoints"][0]["layers"]] == ["0.weight", "0.bias", "2.weight",
                                                                                 "2.bias"]


def test_missing_checkpoint(tmp_path):
    fail(["rmed", str(tmp_path / "nope"), "--data", "x.jsonl"], 3, "does not exist")


def test_directory_without_config(tmp_path):
    fail(["rmed", str(tmp_path)], 3, "holds no checkpoints")


def test_corrupt_safetensors_in_checkpoint_directory(tiny_bert_dir, tmp_path, examples_jsonl):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    fail(["rmed", str(broken), "--data", str(examples_jsonl)], 3, "cannot load the checkpoint")


def test_corrupt_plain_safetensors(plain):
    (plain / "bad.safetensors").write_bytes(b"not a safetensors file")
    fail(["rmed", "bad.safetensors", "--model", "tinymlp:build", "--data", "data.safetensors"], 3,
         "not a valid safetensors file")


def test_state_dict_without_model_factory(plain):
    fail(["rmed", "mlp.safetensors", "--data", "data.safetensors"], 2, "--model module:factory")


def test_mismatched_shapes(plain):
    save_file({"0.weight": torch.zeros(5, 3), "0.bias": torch.zeros(5), "2.weight": torch.zeros(1, 5),
               "2.bias": torch.zeros(1)}, plain / "wide.safetensors")
    fail(["rmed", "wide.safetensors", "--model", "tinymlp:build", "--loss", "tinymlp:mse",
          "--data", "data.safetensors"], 3, "does not fit the model")


def test_pickle_needing_code_is_refused_and_names_the_flag(plain):
    torch.save({"0.weight": torch.zeros(4, 3), "extra": Opaque()}, plain / "evil.pt")
    fail(["rmed", "evil.pt", "--model", "tinymlp:build", "--data", "data.safetensors"], 3,
         "refusing to unpickle", "--allow-pickle")


def test_bad_factory_spec(plain):
    fail(["rmed", "mlp.safetensors", "--model", "tinymlp", "--data", "data.safetensors"], 2, "module:name")
    fail(["rmed", "mlp.safetensors", "--model", "tinymlp:nothing", "--data", "data.safetensors"], 2, "nothing")


def test_nan_loss(plain):
    save_file({"0.weight": torch.full((4, 3), float("nan")), "0.bias": torch.zeros(4), "2.weight": torch.zeros(1, 4),
               "2.bias": torch.zeros(1)}, plain / "nan.safetensors")
    fail(["rmed", "nan.safetensors", "--model", "tinymlp:build", "--loss", "tinymlp:mse",
          "--data", "data.safetensors"], 3, "loss on the audit batch is nan")


def test_data_that_does_not_fit_the_model(plain):
    save_file({"x": torch.randn(10, 7), "y": torch.randn(10)}, plain / "wide.safetensors")
    fail(["rmed", "mlp.safetensors", "--model", "tinymlp:build", "--loss", "tinymlp:mse",
          "--data", "wide.safetensors"], 3, "does not fit the model")


def test_token_ids_beyond_the_vocabulary(tiny_gpt2_dir, tmp_path):
    save_file({"input_ids": torch.full((2, 5), 10_000)}, tmp_path / "ids.safetensors")
    fail(["rmed", str(tiny_gpt2_dir), "--data", str(tmp_path / "ids.safetensors")], 3, "beyond the model's vocabulary")


def test_tensors_of_different_lengths(tiny_gpt2_dir, tmp_path):
    save_file({"input_ids": torch.ones(3, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long)},
              tmp_path / "ragged.safetensors")
    fail(["rmed", str(tiny_gpt2_dir), "--data", str(tmp_path / "ragged.safetensors")], 3, "differ in")


def test_missing_and_malformed_data(tiny_bert_dir, tmp_path):
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "none.jsonl")], 3, "does not exist")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine", "label": 0}\n{"text": oops}\n')
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "bad.jsonl")], 3, "line 2 is not valid JSON")
    (tmp_path / "notext.jsonl").write_text('{"sentence": "fine", "label": 0}\n')
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "notext.jsonl")], 3, "`text` field")
    (tmp_path / "data.xlsx").write_text("x")
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "data.xlsx")], 2, "cannot read data of type")


def test_classifier_needs_labels_in_range(tiny_bert_dir, tmp_path):
    (tmp_path / "plain.txt").write_text("one sentence\nanother sentence\n")
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "plain.txt")], 3, "needs a `label`")
    (tmp_path / "far.jsonl").write_text('{"text": "a b", "label": 0}\n{"text": "c d", "label": 7}\n')
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "far.jsonl")], 3, "labels outside 0..1")
    (tmp_path / "words.jsonl").write_text('{"text": "a b", "label": "maybe"}\n')
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "words.jsonl")], 3, "neither an integer")
    (tmp_path / "huge.jsonl").write_text('{"text": "a b", "label": 0}\n' * 40 + '{"text": "c", "label": 1000000000000}\n')
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "huge.jsonl")], 3,
         "the data has a label of 1000000000000: integer labels index the classes 0..n-1 of a classification head, "
         "which geomaudit builds with at most 100,000")


def test_classifier_without_data(tiny_bert_dir):
    fail(["rmed", str(tiny_bert_dir)], 2, "--data is needed")


def test_layer_glob_matching_nothing(tiny_gpt2_dir):
    fail(["rmed", str(tiny_gpt2_dir), "--layers", "encoder.*"], 2, "matches no trainable parameter")


def test_bad_option_values(tiny_gpt2_dir):
    fail(["rmed", str(tiny_gpt2_dir), "--coords", "0"], 2, "--coords must be at least 1")
    fail(["rmed", str(tiny_gpt2_dir), "--coords", "20", "--layers", "50"], 2, "give the number of coordinates once")
    fail(["rmed", str(tiny_gpt2_dir), "--device", "tpu9"], 2, "--device")
    if not torch.cuda.is_available():
        fail(["rmed", str(tiny_gpt2_dir), "--device", "cuda"], 2, "no CUDA device")
    fail(["rmed", str(tiny_gpt2_dir), "--loss", "tinymlp:mse"], 2, "--loss needs --model")
    fail(["rmed", str(tiny_gpt2_dir), "--slq"], 2, "it needs --smed")
    fail(["rmed", str(tiny_gpt2_dir), "--across", "*"], 2, "--across works on the Hessian columns")
    fail(["rmed", str(tiny_gpt2_dir), "--smed", "--dense-max", "0"], 2, "--dense-max must be at least 1")


def test_json_into_a_missing_folder_fails_before_the_work(tiny_gpt2_dir, tmp_path):
    fail(["rmed", str(tiny_gpt2_dir), "--json", str(tmp_path / "no" / "r.json")], 2, "does not exist")


def test_failed_audit_leaves_no_json_file(plain):
    out = plain / "report.json"
    save_file({"0.weight": torch.full((4, 3), float("inf")), "0.bias": torch.zeros(4), "2.weight": torch.ones(1, 4),
               "2.bias": torch.zeros(1)}, plain / "inf.safetensors")
    fail(["rmed", "inf.safetensors", "--model", "tinymlp:build", "--loss", "tinymlp:mse",
          "--data", "data.safetensors", "--json", str(out)], 3)
    assert list(plain.glob("report.json*")) == [] and list(plain.glob(".report.json*")) == []


def test_unexpected_exception_is_an_internal_error_and_debug_shows_it(plain):
    args = ["rmed", "mlp.safetensors", "--model", "tinymlp:build", "--loss", "tinymlp:broken",
            "--data", "data.safetensors"]
    fail(args, 4, "internal error", "ZeroDivisionError", "--debug")
    result = runner.invoke(app, ["--debug", *args])
    assert result.exit_code == 4 and "Traceback" in result.stderr


def test_more_checkpoint_errors(plain, tiny_gpt2_dir, tmp_path):
    fail(["rmed", str(tiny_gpt2_dir), "--model", "tinymlp:build"], 2, "is a directory")
    (plain / "junk.pt").write_bytes(b"\x00not a torch file")
    fail(["rmed", "junk.pt", "--model", "tinymlp:build", "--data", "data.safetensors"], 3, "cannot read")
    torch.save([torch.zeros(1)], plain / "list.pt")
    fail(["rmed", "list.pt", "--model", "tinymlp:build", "--data", "data.safetensors"], 3, "does not hold a state dict")
    (plain / "extra.py").write_text(textwrap.dedent("""
        import torch
        VALUE = 3
        def not_module():
            return 3
        class Raw(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(3, 1)
            def forward(self, x, y):
                return self.lin(x)
    """))
    save_file(extra_raw_state(), plain / "raw.safetensors")
    fail(["rmed", "mlp.safetensors", "--model", "extra:VALUE", "--data", "data.safetensors"], 2, "not callable")
    fail(["rmed", "mlp.safetensors", "--model", "extra:not_module", "--data", "data.safetensors"], 2,
         "not a torch.nn.Module")
    fail(["rmed", "raw.safetensors", "--model", "extra:Raw", "--data", "data.safetensors"], 3, "no scalar loss")
    bad_config = tmp_path / "bad-config"
    shutil.copytree(tiny_gpt2_dir, bad_config)
    (bad_config / "config.json").write_text("{not json")
    fail(["rmed", str(bad_config)], 3, "config.json is not valid JSON")
    bad_tok = tmp_path / "bad-tokenizer"
    shutil.copytree(tiny_gpt2_dir, bad_tok)
    (bad_tok / "tokenizer.json").write_text("{broken")
    fail(["rmed", str(bad_tok)], 3, "cannot load the tokenizer")
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_gpt2_dir, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    fail(["rmed", str(no_tok)], 2, "--data is needed")
    (tmp_path / "lines.txt").write_text("some text\n")
    fail(["rmed", str(no_tok), "--data", str(tmp_path / "lines.txt")], 3, "text data needs a tokenizer")


def extra_raw_state():
    return {"lin.weight": torch.ones(1, 3), "lin.bias": torch.zeros(1)}


def test_more_data_errors(tiny_bert_dir, tiny_gpt2_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "empty.jsonl")], 3, "holds no examples")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    fail(["rmed", str(tiny_gpt2_dir), "--data", str(tmp_path / "latin.txt")], 3, "not UTF-8")
    (tmp_path / "list.jsonl").write_text('["text", 1]\n')
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "list.jsonl")], 3, "line 1 is not a JSON object")
    save_file({}, tmp_path / "nothing.safetensors")
    fail(["rmed", str(tiny_gpt2_dir), "--data", str(tmp_path / "nothing.safetensors")], 3, "holds no tensors")
    save_file({"input_ids": torch.ones(2, 100, dtype=torch.long)}, tmp_path / "long.safetensors")
    fail(["rmed", str(tiny_gpt2_dir), "--data", str(tmp_path / "long.safetensors")], 3, "the model takes at most 64")
    save_file({"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.full((2, 5), -100)},
              tmp_path / "nolabels.safetensors")
    fail(["rmed", str(tiny_gpt2_dir), "--data", str(tmp_path / "nolabels.safetensors")], 3, "leaves no token")
    save_file({"input_ids": torch.ones(2, 5, dtype=torch.long)}, tmp_path / "ids.safetensors")
    no_tok = tmp_path / "bert-no-tokenizer"
    shutil.copytree(tiny_bert_dir, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "special*"))
    fail(["rmed", str(no_tok), "--task", "masked-lm", "--data", str(tmp_path / "ids.safetensors")], 3, "mask token")


def test_library_level_errors():
    import numpy as np

    from geomaudit.engine.stats import diagonal_stats
    from geomaudit.errors import UsageError
    from geomaudit.runtime import set_precision

    with pytest.raises(UsageError, match="--precision must be one of"):
        set_precision("bf16")
    with pytest.raises(ValueError, match="no coordinates"):
        diagonal_stats(np.array([]))


def test_non_finite_hessian_is_an_input_error():
    from geomaudit.engine.audit import audit_checkpoint
    from geomaudit.engine.hdiag import MicroBatch
    from geomaudit.errors import InputError

    weight = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    model = torch.nn.Module()
    model.w = weight

    def loss(m, batch):  # finite at w = (1, 0), but d²/dw² of |w|^1.5 is infinite at 0
        return (m.w.abs() ** 1.5).sum()

    with pytest.raises(InputError, match="Hessian diagonal of w holds non-finite values"):
        audit_checkpoint(model, loss, [MicroBatch({}, 1.0)], ["w"], coords=2, seed=0)


def test_error_messages_keep_brackets(tmp_path):
    """Paths are printed as they are, not read as rich markup."""
    fail(["rmed", str(tmp_path / "run[bold]")], 3, "run[bold] does not exist")


def test_reports_get_the_usual_file_permissions(tmp_path):
    import os

    from geomaudit.report.document import write_json

    write_json({"a": 1}, tmp_path / "r.json")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask


ATTENTION = textwrap.dedent("""
    import torch
    from torch import nn

    class Attn(nn.Module):
        def __init__(self, need_weights):
            super().__init__()
            self.attn, self.out, self.need_weights = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 1), need_weights

        def forward(self, x):
            h, _ = self.attn(x, x, x, need_weights=self.need_weights)
            return self.out(h).mean(1).squeeze(-1)

    def fused():  # need_weights=False: PyTorch's fused SDPA kernel, which has no second derivative
        torch.manual_seed(0)
        return Attn(False).eval()

    def math():
        torch.manual_seed(0)
        return Attn(True).eval()

    def mse(model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()
""")


def test_an_operator_without_a_second_derivative_is_an_input_error(tmp_path, monkeypatch):
    """Found in use: nn.MultiheadAttention(need_weights=False) ended in exit 4; the same model on the math path works."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mha.py").write_text(ATTENTION)
    torch.manual_seed(0)
    parts = {"attn": torch.nn.MultiheadAttention(4, 2, batch_first=True), "out": torch.nn.Linear(4, 1)}
    save_file({f"{name}.{k}": v for name, part in parts.items() for k, v in part.state_dict().items()},
              tmp_path / "m.safetensors")
    save_file({"x": torch.randn(6, 3, 4), "y": torch.randn(6)}, tmp_path / "d.safetensors")
    args = ["m.safetensors", "--loss", "mha:mse", "--data", "d.safetensors", "--coords", "4", "--no-cache"]
    fail(["rmed", *args, "--model", "mha:fused"], 3, "which PyTorch cannot differentiate twice",
         "nn.MultiheadAttention needs need_weights=True")
    result = runner.invoke(app, ["rmed", *args, "--model", "mha:math", "--json", "-"])
    assert result.exit_code == 0, result.output
