"""Valid inputs of every kind, which the fuzz cases copy and corrupt: tiny checkpoints (one file, sharded, a run
of several steps, a plain state dict with its factory), data files of every format, and — from the worker's
warm-up — reports of every command and a filled result cache."""

import json
import shutil
import warnings
from pathlib import Path

import torch

FACTORY = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def mse(model, batch):
    return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
'''

GPT2_LAYER = "transformer.h.0.ln_1.*"
BERT_LAYER = "bert.encoder.layer.0.output.LayerNorm.*"
FAST = ["--coords", "2", "--batch-size", "4", "--max-length", "16"]


def _run(folder: Path, tokenizer, losses: list[float]) -> Path:
    """A Trainer-style run: ``checkpoint-<step>/`` folders and ``trainer_state.json`` with the loss log."""
    from tests.conftest import save_tiny_gpt2

    folder.mkdir()
    for step in range(1, len(losses) + 1):
        save_tiny_gpt2(folder / f"checkpoint-{step}", tokenizer, seed=step)
    log = [{"step": s, "loss": loss} for s, loss in enumerate(losses, 1)]
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": len(losses), "log_history": log}))
    return folder


def build_seeds(root: Path) -> dict[str, Path]:
    """Write every seed under ``root`` (a few seconds); the worker's warm-up adds the reports and the cache."""
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel

    from tests.conftest import EXAMPLES, _bert_tokenizer, _gpt2_tokenizer, save_tiny_bert, save_tiny_gpt2

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root.mkdir(parents=True, exist_ok=True)
    gpt2_tok, bert_tok = _gpt2_tokenizer(), _bert_tokenizer()
    s = {"gpt2": save_tiny_gpt2(root / "gpt2", gpt2_tok)}
    s["bert"] = save_tiny_bert(root / "bert", bert_tok)
    sharded = root / "sharded"
    GPT2LMHeadModel.from_pretrained(s["gpt2"]).save_pretrained(sharded, max_shard_size="30KB")
    gpt2_tok.save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file(), "the sharded seed has no index"
    s["sharded"] = sharded
    s["run_a"] = _run(root / "run-a", gpt2_tok, [5.6, 5.5])
    s["run_b"] = _run(root / "run-b", gpt2_tok, [5.65, 5.52])

    plain = root / "plain"
    plain.mkdir()
    (plain / "tinymlp.py").write_text(FACTORY)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    save_file(net.state_dict(), plain / "mlp.safetensors")
    save_file({"x": torch.randn(10, 3), "y": torch.randn(10)}, plain / "data.safetensors")
    s["plain"] = plain

    data = root / "data"
    data.mkdir()
    rows = [json.loads(line) for line in EXAMPLES.read_text().splitlines()][:12]
    (data / "text.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    (data / "labels.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": i % 2}) + "\n"
                                               for i, r in enumerate(rows)))
    (data / "text.csv").write_text("text,label\n" + "".join(f'"{r["text"]}",{i % 2}\n' for i, r in enumerate(rows)))
    (data / "text.txt").write_text("".join(r["text"] + "\n" for r in rows))
    ids = torch.randint(0, len(gpt2_tok), (4, 12))
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, data / "ids.safetensors")
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, data / "ids.pt")
    rows_json = [{"text": r["text"], "label": i % 2} for i, r in enumerate(rows)]
    (data / "rows.json").write_text(json.dumps(rows_json))
    (data / "ids.json").write_text(json.dumps([{"input_ids": row} for row in ids.tolist()]))
    s["data"] = data

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    with warnings.catch_warnings():  # transformers' deprecation notices about peft's calls
        warnings.simplefilter("ignore", FutureWarning)
        lora = get_peft_model(GPT2LMHeadModel.from_pretrained(s["gpt2"]),
                              LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
        lora.save_pretrained(root / "adapter")
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(s["gpt2"])
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    s["adapter"] = root / "adapter"
    (root / "reports").mkdir()
    s["reports"] = root / "reports"
    s["cache"] = root / "cache"
    return s


def warm_up_commands(s: dict[str, Path]) -> list[list[str]]:
    """The worker's warm-up: one run of each command, whose reports and cache become seeds too."""
    reports, cache = s["reports"], ["--cache-dir", str(s["cache"])]
    gpt2 = ["--layers", GPT2_LAYER, *FAST]
    return [
        ["rmed", str(s["gpt2"]), *gpt2, *cache, "--json", str(reports / "rmed.json")],
        ["rmed", str(s["run_a"]), *gpt2, *cache, "--json", str(reports / "rmed-run.json")],
        ["rmed", str(s["bert"]), "--layers", BERT_LAYER, *FAST, "--data", str(s["data"] / "labels.jsonl"),
         "--no-cache", "--json", str(reports / "rmed-bert.json")],
        ["compare", str(s["run_a"]), str(s["run_b"]), *gpt2, *cache, "--json", str(reports / "compare.json")],
        ["svd", str(s["gpt2"]), "--layers", "*mlp*", "--json", str(reports / "svd.json")],
        ["report", str(reports / "rmed-run.json"), "--plot", str(reports / "rmed-run.png")],
        ["report", str(reports / "compare.json"), "--format", "csv"],
        ["rmed", str(s["adapter"]), "--layers", "*lora*", *FAST, "--no-cache"],
    ]


def copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst
