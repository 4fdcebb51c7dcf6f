"""``--split-fused`` on the command line and in ``GeometryCallback``: block layers in the table and JSON, notes,
refusals, the cache key and ``compare`` per block. The H_ii per block against a dense oracle:
``tests/engine/test_fused_audit.py``; the layout table: ``tests/engine/test_fused.py``."""

import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from geomaudit.integrations import GeometryCallback

from .invoke import report, run

ATTN = "transformer.h.0.attn.c_attn"
BLOCKS = [f"{ATTN}.{p}:{b}" for p in ("weight", "bias") for b in "qkv"]
FAST = ["--batch-size", "8", "--max-length", "16", "--no-cache"]


def test_rmed_audits_each_block_as_a_layer(tiny_gpt2_dir):
    split = report("rmed", str(tiny_gpt2_dir), "--split-fused", "--layers", f"{ATTN}.*", "--coords", "200", *FAST)
    assert split["settings"]["split_fused"] is True
    layers = {la["name"]: la for la in split["checkpoints"][0]["layers"]}
    assert list(layers) == BLOCKS
    for name, la in layers.items():
        param, block = name.rsplit(":", 1)
        assert la["block"] == block and la["of"]["name"] == param
        assert la["shape"] == ([16, 16] if param.endswith("weight") else [16])  # n_embd = 16: [in, 3·16] split
        offset = "qkv".index(block) * 16
        columns = np.array(la["indices"]) % 48
        assert ((columns >= offset) & (columns < offset + 16)).all()  # within the block's columns of [in, 48]
    assert [n for n, la in layers.items() if la["zero_hessian"]] == [f"{ATTN}.bias:k"]
    # every bias entry sampled on both sides: the blocks' H_ii are the whole bias's at the same indices
    whole = report("rmed", str(tiny_gpt2_dir), "--layers", f"{ATTN}.bias", "--coords", "200", *FAST)
    bias = whole["checkpoints"][0]["layers"][0]
    assert whole["settings"]["split_fused"] is False and bias["block"] is None and bias["of"] is None
    for block in "qkv":
        la = layers[f"{ATTN}.bias:{block}"]
        assert la["h_diag"] == pytest.approx([bias["h_diag"][i] for i in la["indices"]], rel=1e-6)
    table = run("rmed", str(tiny_gpt2_dir), "--split-fused", "--layers", f"*h.0.attn.c_attn.weight", "--coords",
                "5", *FAST).stdout
    assert all(f"{ATTN}.weight:{b}" in table for b in "qkv")
    plan = run("rmed", str(tiny_gpt2_dir), "--split-fused", "--layers", f"{ATTN}.weight", "--coords", "5", "--dry-run",
               *FAST)
    assert "1 checkpoint × 3 layers" in plan.stderr and "weight:v" in plan.stdout
    only_q = report("rmed", str(tiny_gpt2_dir), "--split-fused", "--layers", "*:q", "--coords", "5", *FAST)
    assert [la["name"] for la in only_q["checkpoints"][0]["layers"]] == [
        f"transformer.h.{i}.attn.c_attn.{p}:q" for i in (0, 1) for p in ("weight", "bias")]


FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(3, 12)  # looks fused, but no row of the table knows this module
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            h = torch.tanh(self.qkv(x))[..., :4]
            return self.out(self.attn(h, h, h)[0].mean(1)).squeeze(-1)  # need_weights: no SDPA

    def build():
        torch.manual_seed(0)
        return Net()

    def mse(model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()
""")


def test_unknown_fused_parameters_are_audited_whole_with_a_note(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fusednet.py").write_text(FACTORY)
    factory: dict = {}
    exec(FACTORY, factory)
    save_file(factory["build"]().state_dict(), tmp_path / "net.safetensors")
    save_file({"x": torch.randn(6, 5, 3), "y": torch.randn(6)}, tmp_path / "data.safetensors")
    args = ["rmed", "net.safetensors", "--model", "fusednet:build", "--loss", "fusednet:mse", "--data",
            "data.safetensors", "--split-fused", "--no-cache", "--coords", "10"]
    result = run(*args)
    assert result.stderr.count("--split-fused has no layout for qkv.weight, qkv.bias: audited whole") == 1
    names = [la["name"] for la in report(*args)["checkpoints"][0]["layers"]]
    assert names[:2] == ["qkv.weight", "qkv.bias"]  # whole
    assert names[2:8] == [f"attn.in_proj_{p}:{b}" for p in ("weight", "bias") for b in "qkv"]  # the module-class row
    nothing = run(*args[:-3], "--no-cache", "--layers", "out.*")
    assert "no selected layer is a fused q/k/v parameter of a known layout" in nothing.stderr
    assert "no layout for" not in nothing.stderr  # qkv is not selected


def test_refusals(tiny_gpt2_dir, trainer_runs):
    smed = run("rmed", str(tiny_gpt2_dir), "--split-fused", "--smed", *FAST, code=2).stderr
    assert "--split-fused does not combine with --smed" in smed
    a, b = str(trainer_runs["adam-0"]), str(trainer_runs["sgd-0"])
    svd = run("compare", a, b, "--metric", "r_u", "--split-fused", *FAST, code=2).stderr
    assert "--metric r_u compares whole weight matrices" in svd


def test_compare_compares_each_block(trainer_runs, cache_dir):
    a, b = str(trainer_runs["adam-0"]), str(trainer_runs["sgd-0"])
    args = ["compare", a, b, "--split-fused", "--layers", f"{ATTN}.*", "--coords", "8", "--batch-size", "8",
            "--steps", "2", "--cache-dir", str(cache_dir)]
    document = report(*args)
    pair = document["compare"]["pairs"][0]
    assert [r["name"] for r in pair["layers"]] == [n for n in BLOCKS if n != f"{ATTN}.bias:k"]
    assert [x["name"] if isinstance(x, dict) else x for x in pair["left_out"]] == [f"{ATTN}.bias:k"]
    values = {(c["run"], la["name"]): la["stats"]["r_med_stab"] for c in document["checkpoints"] for la in c["layers"]}
    for r in pair["layers"]:
        assert r["ratio"] == pytest.approx(values[(b, r["name"])] / values[(a, r["name"])])
    # the cache key holds split_fused: the split audit is not served from the whole one's entries, and vice versa
    assert all(la["cached"] for c in report(*args)["checkpoints"] for la in c["layers"])
    whole = report(*[x for x in args if x != "--split-fused"])
    assert not any(la["cached"] for c in whole["checkpoints"] for la in c["layers"])


def test_alignment_per_block(trainer_runs):
    document = report("rmed", str(trainer_runs["adam-0"]), "--split-fused", "--alignment", "--steps", "2",
                      "--layers", f"{ATTN}.weight", "--coords", "8", *FAST)
    layers = document["checkpoints"][0]["layers"]
    assert [la["name"] for la in layers] == BLOCKS[:3]
    assert all(la["alignment"] is not None for la in layers)


def test_geometry_callback_splits_fused_parameters(tiny_gpt2_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    ids = torch.randint(0, model.config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(0))
    callback = GeometryCallback(every=1, data={"input_ids": ids}, coords=4, layers=[f"{ATTN}.*"], split_fused=True)
    result = callback.audit(model, step=1)
    assert [la.name for la in result.layers] == BLOCKS and callback.config.settings()["split_fused"] is True
    assert [la.name for la in result.layers if la.zero_hessian] == [f"{ATTN}.bias:k"]
    crossed = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                         add_cross_attention=True))
    callback = GeometryCallback(every=1, data={"input_ids": ids % 50}, coords=2, layers=["*.c_attn.*"],
                                split_fused=True)
    with pytest.warns(UserWarning, match="split_fused has no layout for transformer.h.0.crossattention.c_attn.weight"):
        names = [la.name for la in callback.audit(crossed, step=1).layers]
    assert names == BLOCKS + ["transformer.h.0.crossattention.c_attn.weight", "transformer.h.0.crossattention.c_attn.bias"]
