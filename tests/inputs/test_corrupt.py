"""Corrupt checkpoints and data are input errors (exit 3) with one sentence, never internal errors (issue 10)."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from ..cli.invoke import run

GPT2 = ["--coords", "2", "--layers", "transformer.h.0.ln_1.*", "--no-cache"]
BERT = ["--coords", "2", "--layers", "classifier.*", "--no-cache"]


def fails(*args, phrase: str, code: int = 3) -> str:
    stderr = run(*args, code=code).stderr
    assert phrase in stderr and stderr.strip().count("\n") <= 2, stderr  # status lines, then the one error
    assert stderr.splitlines()[-1].startswith("error: ")
    return stderr


# ---------------------------------------------------------------- tensor data

@pytest.mark.parametrize("tensors, phrase", [
    ({"input_ids": torch.ones(4, dtype=torch.long)}, "input_ids has shape (4,); expected (examples, tokens)"),
    ({"input_ids": torch.ones(4, 0, dtype=torch.long)}, "input_ids has shape (4, 0)"),
    ({"input_ids": torch.ones(4, 3)}, "input_ids holds float32 values; token ids and masks are integers"),
    ({"input_ids": torch.ones(4, 3, dtype=torch.bool)}, "input_ids holds bool values"),
    ({"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 4, dtype=torch.long)},
     "the token tensors differ in shape: input_ids (4, 3), attention_mask (4, 4)"),
    ({"attention_mask": torch.ones(4, 3, dtype=torch.long)}, "the data has no input_ids (it has attention_mask)"),
    ({"input_ids": torch.full((2, 3), -5)}, "has a negative token id (-5)"),
    ({"input_ids": torch.ones(4, 3, dtype=torch.long), "labels": torch.ones(4, dtype=torch.long)},
     "has labels of shape (4,) for input_ids of shape (4, 3): a language model takes one label per token"),
    ({"labels": torch.ones(4, 3, dtype=torch.long)}, "the data has no input_ids (it has labels)"),
])
def test_token_tensors_of_the_wrong_kind(tiny_gpt2_dir, tmp_path, tensors, phrase):
    save_file(tensors, tmp_path / "data.safetensors")
    fails("rmed", str(tiny_gpt2_dir), *GPT2, "--data", str(tmp_path / "data.safetensors"), phrase=phrase)


@pytest.mark.parametrize("make, phrase", [
    (lambda: {"input_ids": torch.ones(4, 3, dtype=torch.long).to_sparse()}, "input_ids is a sparse_coo tensor"),
    (lambda: {"input_ids": torch.empty(4, 3, dtype=torch.long, device="meta")}, "input_ids is a meta tensor"),
    (lambda: {"input_ids": torch.ones(4, 3, dtype=torch.complex64)}, "input_ids holds complex numbers"),
    (lambda: {1: torch.ones(4, 3, dtype=torch.long)}, "does not hold a state dict"),
])
def test_tensors_that_cannot_be_a_batch(tiny_gpt2_dir, tmp_path, make, phrase):
    torch.save(make(), tmp_path / "data.pt")
    fails("rmed", str(tiny_gpt2_dir), *GPT2, "--data", str(tmp_path / "data.pt"), phrase=phrase)


# ---------------------------------------------------------------- text data

@pytest.mark.parametrize("name, content, phrase", [
    ("empty.txt", "", "holds no examples"),
    ("blank.txt", "\n \r\n\r", "holds no examples"),
    ("surrogate.jsonl", '{"text": "ok \\ud800"}\n', "the text of example 1 holds a lone surrogate (U+D800)"),
    ("number.jsonl", '{"text": 3}\n', "the text of example 1 is a int, not a string"),
    ("nan.jsonl", '{"text": "a", "label": NaN}\n', "line 1 is not valid JSON (NaN is not a JSON number)"),
    ("deep.jsonl", "[" * 100_000 + "\n", "line 1 is not valid JSON (nested too deeply)"),
    ("short.csv", "text,label\nfine,0\n", None),
    ("missing.csv", "text,label\n\n", "holds no examples"),
    ("nocell.csv", "label,text\n0\n", "every example needs a `text` field (example 1 has none)"),
    ("quote.csv", "text\n\"unterminated\n", "is not valid CSV (unexpected end of data)"),
    ("stray.csv", "text\n\"a\"b\n", "is not valid CSV ("),
    ("space.jsonl", '{"text": ""}\n', "tokenize to zero tokens"),
])
def test_text_data_errors(tiny_gpt2_dir, tmp_path, name, content, phrase):
    (tmp_path / name).write_text(content)
    args = ("rmed", str(tiny_gpt2_dir), *GPT2, "--data", str(tmp_path / name))
    if phrase is None:
        run(*args)
    else:
        fails(*args, phrase=phrase)


def test_unicode_line_separators_are_text_not_line_ends(tiny_gpt2_dir, tmp_path):
    """str.splitlines splits at U+2028, U+2029, \\x85 …; JSON Lines and text files end lines at \\n only."""
    text = "before\u2028middle\u2029after\x85end"
    (tmp_path / "sep.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n" +
                                        json.dumps({"text": "second"}) + "\r\n")
    (tmp_path / "sep.txt").write_text(text + "\nsecond\r\n")
    for name in ("sep.jsonl", "sep.txt"):
        document = json.loads(run("rmed", str(tiny_gpt2_dir), *GPT2, "--data", str(tmp_path / name),
                                  "--json", "-").stdout)
        assert document["data"]["examples"] == 2, name


def test_a_csv_field_longer_than_the_csv_module_allows(tiny_gpt2_dir, tmp_path):
    (tmp_path / "long.csv").write_text('text\n"' + "word " * 40_000 + '"\nsecond\n')
    document = json.loads(run("rmed", str(tiny_gpt2_dir), *GPT2, "--data", str(tmp_path / "long.csv"),
                              "--json", "-").stdout)
    assert document["data"]["examples"] == 2


def test_labels_beyond_int64(tiny_bert_dir, tmp_path):
    from geomaudit.errors import InputError
    from geomaudit.io.tasks import label_ids

    (tmp_path / "labels.jsonl").write_text(f'{{"text": "a b", "label": 0}}\n{{"text": "c", "label": {2**63}}}\n')
    fails("rmed", str(tiny_bert_dir), *BERT, "--data", str(tmp_path / "labels.jsonl"),
          phrase="the data has a label of 9223372036854775808")
    with pytest.raises(InputError, match="label 9223372036854775808 is out of range"):
        label_ids([0, 2**63], None)
    with pytest.raises(InputError, match="label inf is neither an integer"):
        label_ids([float("inf")], None)


def test_a_tokenizer_that_cannot_tokenize(tiny_bert_dir, tmp_path, examples_jsonl):
    broken = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    (broken / "tokenizer_config.json").write_text(json.dumps(config | {"unk_token": "\u0000"}))
    fails("rmed", str(broken), *BERT, "--data", str(examples_jsonl),
          phrase="the checkpoint's tokenizer cannot tokenize the data")


# ---------------------------------------------------------------- checkpoints

def test_architectures_that_are_not_class_names(tiny_gpt2_dir, tmp_path):
    broken = tmp_path / "gpt2"
    shutil.copytree(tiny_gpt2_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    for value in ([1], [{"x": "GPT2LMHeadModel"}], "GPT2LMHeadModel"):
        (broken / "config.json").write_text(json.dumps(config | {"architectures": value}))
        fails("rmed", str(broken), *GPT2, phrase="architectures must be a list of class names")
    (broken / "config.json").write_text("[1, 2]")
    fails("rmed", str(broken), *GPT2, phrase="config.json is not a JSON object")


@pytest.fixture
def sharded(tiny_gpt2_dir, tmp_path):
    from transformers import GPT2LMHeadModel

    folder = tmp_path / "sharded"
    GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).save_pretrained(folder, max_shard_size="30KB")
    for f in tiny_gpt2_dir.glob("tokenizer*"):
        shutil.copy(f, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder, index


def _with_shard(folder, index, shard: str) -> None:
    first = sorted(set(index["weight_map"].values()))[0]
    weight_map = {k: shard if v == first else v for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index | {"weight_map": weight_map}))


def test_shards_outside_the_checkpoint_folder_are_refused(sharded, tmp_path):
    folder, index = sharded
    run("rmed", str(folder), *GPT2)
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(folder / first, tmp_path / "outside.safetensors")
    for shard in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "sub/../../outside.safetensors",
                  "", "."):
        _with_shard(folder, index, shard)
        fails("rmed", str(folder), *GPT2, phrase=f"the shard named in model.safetensors.index.json {shard!r} lies "
                                                  f"outside the checkpoint folder {folder}")
    _with_shard(folder, index, "a\0b")
    fails("rmed", str(folder), *GPT2, phrase="is not a valid path")


def test_shards_that_are_not_regular_files_are_refused(sharded):
    folder, index = sharded
    (folder / "zero.safetensors").symlink_to("/dev/zero")
    _with_shard(folder, index, "zero.safetensors")  # reading it would never end
    fails("rmed", str(folder), *GPT2, phrase="zero.safetensors is not a regular file")
    os.mkfifo(folder / "fifo.safetensors")
    _with_shard(folder, index, "fifo.safetensors")
    fails("rmed", str(folder), *GPT2, phrase="fifo.safetensors is not a regular file")
    _with_shard(folder, index, "absent.safetensors")
    fails("rmed", str(folder), *GPT2, phrase="absent.safetensors does not exist")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index | {"weight_map": {"a": 1}}))
    fails("rmed", str(folder), *GPT2, phrase="is not a sharded index: its weight_map is not a mapping")
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model.safetensors").symlink_to("/dev/zero")
    fails("rmed", str(folder), *GPT2, phrase="the weights file")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(folder / "fifo.safetensors")
    fails("rmed", str(folder), *GPT2, phrase="the weights file")


def test_the_cache_key_covers_every_shard(sharded, tmp_path):
    """Changing a shard's weights changes the audit, never served from the cache of the old ones."""
    folder, index = sharded
    cache = ["--cache-dir", str(tmp_path / "cache")]
    args = ("rmed", str(folder), "--coords", "2", "--layers", "transformer.h.1.*", *cache, "--json", "-")
    first = json.loads(run(*args).stdout)
    shard = folder / index["weight_map"]["transformer.h.1.mlp.c_fc.weight"]
    from safetensors.torch import load_file

    weights = load_file(shard)
    weights["transformer.h.1.mlp.c_fc.weight"] *= 2
    save_file(weights, shard, metadata={"format": "pt"})
    second = json.loads(run(*args).stdout)
    assert not any(la["cached"] for la in second["checkpoints"][0]["layers"])
    assert second["checkpoints"][0]["loss"] != first["checkpoints"][0]["loss"]


def test_cache_digest_of_the_files_loaded(tmp_path):
    """The key hashes the files transformers reads: config.json and the shards the index names, no others."""
    from geomaudit.cache import checkpoint_digest
    from geomaudit.io.formats import model_files

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "a.safetensors").write_bytes(b"a")
    (tmp_path / "b.safetensors").write_bytes(b"b")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    assert [f.name for f in model_files(tmp_path)] == ["config.json", "model.safetensors.index.json",
                                                       "a.safetensors"]
    before = checkpoint_digest(tmp_path)
    (tmp_path / "b.safetensors").write_bytes(b"changed")  # not loaded: not in the key
    assert checkpoint_digest(tmp_path) == before
    (tmp_path / "a.safetensors").write_bytes(b"changed")
    assert checkpoint_digest(tmp_path) != before


# ---------------------------------------------------------------- options

def test_devices_and_seeds_torch_cannot_use(tiny_gpt2_dir):
    fails("rmed", str(tiny_gpt2_dir), *GPT2, "--device", "meta", code=2,
          phrase="--device meta: audits run on cpu or cuda, not meta")
    for seed in ("-1", str(2**64)):
        fails("rmed", str(tiny_gpt2_dir), *GPT2, "--seed", seed, code=2, phrase=f"--seed must lie in 0 … 2**64 - 1, "
                                                                             f"got {seed}")
    fails("demo", "--seed", "-1", code=2, phrase="--seed must lie in")


def test_an_output_path_ending_in_a_slash_is_a_folder(tiny_gpt2_dir, tmp_path):
    fails("rmed", str(tiny_gpt2_dir), *GPT2, "--json", f"{tmp_path}/r.json/", code=2,
          phrase="give a file name, not a folder")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- adapters

@pytest.fixture
def lora(tiny_gpt2_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir),
                           LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text()) | {"base_model_name_or_path": str(tiny_gpt2_dir)}
    config_path.write_text(json.dumps(config))
    return tmp_path / "adapter", config


def test_an_adapter_peft_cannot_merge(lora):
    folder, config = lora
    (folder / "adapter_config.json").write_text(json.dumps(config | {"alora_invocation_tokens": [1]}))
    fails("rmed", str(folder), *GPT2, "--merge", phrase=f"the adapter {folder} cannot be merged into its base model")


def test_peft_notes_about_a_config_stay_off_stderr(lora):
    """peft fixes fan_in_fan_out for GPT-2's Conv1D with a UserWarning: not a line for the user."""
    folder, config = lora
    (folder / "adapter_config.json").write_text(json.dumps(config | {"fan_in_fan_out": False,
                                                                     "a_future_option": 1}))
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # what would reach stderr outside pytest
        warnings.simplefilter("always")
        run("rmed", str(folder), "--coords", "2", "--layers", "*lora_A*", "--no-cache", "--json", "-")
    assert not [w for w in caught if "peft" in w.filename], [str(w.message) for w in caught]
