"""fp64 that is fp64 (issue 9, item 5), against hand-written fp64 forwards of Llama (GQA) and ViT.

transformers computes Llama's RMSNorm, rotary angles and the eager softmax of Llama and ViT in float32 even
in a float64 model. The oracles here are independent forwards written with plain torch ops in float64 (from
the model's own parameters and RoPE frequencies); their dense Hessians (``torch.autograd.functional.hessian``)
are compared with what ``geomaudit rmed --precision fp64`` reports.
"""

import math
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from geomaudit.io.precision import KeepFloat64, float32_modules
from geomaudit.io.tasks import IGNORE_INDEX, TASKS
from tests.cli.invoke import report, run
from tests.engine.test_hdiag import rel_err

LLAMA_LAYERS = ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.input_layernorm.weight",
                "model.norm.weight")
VIT_LAYERS = ("vit.layers.0.attention.q_proj.weight", "vit.layers.0.layernorm_before.weight")


# ---------------------------------------------------------------- Llama with grouped-query attention

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as Llama tokenizers pad
    mask[1, :1] = 0
    save_file({"input_ids": ids * mask, "attention_mask": mask}, folder / "left.safetensors")
    return folder


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x):
    a, b = x.chunk(2, -1)
    return torch.cat((-b, a), -1)


def llama_loss(P: dict, config, inv_freq, ids, mask):
    """Llama's forward and next-token loss, written out in float64; no token is predicted from padding."""
    B, T = ids.shape
    H, KV, eps = config.num_attention_heads, config.num_key_value_heads, config.rms_norm_eps
    D = config.hidden_size // H
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    x = P["model.embed_tokens.weight"][ids]
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = _rms(x, P[p + "input_layernorm.weight"], eps)
        q, k, v = ((h @ P[p + f"self_attn.{n}_proj.weight"].T).view(B, T, -1, D).transpose(1, 2) for n in "qkv")
        q, k = q * cos + _rotate(q) * sin, k * cos + _rotate(k) * sin
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, torch.finfo(torch.float64).min)
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D) @ P[p + "self_attn.o_proj.weight"].T
        h = _rms(x, P[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ P[p + "mlp.gate_proj.weight"].T, h @ P[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ P[p + "mlp.down_proj.weight"].T
    logits = _rms(x, P["model.norm.weight"], eps) @ P["lm_head.weight"].T
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, 1:][mask[:, :-1] == 0] = IGNORE_INDEX
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def dense_diag(loss_of, params: dict, name: str, indices) -> np.ndarray:
    """Oracle: the dense Hessian of ``loss_of(params)`` with respect to the whole tensor ``name``."""
    base = params[name].detach().reshape(-1)

    def f(flat):
        return loss_of(params | {name: flat.reshape(params[name].shape)})

    return torch.autograd.functional.hessian(f, base).diagonal()[torch.as_tensor(indices)].numpy()


def test_llama_fp64_is_fp64_with_left_padding(llama):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    document = report("rmed", str(llama), "--data", str(llama / "left.safetensors"), "--precision", "fp64",
                      "--coords", "12", *[a for name in LLAMA_LAYERS for a in ("--layers", name)])
    model = AutoModelForCausalLM.from_pretrained(llama, attn_implementation="eager").double().eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    data = load_file(llama / "left.safetensors")
    inv_freq = model.model.rotary_emb.inv_freq.double()

    def loss_of(p):
        return llama_loss(p, model.config, inv_freq, data["input_ids"], data["attention_mask"])

    with torch.no_grad():
        assert document["checkpoints"][0]["loss"] == pytest.approx(float(loss_of(params)), rel=1e-13)
    for layer in document["checkpoints"][0]["layers"]:
        oracle = dense_diag(loss_of, params, layer["name"], layer["indices"])
        assert rel_err(layer["h_diag"], oracle) <= 1e-10, layer["name"]
    assert document["model"]["float32_modules"] == []

    batch = TASKS["causal-lm"].prepare(dict(data), None, None, 0)
    with torch.no_grad():  # the model as transformers runs it: float32 inside, NaN from the padded rows
        assert math.isnan(float(TASKS["causal-lm"].loss(model, batch)))
        with KeepFloat64():
            assert float(TASKS["causal-lm"].loss(model, batch)) == pytest.approx(float(loss_of(params)), rel=1e-13)


# ---------------------------------------------------------------- ViT

@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path_factory.mktemp("vit")
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=16, num_labels=3,
                       architectures=["ViTForImageClassification"])
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(folder)
    g = torch.Generator().manual_seed(2)
    save_file({"pixel_values": torch.randn(5, 3, 8, 8, generator=g), "labels": torch.tensor([0, 2, 1, 1, 0])},
              folder / "images.safetensors")
    return folder


def vit_loss(P: dict, config, pixels, labels):
    """ViT's forward (pre-norm blocks, CLS token) and cross-entropy, written out in float64."""
    eps, H = config.layer_norm_eps, config.num_attention_heads
    e = "vit.embeddings."
    x = F.conv2d(pixels, P[e + "patch_embeddings.projection.weight"], P[e + "patch_embeddings.projection.bias"],
                 stride=config.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat((P[e + "cls_token"].expand(len(x), -1, -1), x), 1) + P[e + "position_embeddings"]
    B, T, C = x.shape
    for layer in range(config.num_hidden_layers):
        p = f"vit.layers.{layer}."

        def lin(name, h):
            return h @ P[p + name + ".weight"].T + P[p + name + ".bias"]

        h = F.layer_norm(x, (C,), P[p + "layernorm_before.weight"], P[p + "layernorm_before.bias"], eps)
        q, k, v = (lin(f"attention.{n}_proj", h).view(B, T, H, -1).transpose(1, 2) for n in "qkv")
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(C // H)).softmax(-1) @ v
        x = x + lin("attention.o_proj", a.transpose(1, 2).reshape(B, T, C))
        h = F.layer_norm(x, (C,), P[p + "layernorm_after.weight"], P[p + "layernorm_after.bias"], eps)
        x = x + lin("mlp.fc2", F.gelu(lin("mlp.fc1", h)))
    x = F.layer_norm(x, (C,), P["vit.layernorm.weight"], P["vit.layernorm.bias"], eps)
    return F.cross_entropy(x[:, 0] @ P["classifier.weight"].T + P["classifier.bias"], labels)


def test_vit_fp64_is_fp64(vit):
    from safetensors.torch import load_file
    from transformers import ViTForImageClassification

    document = report("rmed", str(vit), "--data", str(vit / "images.safetensors"), "--precision", "fp64",
                      "--coords", "12", *[a for name in VIT_LAYERS for a in ("--layers", name)])
    model = ViTForImageClassification.from_pretrained(vit, attn_implementation="eager").double().eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    data = load_file(vit / "images.safetensors")

    def loss_of(p):
        return vit_loss(p, model.config, data["pixel_values"].double(), data["labels"])

    with torch.no_grad():
        assert document["checkpoints"][0]["loss"] == pytest.approx(float(loss_of(params)), rel=1e-13)
    for layer in document["checkpoints"][0]["layers"]:
        oracle = dense_diag(loss_of, params, layer["name"], layer["indices"])
        assert rel_err(layer["h_diag"], oracle) <= 1e-10, layer["name"]
    assert document["model"]["float32_modules"] == []
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in data.items()}
    with torch.no_grad():  # without KeepFloat64, transformers' eager softmax runs in float32: the check can fail
        exact = float(loss_of(params))
        assert abs(float(model(**batch).loss) - exact) / exact > 1e-12
        with KeepFloat64():
            assert float(model(**batch).loss) == pytest.approx(exact, rel=1e-14)
    assert float32_modules(model, lambda m, b: m(**b).loss, batch) == []


# ---------------------------------------------------------------- what cannot be made fp64 is reported

LOW_PRECISION = textwrap.dedent("""
    import numpy as np
    import torch
    from torch import nn

    class Scale(nn.Module):
        def forward(self, x):  # a constant computed in float32 from numpy, which no dtype request reaches
            return x * torch.from_numpy(np.linspace(-1, 1, x.shape[-1], dtype=np.float32)).exp()

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), Scale(), nn.Tanh(), nn.Linear(4, 1))

    def mse(model, batch):
        return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
""")


def test_modules_that_stay_below_float64_are_reported(tmp_path, monkeypatch):
    """A constant computed from a float32 numpy array escapes KeepFloat64: the report, the table and stderr say
    so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lowprec.py").write_text(LOW_PRECISION)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Identity(), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    save_file(net.state_dict(), "net.safetensors")
    save_file({"x": torch.randn(6, 3), "y": torch.randn(6)}, "data.safetensors")
    args = ("rmed", "net.safetensors", "--model", "lowprec:build", "--loss", "lowprec:mse", "--data",
            "data.safetensors", "--coords", "4")
    fp64 = report(*args, "--precision", "fp64")
    assert fp64["model"]["float32_modules"] == ["1 (Scale)"]
    assert report(*args)["model"]["float32_modules"] is None  # an fp32 audit is not checked
    result = run(*args, "--precision", "fp64")
    assert "1 module(s) computed below float64" in result.stderr and "1 (Scale)" in result.stderr
    assert "not fp64 throughout" in result.stdout and "1 (Scale)" in result.stdout
