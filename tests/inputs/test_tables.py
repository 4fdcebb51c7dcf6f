"""Data from .json, .parquet and datasets save_to_disk folders: the same batch, fingerprint and H_ii as the .jsonl
and pre-tokenized tensors they hold, and every error of tables.py."""

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from geomaudit.errors import InputError
from geomaudit.io.tables import rows_to_tensors
from tests.cli.invoke import report
from tests.cli.test_errors import fail
from tests.conftest import example_rows

BERT_LAYER = "bert.encoder.layer.1.output.LayerNorm.weight"


def audit(checkpoint, data, *extra) -> dict:
    document = report("rmed", str(checkpoint), "--data", str(data), "--layers", BERT_LAYER, "--coords", "6",
                      "--batch-size", "5", *extra)
    return {"data": document["data"]["fingerprint"], "h": document["checkpoints"][0]["layers"][0]["h_diag"]}


def test_table_formats_agree_with_jsonl(tiny_bert_dir, examples_jsonl, tmp_path):
    import datasets
    import pyarrow
    import pyarrow.parquet

    rows = example_rows()
    reference = audit(tiny_bert_dir, examples_jsonl)
    files = {"array.json": rows, "field.json": {"version": "1.0", "data": rows},
             "columns.json": {k: [r[k] for r in rows] for k in rows[0]}}
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "data.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    for data in [*files, "lines.json", "data.parquet", "saved"]:
        assert audit(tiny_bert_dir, tmp_path / data) == reference, data


def _tokenized_rows(tiny_bert_dir, keep_mask: bool) -> list[dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    rows = []
    for r in example_rows():
        enc = tok(r["text"], truncation=True, max_length=128)
        rows.append({"text": r["text"], "input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
                     "label": r["label"]} | ({"attention_mask": enc["attention_mask"]} if keep_mask else {}))
    return rows


@pytest.mark.parametrize("keep_mask", [True, False])
def test_a_pretokenized_dataset_is_the_tokenized_batch(tiny_bert_dir, examples_jsonl, tmp_path, keep_mask):
    """Ragged token rows padded on the right are the batch the tokenizer pads from the text: same fingerprint
    (all 62 rows: a sample of them would be padded to its own longest row by the tokenizer)."""
    import datasets

    datasets.Dataset.from_list(_tokenized_rows(tiny_bert_dir, keep_mask)).save_to_disk(tmp_path / "tokens")
    assert audit(tiny_bert_dir, tmp_path / "tokens", "--batch-size", "62") == \
        audit(tiny_bert_dir, examples_jsonl, "--batch-size", "62")


def test_pretokenized_rows_for_a_language_model(tiny_gpt2_dir, tmp_path):
    """Causal LM rows without a mask: padding gets attention 0 and labels -100, so it takes no part in the loss."""
    rows = [{"input_ids": [5, 9, 14, 3, 7]}, {"input_ids": [8, 2, 6]}, {"input_ids": [11, 4, 13, 9]}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    ids = torch.tensor([[5, 9, 14, 3, 7], [8, 2, 6, 0, 0], [11, 4, 13, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    save_file({"input_ids": ids, "attention_mask": mask}, tmp_path / "explicit.safetensors")
    args = ("--layers", "transformer.h.0.attn.c_attn.bias", "--coords", "8", "--precision", "fp64")
    via_rows = report("rmed", str(tiny_gpt2_dir), "--data", str(tmp_path / "rows.json"), *args)
    explicit = report("rmed", str(tiny_gpt2_dir), "--data", str(tmp_path / "explicit.safetensors"), *args)
    assert via_rows["checkpoints"][0]["layers"][0]["h_diag"] == explicit["checkpoints"][0]["layers"][0]["h_diag"]
    assert via_rows["data"]["loss_items"] == 4 + 2 + 3


def test_rows_to_tensors():
    tensors = rows_to_tensors([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "label": 1, "note": "x"},
                               {"input_ids": [4], "labels": [4], "label": 0, "note": "y"}], "t")
    assert set(tensors) == {"input_ids", "labels", "label", "attention_mask"}
    assert tensors["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    assert tensors["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert rows_to_tensors([{"input_ids": [1, 2], "label": 3}], "t")["labels"].tolist() == [3]
    bad = {"do not all have the same columns": [{"input_ids": [1]}, {"input_ids": [1], "x": 2}],
           "mixes numbers with other values": [{"input_ids": [1], "x": 2}, {"input_ids": [1], "x": "a"}],
           "mixes sequences and single values": [{"input_ids": [1], "x": [2]}, {"input_ids": [1], "x": 3}],
           "need numbers in their 'label' column": [{"input_ids": [1], "label": "positive"}],
           "is not a table of numbers": [{"input_ids": [1], "x": [[1, 2]]}, {"input_ids": [1], "x": [[1]]}]}
    for message, rows in bad.items():
        with pytest.raises(InputError, match=message):
            rows_to_tensors(rows, "t")


def test_dataset_dict_asks_for_a_split(tiny_bert_dir, tmp_path):
    import datasets

    rows = example_rows()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:20]),
                          "test": datasets.Dataset.from_list(rows[20:])}).save_to_disk(tmp_path / "dd")
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "dd")], 2,
         "is a DatasetDict with the splits train, test", f"--data {tmp_path / 'dd' / 'train'}")
    assert report("rmed", str(tiny_bert_dir), "--data", str(tmp_path / "dd" / "test"), "--layers", BERT_LAYER,
                  "--coords", "2", "--batch-size", "50")["data"]["examples"] == len(rows) - 20
    (tmp_path / "dd" / "dataset_dict.json").write_text("{broken")
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "dd")], 2, "DatasetDict with the splits test, train")


def test_table_errors(tiny_bert_dir, tmp_path):
    def bad(name: str, content: str | bytes, *phrases: str):
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        fail(["rmed", str(tiny_bert_dir), "--data", str(path)], 3, *phrases)

    bad("x.parquet", "not parquet", "not a valid Parquet file")
    bad("x.json", "[1, 2", "is not valid JSON")
    bad("y.json", "42", "holds no examples: expected a JSON array of objects")
    bad("z.json", '{"a": [1], "b": [1, 2]}', "holds no examples")
    bad("e.json", "[]", "holds no examples")
    bad("l.json", '{"text": "a", "label": 0}\n{"text": oops}\n', "line 2 is not valid JSON")
    bad("u.json", b"\xff\xfe[]", "is not UTF-8 text")
    (tmp_path / "plain").mkdir()
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "plain")], 3, "not a datasets save_to_disk folder")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{broken")
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / "ds")], 3, "cannot read the dataset folder")


@pytest.mark.parametrize("module, data", [("pyarrow", "x.parquet"), ("datasets", "ds")])
def test_missing_data_extra_is_a_usage_error(tiny_bert_dir, tmp_path, monkeypatch, module, data):
    (tmp_path / "x.parquet").write_text("x")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, f"{module}.parquet", None)
    fail(["rmed", str(tiny_bert_dir), "--data", str(tmp_path / data)], 2, f"needs {module}",
         "pip install 'geomaudit[data]'")
