"""The task rows beyond language models and sequence classifiers (issue 9, "models that must load"):
encoder-decoders on `text`/`target` or pre-tokenized `labels`, token classification, image classification from
tensors and from an image folder. Oracles: each test tokenizes or processes the data itself, writes the loss
out (shifted decoder inputs, word-aligned labels), and takes its dense Hessian; transformers' own loss checks
the formula.
"""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from geomaudit.io.precision import KeepFloat64
from geomaudit.io.tasks import IGNORE_INDEX
from tests.cli.invoke import report, run
from tests.conftest import _bert_tokenizer, _gpt2_tokenizer, example_rows
from tests.engine.test_hdiag import rel_err
from tests.inputs.test_precision import dense_diag


def layer_args(*names: str) -> list[str]:
    return [a for name in names for a in ("--layers", name)]


# ---------------------------------------------------------------- encoder-decoders

def _seq2seq(kind: str, folder):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    tok = _gpt2_tokenizer()  # byte-level BPE; token 0 is the end of text and the padding
    common = {"vocab_size": len(tok), "pad_token_id": 0, "eos_token_id": 0, "decoder_start_token_id": 0}
    torch.manual_seed(0)
    if kind == "t5":
        model = T5ForConditionalGeneration(T5Config(d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                                    architectures=["T5ForConditionalGeneration"], **common))
    else:
        model = BartForConditionalGeneration(BartConfig(
            d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=64, bos_token_id=0,
            architectures=["BartForConditionalGeneration"], **common))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


SEQ2SEQ_LAYERS = {"t5": ("encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.1.EncDecAttention.v.weight",
                         "shared.weight"),
                  "bart": ("model.encoder.layers.0.self_attn.k_proj.weight", "model.decoder.layers.0.fc1.bias",
                           "model.shared.weight")}


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_decoder_on_text_and_target(kind, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    folder = tmp_path / kind
    tok = _seq2seq(kind, folder)
    rows = []
    for r in example_rows()[:10]:
        words = r["text"].split()
        rows.append({"text": " ".join(words[:8]), "target": " ".join(words[8:8 + 1 + len(rows) % 5])})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ("rmed", str(folder), "--data", str(tmp_path / "pairs.jsonl"), "--precision", "fp64", "--coords", "10",
            *layer_args(*SEQ2SEQ_LAYERS[kind]))
    whole = report(*args)
    assert whole["model"]["task"] == "seq2seq-lm" and whole["model"]["initialised"] == []
    assert whole["data"]["selection"] == "all 10 examples"

    src = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    tgt = tok([r["target"] for r in rows], padding=True, return_tensors="pt")
    labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, IGNORE_INDEX)
    decoder_ids = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], 1).clamp(min=0)  # shifted right
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, attn_implementation="eager").double().eval()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(p):
        from torch.func import functional_call

        with KeepFloat64():
            logits = functional_call(model, p, (), {"input_ids": src["input_ids"],
                                                    "attention_mask": src["attention_mask"],
                                                    "decoder_input_ids": decoder_ids}).logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    with torch.no_grad():
        assert whole["checkpoints"][0]["loss"] == pytest.approx(float(loss_of(params)), rel=1e-13)
        own = model.float()(input_ids=src["input_ids"], attention_mask=src["attention_mask"], labels=labels).loss
        assert whole["checkpoints"][0]["loss"] == pytest.approx(float(own), rel=1e-5)  # transformers' formula
        model.double()
    assert whole["data"]["loss_items"] == int((labels != IGNORE_INDEX).sum())
    for layer in whole["checkpoints"][0]["layers"]:
        assert rel_err(layer["h_diag"], dense_diag(loss_of, params, layer["name"], layer["indices"])) <= 1e-10

    split = report(*args, "--micro-batch", "3")  # pieces of different target lengths, weighted by tokens
    for a, b in zip(whole["checkpoints"][0]["layers"], split["checkpoints"][0]["layers"]):
        assert rel_err(b["h_diag"], a["h_diag"]) <= 1e-10
    save_file({"input_ids": src["input_ids"], "attention_mask": src["attention_mask"], "labels": labels},
              tmp_path / "pairs.safetensors")
    tensors = report("rmed", str(folder), "--data", str(tmp_path / "pairs.safetensors"), *args[4:])
    for a, b in zip(whole["checkpoints"][0]["layers"], tensors["checkpoints"][0]["layers"]):
        assert rel_err(b["h_diag"], a["h_diag"]) <= 1e-12

    (tmp_path / "no-target.jsonl").write_text(json.dumps({"text": "a source without a target"}) + "\n")
    assert "needs a `target` text" in run("rmed", str(folder), "--data", str(tmp_path / "no-target.jsonl"),
                                          code=3).stderr


# ---------------------------------------------------------------- token classification

def test_token_classifier_on_labels_per_word(tmp_path):
    from transformers import BertConfig, BertForTokenClassification

    folder, tok = tmp_path / "tagger", _bert_tokenizer()
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(
        vocab_size=len(tok), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=64, num_labels=3, architectures=["BertForTokenClassification"]))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = []
    for n, r in enumerate(example_rows()[:9]):
        words = r["text"].split()[:6 + n % 4]
        rows.append({"text": " ".join(words), "label": [(len(w) + n) % 3 for w in words]})
    (tmp_path / "tags.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ("rmed", str(folder), "--data", str(tmp_path / "tags.jsonl"), "--precision", "fp64", "--coords", "10",
            *layer_args("classifier.weight", "bert.encoder.layer.0.output.dense.weight"))
    whole = report(*args)
    assert whole["model"]["task"] == "token-classification"

    enc = tok([r["text"].split() for r in rows], is_split_into_words=True, padding=True, return_tensors="pt")
    labels = torch.full_like(enc["input_ids"], IGNORE_INDEX)
    for i, r in enumerate(rows):  # the first token of each word carries the word's label
        seen = set()
        for j, w in enumerate(enc.word_ids(i)):
            if w is not None and w not in seen:
                seen.add(w)
                labels[i, j] = r["label"][w]
    model = model.double().eval()
    model.set_attn_implementation("eager")
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(p):
        from torch.func import functional_call

        logits = functional_call(model, p, (), {k: v for k, v in enc.items()}).logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    with torch.no_grad():
        assert whole["checkpoints"][0]["loss"] == pytest.approx(float(loss_of(params)), rel=1e-13)
        assert whole["checkpoints"][0]["loss"] == pytest.approx(float(model(**enc, labels=labels).loss), rel=1e-12)
    assert whole["data"]["loss_items"] == sum(len(r["label"]) for r in rows)
    for layer in whole["checkpoints"][0]["layers"]:
        assert rel_err(layer["h_diag"], dense_diag(loss_of, params, layer["name"], layer["indices"])) <= 1e-10
    split = report(*args, "--micro-batch", "4")
    for a, b in zip(whole["checkpoints"][0]["layers"], split["checkpoints"][0]["layers"]):
        assert rel_err(b["h_diag"], a["h_diag"]) <= 1e-10

    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "three little words", "label": [0, 1]}) + "\n")
    assert "has 3 words but 2 labels" in run("rmed", str(folder), "--data", str(tmp_path / "short.jsonl"),
                                             code=3).stderr
    (tmp_path / "far.jsonl").write_text(json.dumps({"text": "three little words", "label": [0, 1, 5]}) + "\n")
    assert "labels outside 0..2" in run("rmed", str(folder), "--data", str(tmp_path / "far.jsonl"), code=3).stderr


# ---------------------------------------------------------------- image classification

CLASSES = ("bird", "cat", "dog")


@pytest.fixture
def vision(tmp_path):
    """A ViT with its image processor, and a folder of 7 PNG images in class folders named after its labels."""
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    folder = tmp_path / "vit"
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=16, num_labels=3, architectures=[
                           "ViTForImageClassification"], id2label=dict(enumerate(CLASSES)),
                       label2id={c: i for i, c in enumerate(CLASSES)})
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 8, "width": 8}).save_pretrained(folder)
    rng = np.random.default_rng(0)
    for n in range(7):
        (tmp_path / "images" / CLASSES[n % 3]).mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((10 + n, 12, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(tmp_path / "images" / CLASSES[n % 3] / f"{n}.png")
    return folder, tmp_path / "images"


def test_image_classifier_on_an_image_folder_and_on_tensors(vision, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, ViTForImageClassification

    folder, images = vision
    args = ("--precision", "fp64", "--coords", "10",
            *layer_args("classifier.weight", "vit.layers.0.attention.q_proj.weight"))
    document = report("rmed", str(folder), "--data", str(images), *args)
    assert document["model"]["task"] == "image-classification" and document["model"]["initialised"] == []
    assert document["data"]["shapes"]["pixel_values"] == [7, 3, 8, 8]

    files = sorted(images.glob("*/*.png"))
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([CLASSES.index(f.parent.name) for f in files])
    model = ViTForImageClassification.from_pretrained(folder, attn_implementation="eager").double().eval()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(p):
        from torch.func import functional_call

        with KeepFloat64():
            logits = functional_call(model, p, (), {"pixel_values": pixels.double()}).logits
        return F.cross_entropy(logits, labels)

    with torch.no_grad():
        assert document["checkpoints"][0]["loss"] == pytest.approx(float(loss_of(params)), rel=1e-13)
    for layer in document["checkpoints"][0]["layers"]:
        assert rel_err(layer["h_diag"], dense_diag(loss_of, params, layer["name"], layer["indices"])) <= 1e-10
    save_file({"pixel_values": pixels, "labels": labels}, tmp_path / "pixels.safetensors")
    tensors = report("rmed", str(folder), "--data", str(tmp_path / "pixels.safetensors"), *args)
    assert tensors["data"]["fingerprint"] == document["data"]["fingerprint"]


def test_headless_vision_model_gets_a_seeded_image_head(vision, tmp_path):
    from transformers import ViTModel

    folder, images = vision
    headless = tmp_path / "headless"
    ViTModel.from_pretrained(folder, add_pooling_layer=False).save_pretrained(headless)
    (headless / "preprocessor_config.json").write_text((folder / "preprocessor_config.json").read_text())
    for n, name in enumerate(CLASSES):  # class folders named by number: a new head has no label names
        (images / name).rename(images / str(n))
    document = report("rmed", str(headless), "--data", str(images), "--coords", "4", "--layers", "classifier.*")
    assert document["model"]["class"] == "ViTForImageClassification"
    assert document["model"]["task"] == "image-classification"
    assert document["model"]["initialised"] == ["classifier.bias", "classifier.weight"]
    assert [layer["shape"] for layer in document["checkpoints"][0]["layers"]] == [[3, 8], [3]]


def test_image_folder_errors(vision, tmp_path, monkeypatch):
    folder, images = vision
    bare = tmp_path / "no-processor"
    bare.mkdir()
    for f in folder.iterdir():
        if f.name != "preprocessor_config.json":
            (bare / f.name).write_bytes(f.read_bytes())
    assert "needs the checkpoint's image processor" in run("rmed", str(bare), "--data", str(images), code=3).stderr
    (images / "cat" / "broken.png").write_bytes(b"not an image")
    assert "cannot read the image" in run("rmed", str(folder), "--data", str(images), code=3).stderr
    (images / "cat" / "broken.png").unlink()
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    assert "needs Pillow" in run("rmed", str(folder), "--data", str(images), code=2).stderr
