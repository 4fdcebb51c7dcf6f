"""A seeded generator of fuzz cases: every input kind geomaudit reads, corrupted at random (issue 10).

``generate(seeds, work, n, seed)`` yields ``n`` cases; case ``i`` depends only on ``(seed, i)``, so a failure is
reproduced by its number. Each case copies the seeds it needs into its own folder under ``work`` and corrupts
them: checkpoints (safetensors bytes and headers, ``config.json``, sharded indexes, tokenizer files, custom
code, pickles), data files (text and tensors), reports, cache entries, run folders and their
``trainer_state.json``, output targets and faults, and option values.
"""

import json
import math
import os
import random
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from .harness import MARKER, Case
from .seeds import BERT_LAYER, FAST, GPT2_LAYER, copy

# values that have broken parsers before: sizes, signs, types, text that is markup, a path, a line break
INTS = [0, 1, -1, 2, 3, 7, 64, 10**6, 10**9, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
FLOATS = [0.0, -0.0, 0.5, -1.5, 1e-300, 1e300, 3.4e38, 1e-45]
STRINGS = ["", "abc", "gpt2", "bert", "GPT2LMHeadModel", "BertModel", ":smile:", "[bold]x[/]", "a\u2028b",
           "\ud800", "\x00", "../x.safetensors", "/dev/zero", "x" * 5000, "float16", "nan", "1e999", "-1",
           "causal-lm", "\u202eevil", "model.safetensors"]


def random_value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(INTS)
    if roll < 0.4:
        return rng.choice(FLOATS)
    if roll < 0.6:
        return rng.choice(STRINGS)
    if roll < 0.68:
        return rng.choice([True, False, None])
    if depth < 3 and roll < 0.84:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 3:
        return {rng.choice(STRINGS[:8]): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice(INTS)


def _paths(tree, prefix=()) -> list[tuple]:
    """Every path to a value inside a JSON tree (keys and indices)."""
    found = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            found += _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree[:20]):
            found += _paths(v, prefix + (i,))
    return found


def mutate_json(rng: random.Random, tree, keys: list[tuple] | None = None) -> tuple[object, str]:
    """One random edit of a JSON tree: a value replaced, a key deleted or added, a value wrapped; or, given
    ``keys`` (paths worth hitting), one of them set to a random value."""
    if keys and rng.random() < 0.5:
        path = rng.choice(keys)
    else:
        path = rng.choice(_paths(tree))
    if not path:
        value = random_value(rng)
        return value, f"document replaced by {_short(value)}"
    parent = tree
    for p in path[:-1]:
        parent = parent[p] if isinstance(parent, (dict, list)) and (isinstance(parent, dict) and p in parent or
                                                                   isinstance(parent, list) and isinstance(p, int)
                                                                   and p < len(parent)) else None
        if parent is None:
            break
    last = path[-1]
    if not isinstance(parent, (dict, list)):
        return tree, "no edit"
    action = rng.random()
    if isinstance(parent, dict) and action < 0.2:
        parent.pop(last, None)
        return tree, f"deleted {_where(path)}"
    if isinstance(parent, dict) and action < 0.3:
        key = rng.choice(STRINGS[:8])
        parent[key] = random_value(rng)
        return tree, f"added {_where(path[:-1] + (key,))}"
    old = parent[last] if (isinstance(parent, dict) and last in parent) or \
        (isinstance(parent, list) and isinstance(last, int) and last < len(parent)) else None
    if action < 0.4 and old is not None:
        value = [old] if rng.random() < 0.5 else {"x": old}
    else:
        value = random_value(rng)
    if isinstance(parent, dict) or (isinstance(last, int) and last < len(parent)):
        parent[last] = value
    return tree, f"{_where(path)} = {_short(value)}"


def _where(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(root)"


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:60] + "…"


def dump(value) -> str:
    """JSON text, NaN and lone surrogates included (as Python writes them)."""
    return json.dumps(value, ensure_ascii=True)


class Builder:
    """Makes one case: its folder, copies of the seeds, and the common arguments."""

    def __init__(self, seeds: dict[str, Path], folder: Path, rng: random.Random):
        self.seeds, self.dir, self.rng = seeds, folder, rng
        folder.mkdir(parents=True)
        self.out = folder / "out.json"

    def copy(self, name: str, as_name: str | None = None) -> Path:
        return copy(self.seeds[name], self.dir / (as_name or self.seeds[name].name))

    def audit(self, checkpoint: Path, layer: str = GPT2_LAYER, *extra: str, json_out: bool = True) -> list[str]:
        return ["rmed", str(checkpoint), "--layers", layer, *FAST, "--no-cache", *extra,
                *(["--json", str(self.out)] if json_out else [])]

    def case(self, kind: str, what: str, args: list[str], **options) -> Case:
        return Case(kind, what, args, self.dir, out=options.pop("out", self.out), **options)


# ---------------------------------------------------------------- checkpoints

CONFIG_KEYS = [("n_layer",), ("n_embd",), ("n_head",), ("vocab_size",), ("n_positions",), ("num_labels",),
               ("architectures",), ("architectures", 0), ("model_type",), ("torch_dtype",), ("dtype",),
               ("layer_norm_epsilon",), ("activation_function",), ("id2label",), ("label2id",), ("problem_type",),
               ("n_inner",), ("hidden_size",), ("num_hidden_layers",), ("num_attention_heads",),
               ("intermediate_size",), ("max_position_embeddings",), ("type_vocab_size",), ("pad_token_id",),
               ("eos_token_id",), ("tie_word_embeddings",), ("attn_implementation",), ("auto_map",)]


def config_case(b: Builder) -> Case:
    name = b.rng.choice(["gpt2", "bert"])
    ckpt = b.copy(name)
    path = ckpt / "config.json"
    roll = b.rng.random()
    if roll < 0.08:
        text, what = b.rng.choice([("", "empty"), ("{", "truncated"), ("[" * 50_000, "nested 50,000 deep"),
                                   ("\xff\xfe", "not UTF-8"), ('{"model_type": NaN}', "NaN")])
        path.write_bytes(text.encode("latin-1", errors="surrogateescape") if text == "\xff\xfe" else text.encode())
    else:
        config = json.loads(path.read_text())
        for _ in range(b.rng.choice([1, 1, 1, 2, 3])):
            config, what = mutate_json(b.rng, config, CONFIG_KEYS)
        path.write_text(dump(config))
    args = audit_args(b, ckpt, name)
    if b.rng.random() < 0.15:
        args = ["svd", str(ckpt), "--json", str(b.out)]
    return b.case("config", f"{name} config.json: {what}", args)


def audit_args(b: Builder, ckpt: Path, name: str) -> list[str]:
    if name == "bert":
        return b.audit(ckpt, BERT_LAYER, "--data", str(b.seeds["data"] / "labels.jsonl"))
    return b.audit(ckpt)


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64",
          "U64", "X9", ""]


def safetensors_case(b: Builder) -> Case:
    name = b.rng.choice(["gpt2", "gpt2", "bert"])
    ckpt = b.copy(name)
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    roll = b.rng.random()
    if roll < 0.15:
        cut = b.rng.randrange(0, len(data))
        data, what = data[:cut], f"truncated at byte {cut}"
    elif roll < 0.25:
        for _ in range(b.rng.randint(1, 8)):
            at = b.rng.randrange(0, len(data))
            data[at] = b.rng.randrange(256)
        what = "random bytes changed"
    elif roll < 0.35:
        value = b.rng.choice([0, 1, 7, n - 1, n + 1, len(data), 2**40, 2**64 - 1])
        data[:8], what = struct.pack("<Q", value), f"header length {value}"
    elif roll < 0.5:
        # tensor values: NaN, inf, huge
        tensors = [k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32"]
        k = b.rng.choice(tensors)
        start, _ = header[k]["data_offsets"]
        fill = b.rng.choice([float("nan"), float("inf"), -float("inf"), 3e38])
        at = 8 + n + start
        data[at:at + 4] = struct.pack("<f", fill)
        what = f"{k}[0] = {fill}"
    else:
        tensors = [k for k in header if k != "__metadata__"]
        k = b.rng.choice(tensors)
        edit = b.rng.choice(["dtype", "shape", "offsets", "rename", "drop", "metadata", "duplicate", "json"])
        if edit == "dtype":
            header[k]["dtype"] = b.rng.choice(DTYPES)
        elif edit == "shape":
            shape = list(header[k]["shape"])
            if shape and b.rng.random() < 0.7:
                shape[b.rng.randrange(len(shape))] = b.rng.choice([0, 1, 2, 3, 10**6, 2**40, -1])
            else:
                shape = b.rng.choice([[], [1] * 5, [0], [2**33, 2**33]])
            header[k]["shape"] = shape
        elif edit == "offsets":
            a, e = header[k]["data_offsets"]
            header[k]["data_offsets"] = b.rng.choice([[e, a], [a, e + 4], [0, 0], [a, 2**40], [-4, e], [a]])
        elif edit == "rename":
            header[k + ".renamed"] = header.pop(k)
        elif edit == "drop":
            header.pop(k)
        elif edit == "metadata":
            header["__metadata__"] = random_value(b.rng)
        elif edit == "duplicate":
            header[k.replace("weight", "bias") if "weight" in k else k + "x"] = dict(header[k])
        else:
            header, _ = mutate_json(b.rng, header)
        what = f"header: {edit} of {k}"
        body = dump(header).encode()
        body += b" " * (-len(body) % 8)
        data = bytearray(struct.pack("<Q", len(body))) + body + data[8 + n:]
    path.write_bytes(bytes(data))
    args = audit_args(b, ckpt, name) if b.rng.random() < 0.8 else ["svd", str(ckpt), "--json", str(b.out)]
    return b.case("safetensors", f"{name} model.safetensors: {what}", args)


def index_case(b: Builder) -> Case:
    ckpt = b.copy("sharded")
    path = ckpt / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    outside = b.dir / "outside.safetensors"
    copy(ckpt / shards[0], outside)
    names = list(index["weight_map"])
    k = b.rng.choice(names)
    roll = b.rng.random()
    targets = ["../outside.safetensors", str(outside), "/dev/zero", "/dev/null", "missing.safetensors", ".", "",
               "..", "/", "config.json", "tokenizer.json", shards[-1], "sub/../" + shards[0], "./" + shards[0]]
    if roll < 0.5:
        target = b.rng.choice(targets)
        if b.rng.random() < 0.5:
            for name in names:
                if index["weight_map"][name] == index["weight_map"][k]:
                    index["weight_map"][name] = target
        else:
            index["weight_map"][k] = target
        what = f"weight_map[{k}] = {target!r}"
    elif roll < 0.6:
        (ckpt / "link.safetensors").symlink_to(b.rng.choice([outside, Path("/dev/zero"), ckpt / shards[0]]))
        index["weight_map"][k] = "link.safetensors"
        what = f"weight_map[{k}] = a symbolic link"
    else:
        index, what = mutate_json(b.rng, index, [("weight_map",), ("metadata",), ("weight_map", k)])
    path.write_text(dump(index))
    return b.case("index", f"sharded index: {what}", audit_args(b, ckpt, "gpt2"))


def tokenizer_case(b: Builder) -> Case:
    name = b.rng.choice(["gpt2", "bert"])
    ckpt = b.copy(name)
    files = [p for p in ckpt.iterdir() if p.name.startswith(("tokenizer", "vocab", "special"))]
    path = b.rng.choice(files)
    roll = b.rng.random()
    if roll < 0.3 or path.suffix != ".json":
        data = path.read_bytes()
        cut = b.rng.randrange(0, len(data) + 1)
        path.write_bytes(data[:cut] + bytes(b.rng.randrange(256) for _ in range(b.rng.randint(0, 4))))
        what = f"{path.name} cut at {cut}"
    else:
        doc = json.loads(path.read_text())
        doc, what = mutate_json(b.rng, doc, [("model_max_length",), ("tokenizer_class",), ("auto_map",),
                                             ("pad_token",), ("added_tokens",), ("model", "vocab")])
        path.write_text(dump(doc))
        what = f"{path.name}: {what}"
    data = b.rng.choice(["text.jsonl", "text.txt", "text.csv"] if name == "gpt2" else ["labels.jsonl", "text.csv"])
    layer = BERT_LAYER if name == "bert" else GPT2_LAYER
    return b.case("tokenizer", f"{name} {what}", b.audit(ckpt, layer, "--data", str(b.seeds["data"] / data)))


EVIL = """import pathlib
pathlib.Path(__file__).with_name("{marker}-" + pathlib.Path(__file__).stem).write_text("ran")
{body}
"""


def custom_code_case(b: Builder) -> Case:
    """A checkpoint that asks transformers to run its own Python files (``auto_map``): none may ever run, and
    nothing may prompt, even when stdin answers "y"."""
    name = b.rng.choice(["gpt2", "bert"])
    ckpt = b.copy(name)
    for module, body in (("configuration_evil", "from transformers import PretrainedConfig\n"
                                                "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'"),
                         ("modeling_evil", "class EvilModel: pass"),
                         ("tokenization_evil", "class EvilTokenizer: pass")):
        (ckpt / f"{module}.py").write_text(EVIL.format(marker=MARKER, body=body))
    config = json.loads((ckpt / "config.json").read_text())
    where = b.rng.choice(["config", "config", "tokenizer", "both"])
    if where in ("config", "both"):
        config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                              "AutoModelForCausalLM": "modeling_evil.EvilModel",
                              "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
        config["model_type"] = b.rng.choice(["evil", config["model_type"], "custom-thing"])
        if b.rng.random() < 0.5:
            config["architectures"] = ["EvilModel"]
        (ckpt / "config.json").write_text(dump(config))
    if where in ("tokenizer", "both"):
        tc_path = ckpt / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        tc["tokenizer_class"] = b.rng.choice(["EvilTokenizer", tc.get("tokenizer_class")])
        tc_path.write_text(dump(tc))
    args = audit_args(b, ckpt, name) if b.rng.random() < 0.8 else ["svd", str(ckpt), "--json", str(b.out)]
    if b.rng.random() < 0.3:
        args = [a if a != str(b.out) else "-" for a in args]
    return b.case("custom-code", f"{name} with auto_map in {where}", args, stdin="y\ny\ny\n")


def pickle_case(b: Builder) -> Case:
    """A pickle whose loading would run code: refused without --allow-pickle, never executed."""
    import torch

    marker = b.dir / f"{MARKER}-pickle"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    roll = b.rng.random()
    if roll < 0.5:
        ckpt = b.copy("gpt2")
        from safetensors.torch import load_file

        state = load_file(ckpt / "model.safetensors")
        (ckpt / "model.safetensors").unlink()
        torch.save(state | {"evil": Evil()}, ckpt / "pytorch_model.bin")
        return b.case("pickle", "pytorch_model.bin that runs a command", b.audit(ckpt))
    data = b.dir / "evil.pt"
    torch.save({"input_ids": torch.ones(2, 4, dtype=torch.long), "evil": Evil()}, data)
    return b.case("pickle", "data .pt that runs a command", b.audit(b.seeds["gpt2"], GPT2_LAYER, "--data", str(data)))


# ---------------------------------------------------------------- data

TEXTS = ["plain words here", "", " ", "\u2028", "a\u2028b", "\u2029", "\x85", "\r", "\x00", "\ud800", "\udfff",
         "é" * 50, "😀" * 20, "\u202e", "word " * 300, "[CLS] [SEP] [MASK]", "<|endoftext|>", "\t\t", "1e999",
         "\\u0000", '"quoted"', "a,b,c", "line\nbreak"]
LABELS = [0, 1, -1, 2, 7, 10**6, 2**63, 2**64, -(2**63) - 1, 10**30, 0.5, 1.0, "0", "1", "9" * 30, "-3", "yes",
          "", None, True, [0, 1], {"a": 1}, float("nan")]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(TEXTS) for _ in range(rng.randint(1, 3)))


def text_data_case(b: Builder) -> Case:
    name = b.rng.choice(["gpt2", "bert"])
    fmt = b.rng.choice([".jsonl", ".jsonl", ".csv", ".txt"])
    path = b.dir / f"data{fmt}"
    rows = b.rng.randint(0, 6)
    labelled = name == "bert" or b.rng.random() < 0.3
    roll = b.rng.random()
    if roll < 0.1:
        content = b.rng.choice([b"", b"\n\n", b"\xef\xbb\xbf", b"\xff\xfe\x00", b"\x00" * 100, b"\r\r\r"])
        path.write_bytes(content)
        what = f"{fmt} bytes {content[:12]!r}"
    elif roll < 0.15:
        size = b.rng.choice([131_073, 1_000_000])
        text = "word " * (size // 5)
        if fmt == ".csv":
            path.write_text(f"text,label\n\"{text}\",0\n")
        elif fmt == ".txt":
            path.write_text(text + "\n")
        else:
            path.write_text(json.dumps({"text": text, "label": 0}) + "\n")
        what = f"{fmt} with a {size:,}-character field"
    elif fmt == ".jsonl":
        lines = []
        for _ in range(rows):
            row = {"text": _text(b.rng)} if b.rng.random() < 0.9 else {"sentence": "x"}
            if labelled:
                row["label"] = b.rng.choice(LABELS) if b.rng.random() < 0.4 else b.rng.randint(0, 1)
            if b.rng.random() < 0.1:
                row["text"] = random_value(b.rng)
            line = json.dumps(row, ensure_ascii=b.rng.random() < 0.5)
            if b.rng.random() < 0.05:
                line = b.rng.choice(["[1]", "{", '{"text": "a", "label": 1' + "0" * 5000 + "}", "[" * 10_000,
                                     '{"text": NaN}', '{1: 2}', "null"])
            lines.append(line)
        path.write_text("\n".join(lines) + "\n", errors="surrogatepass")
        what = f".jsonl of {rows} rows"
    elif fmt == ".csv":
        header = b.rng.choice(["text,label", "text", "label,text", "txt,label", "text,text", "", "text,label,x"])
        lines = [header]
        for _ in range(rows):
            cells = [f'"{_text(b.rng)}"' if b.rng.random() < 0.5 else _text(b.rng).replace(",", ";"),
                     str(b.rng.choice(LABELS) if b.rng.random() < 0.4 else b.rng.randint(0, 1))]
            lines.append(",".join(cells[:b.rng.randint(1, 3)]))
        path.write_text("\n".join(lines) + "\n", errors="surrogatepass")
        what = f".csv of {rows} rows, header {header!r}"
    else:
        path.write_text("\n".join(_text(b.rng) for _ in range(rows)), errors="surrogatepass")
        what = f".txt of {rows} lines"
    layer = BERT_LAYER if name == "bert" else GPT2_LAYER
    return b.case("text-data", f"{name} on {what}", b.audit(b.seeds[name], layer, "--data", str(path)))


DTYPE_NAMES = ["int64", "int32", "int16", "int8", "uint8", "bool", "float32", "float64", "float16", "bfloat16",
               "complex64"]


def _tensor(rng: random.Random, width: int, rows: int = 4):
    import torch

    dtype = getattr(torch, rng.choice(DTYPE_NAMES)) if rng.random() < 0.3 else torch.int64
    shape = rng.choice([(rows, width)] * 4 + [(rows,), (), (rows, width, 2), (0, width), (rows, 0), (1, width)])
    values = rng.choice([lambda: torch.randint(0, 100, shape), lambda: torch.full(shape, rng.choice(INTS[:10])),
                         lambda: torch.full(shape, -100), lambda: torch.randint(-5, 5, shape)])()
    if dtype.is_complex:
        return values.to(torch.float32).to(dtype)
    return values.to(dtype)


def tensor_data_case(b: Builder) -> Case:
    import torch
    from safetensors.torch import save_file

    name = b.rng.choice(["gpt2", "gpt2", "bert"])
    width = b.rng.choice([12, 12, 1, 64, 65])
    tensors = {"input_ids": _tensor(b.rng, width)}
    for key in ("attention_mask", "labels", "token_type_ids", "position_ids", "extra"):
        if b.rng.random() < 0.35:
            tensors[key] = _tensor(b.rng, b.rng.choice([width, width, width + 1]))
    if name == "bert" and "labels" not in tensors and b.rng.random() < 0.8:
        tensors["labels"] = torch.tensor(b.rng.choice([[0, 1, 0, 1], [0, 5, 0, 1], [-1] * 4, [0.5] * 4]))
    if b.rng.random() < 0.1:
        tensors.pop("input_ids")
    fmt = b.rng.choice([".safetensors", ".pt"])
    path = b.dir / f"data{fmt}"
    what = ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in tensors.items())
    if fmt == ".pt":
        roll = b.rng.random()
        if roll < 0.1:
            tensors[b.rng.choice([1, (1, 2), None])] = torch.ones(4, width)
            what += ", a key that is not a string"
        elif roll < 0.2:
            tensors["input_ids"] = torch.ones(4, width, dtype=torch.long).to_sparse()
            what += ", sparse input_ids"
        elif roll < 0.3:
            tensors["input_ids"] = torch.empty(4, width, dtype=torch.long, device="meta")
            what += ", meta input_ids"
        elif roll < 0.4:
            tensors = b.rng.choice([[torch.ones(2)], {"state_dict": {"input_ids": 3}}, {"a": {"b": torch.ones(2)}},
                                    torch.ones(4, 4), "text", None])
            what = f"a .pt holding {type(tensors).__name__}"
        torch.save(tensors, path)
    else:
        tensors = {k: v.contiguous() for k, v in tensors.items() if not v.dtype.is_complex}
        save_file(tensors, path)
    layer = BERT_LAYER if name == "bert" else GPT2_LAYER
    extra = ["--micro-batch", "2"] if b.rng.random() < 0.2 else []
    return b.case("tensor-data", f"{name} on {fmt}: {what}", b.audit(b.seeds[name], layer, "--data", str(path),
                                                                    *extra))


def json_data_case(b: Builder) -> Case:
    """``.json`` data: an array of rows, an object of columns, JSON Lines, or pre-tokenized rows."""
    name = b.rng.choice(["rows.json", "ids.json"])
    doc = json.loads((b.seeds["data"] / name).read_text())
    what = []
    for _ in range(b.rng.choice([1, 1, 2])):
        doc, w = mutate_json(b.rng, doc, [(0, "input_ids"), (0, "text"), (0, "label"), (1,), (0, "input_ids", 0)])
        what.append(w)
    path = b.dir / "data.json"
    text = dump(doc)
    if b.rng.random() < 0.15:
        text = b.rng.choice(["[" * 30_000, "[{}]", "{}", '{"a": [1], "b": [1, 2]}', "", "[1, 2]",
                             '{"text": "a"}\n{"text": "b"}\n', '{"input_ids": [1e999]}'])
        what = [f"replaced by {text[:30]!r}"]
    path.write_text(text)
    ckpt = b.rng.choice(["gpt2", "bert"])
    layer = BERT_LAYER if ckpt == "bert" else GPT2_LAYER
    return b.case("json-data", f"{ckpt} on {name}: {'; '.join(what)}", b.audit(b.seeds[ckpt], layer,
                                                                                "--data", str(path)))


def adapter_case(b: Builder) -> Case:
    """A PEFT adapter folder: its config (base model, target modules, rank …) or weights corrupted."""
    adapter = b.copy("adapter")
    roll = b.rng.random()
    if roll < 0.5:
        config = json.loads((adapter / "adapter_config.json").read_text())
        config, what = mutate_json(b.rng, config, [("base_model_name_or_path",), ("r",), ("target_modules",),
                                                   ("lora_alpha",), ("task_type",), ("peft_type",),
                                                   ("fan_in_fan_out",), ("modules_to_save",)])
        if b.rng.random() < 0.3:
            config["base_model_name_or_path"] = b.rng.choice(["/dev/zero", "..", str(b.dir), "../gpt2", "x/y",
                                                              str(adapter), "", "/"])
            what = f"base_model_name_or_path = {config['base_model_name_or_path']!r}"
        (adapter / "adapter_config.json").write_text(dump(config))
    else:
        path = adapter / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        cut = b.rng.randrange(len(data))
        data = data[:cut] if b.rng.random() < 0.5 else data[:cut] + bytes([b.rng.randrange(256)]) + data[cut + 1:]
        path.write_bytes(bytes(data))
        what = f"adapter_model.safetensors changed at byte {cut}"
    args = b.audit(adapter, "*lora*") if b.rng.random() < 0.8 else b.audit(adapter, GPT2_LAYER, "--merge")
    return b.case("adapter", f"adapter: {what}", args)


def hub_case(b: Builder) -> Case:
    """A hub id resolved from a local Hugging Face cache whose refs, snapshot links or blobs are corrupted."""
    import hashlib

    repo = b.dir / "hf-home" / "hub" / "models--tiny-org--tiny-gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in b.seeds["gpt2"].iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        copy(f, repo / "blobs" / digest)
        (snapshot / f.name).symlink_to(f"../../blobs/{digest}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    roll = b.rng.random()
    if roll < 0.3:
        text = b.rng.choice(["", "x" * 40, "../../..", "/etc", commit + "\n", "\x00", "deadbeef"])
        (repo / "refs" / "main").write_text(text)
        what = f"refs/main = {text[:20]!r}"
    elif roll < 0.6:
        link = snapshot / b.rng.choice(["model.safetensors", "config.json", "tokenizer.json"])
        link.unlink()
        target = b.rng.choice(["/dev/zero", "../../blobs/missing", str(b.dir), "/etc/passwd"])
        link.symlink_to(target)
        what = f"{link.name} -> {target}"
    else:
        blob = b.rng.choice(sorted((repo / "blobs").iterdir()))
        data = blob.read_bytes()
        blob.write_bytes(data[:b.rng.randrange(len(data) + 1)])
        what = f"blob {blob.name[:8]} truncated"
    repo_id = b.rng.choice(["tiny-org/tiny-gpt2"] * 4 + ["tiny-org/absent", "../x", "a/b/c", "tiny-org/tiny-gpt2@x"])
    return b.case("hub", f"hub {repo_id}: {what}", b.audit(Path(repo_id), GPT2_LAYER),
                  env={"HF_HOME": str(b.dir / "hf-home"), "HF_HUB_CACHE": str(b.dir / "hf-home" / "hub")})


# ---------------------------------------------------------------- reports, caches, runs

REPORTS = ["rmed.json", "rmed-run.json", "rmed-bert.json", "compare.json", "svd.json"]


def report_case(b: Builder) -> Case:
    name = b.rng.choice(REPORTS)
    doc = json.loads((b.seeds["reports"] / name).read_text())
    what = []
    for _ in range(b.rng.choice([1, 1, 2, 3])):
        doc, w = mutate_json(b.rng, doc)
        what.append(w)
    path = b.dir / name
    path.write_text(json.dumps(doc, ensure_ascii=True))
    mode = b.rng.choice(["table", "table", "md", "csv", "plot"])
    args = ["report", str(path)]
    out = None
    if mode == "plot":
        out = b.dir / "out.png"
        args += ["--plot", str(out)]
    elif mode != "table":
        args += ["--format", mode]
    return b.case("report", f"{name}: {'; '.join(what)} ({mode})", args, out=out)


def cache_case(b: Builder) -> Case:
    """A tampered cache entry is never served: the audit then equals the fresh one."""
    cache = b.copy("cache", "cache")
    entries = sorted(cache.glob("*.json"))
    path = b.rng.choice(entries)
    roll = b.rng.random()
    if roll < 0.2:
        data = path.read_bytes()
        cut = b.rng.randrange(len(data))
        path.write_bytes(data[:cut] + bytes([b.rng.randrange(256)]) + data[cut + 1:])
        what = f"byte {cut} changed"
    else:
        doc = json.loads(path.read_text())
        doc, what = mutate_json(b.rng, doc, [("loss",), ("sha256",)] +
                                [("layers", k, f) for k in doc["layers"] for f in ("h_diag", "indices", "seconds")])
        path.write_text(json.dumps(doc))
    run = b.rng.choice(["gpt2", "run_a"])
    args = ["rmed", str(b.seeds[run]), "--layers", GPT2_LAYER, *FAST, "--cache-dir", str(cache), "--json", str(b.out)]
    reference = json.loads((b.seeds["reports"] / ("rmed.json" if run == "gpt2" else "rmed-run.json")).read_text())

    def same_values(outcome) -> str | None:
        if outcome.code != 0:
            return f"exit {outcome.code} on a tampered cache entry (expected a recomputation): {outcome.stderr[-200:]}"
        got = json.loads(b.out.read_text())
        values = [[la["h_diag"] for la in c["layers"]] + [c["loss"]] for c in got["checkpoints"]]
        expected = [[la["h_diag"] for la in c["layers"]] + [c["loss"]] for c in reference["checkpoints"]]
        return None if values == expected else f"tampered values served: {values} != {expected}"

    return b.case("cache", f"cache entry {path.name[:12]}: {what}", args, expect=frozenset({0}), check=same_values)


def run_case(b: Builder) -> Case:
    run = b.copy("run_a", "run")
    roll = b.rng.random()
    if roll < 0.5:
        state = json.loads((run / "trainer_state.json").read_text())
        state, what = mutate_json(b.rng, state, [("log_history",), ("log_history", 0, "loss"),
                                                 ("log_history", 1, "step"), ("log_history", 0)])
        (run / "trainer_state.json").write_text(dump(state))
    elif roll < 0.6:
        (run / "trainer_state.json").write_text(b.rng.choice(['{"log_history": [{"step": 1, "loss": NaN}]}',
                                                              '{"log_history": [{"step": 2, "loss": Infinity}]}',
                                                              "[" * 20_000, "{"]))
        what = "trainer_state.json replaced"
    elif roll < 0.8:
        target = b.rng.choice(["/dev/zero", "/dev/null", str(run / "checkpoint-1"), str(b.dir), "/nonexistent"])
        link = run / b.rng.choice(["step_3.pt", "checkpoint-3", "step_3.safetensors", "checkpoint-1/model.safetensors"])
        if link.exists():
            link.unlink()
        link.symlink_to(target)
        what = f"{link.name} -> {target}"
    else:
        name = b.rng.choice(["checkpoint-x", "checkpoint-99999999999999999999999", "step_-1.pt", "checkpoint-00001",
                             "step_3.ckpt", "checkpoint-3"])
        p = run / name
        if name.endswith((".pt", ".ckpt")):
            p.write_bytes(os.urandom(b.rng.randint(0, 64)))
        else:
            p.mkdir()
            if b.rng.random() < 0.5:
                (p / "config.json").write_text("{}")
        what = f"extra {name}"
    other = b.seeds["run_b"]
    command = b.rng.choice(["rmed", "rmed", "compare", "compare-loss", "compare-state", "svd"])
    if command == "rmed":
        args = b.audit(run)
    elif command == "svd":
        args = ["svd", str(run), "--layers", "*mlp*", "--json", str(b.out)]
    else:
        extra = {"compare": [], "compare-loss": ["--match-loss", "--tolerance", "0.5"],
                 "compare-state": ["--match-loss", "--loss-from", "trainer_state", "--tolerance", "0.5"]}[command]
        args = ["compare", str(run), str(other), "--layers", GPT2_LAYER, *FAST, "--no-cache", *extra,
                "--json", str(b.out)]
    if b.rng.random() < 0.2:
        args += b.rng.choice([["--steps", "1"], ["--every", "2"], ["--steps", "3"], ["--steps", "1,2"]])
    return b.case("run", f"run folder: {what} ({command})", args)


# ---------------------------------------------------------------- outputs and options

def output_case(b: Builder) -> Case:
    """Output targets that are not regular files are refused (exit 2); output faults are exit 5."""
    roll = b.rng.random()
    real = b.dir / "real.json"
    real.write_text("keep")
    if roll < 0.55:
        kind = b.rng.choice(["device", "fifo", "link", "dangling", "link-to-device", "folder", "missing-folder",
                             "dot", "trailing-slash"])
        target = b.dir / "target"
        if kind == "device":
            try:
                os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 3))
            except PermissionError:
                target = Path("/dev/null")
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "link":
            target.symlink_to(real)
        elif kind == "dangling":
            target.symlink_to(b.dir / "nowhere.json")
        elif kind == "link-to-device":
            target.symlink_to("/dev/null")
        elif kind == "folder":
            target.mkdir()
        elif kind == "missing-folder":
            target = b.dir / "no" / "out.json"
        elif kind == "dot":
            target = b.dir / "."
        else:
            target = b.dir / "out.json"
        written = str(target) + ("/" if kind == "trailing-slash" else "")
        option = b.rng.choice(["--json", "--json", "--plot"])
        if option == "--plot":
            args = ["report", str(b.seeds["reports"] / "rmed.json"), "--plot", written]
        else:
            args = b.rng.choice([b.audit(b.seeds["gpt2"], json_out=False),
                                 ["svd", str(b.seeds["gpt2"]), "--layers", "*mlp*"]]) + ["--json", written]
        nodes = (target, real) if target.exists() or target.is_symlink() else (real,)
        return b.case("output", f"{option} onto a {kind}", args, expect=frozenset({2}), nodes=nodes,
                      out=b.dir / "out.json" if kind == "trailing-slash" else b.dir / "nowhere.json")
    fault = b.rng.choice(["closed", "full", "broken-pipe", "fsize", "fsize"])
    to = b.rng.choice(["-", "table", "file"]) if fault != "fsize" else "file"
    command = b.rng.choice(["rmed", "svd", "report"])
    if command == "rmed":
        args = b.audit(b.seeds["gpt2"], json_out=False)
    elif command == "svd":
        args = ["svd", str(b.seeds["gpt2"]), "--layers", "*mlp*"]
    else:
        args = ["report", str(b.seeds["reports"] / b.rng.choice(REPORTS))]
    if to == "-" and command != "report":
        args += ["--json", "-"]
    elif to == "file" and command != "report":
        args += ["--json", str(b.out)]
    elif to == "file":
        args += ["--plot", str(b.dir / "out.png")]
    fsize = 2048 if fault == "fsize" else None  # below any report or PNG written, above the status lines on stderr
    writes_file = to == "file"
    expect = frozenset({5}) if (fault == "fsize") == writes_file else frozenset({0})
    mode = "file" if fault == "fsize" else fault
    out = b.out if command != "report" else b.dir / "out.png"
    return b.case("output", f"{fault} while writing {to} ({command})", args, stdout_mode=mode, fsize=fsize,
                  expect=expect, out=out, nodes=(real,))


OPTIONS = {  # option → values to try (all of the option's type, so that click itself accepts them)
    "--coords": [0, -1, 1, 10**9, 2**63], "--batch-size": [0, -3, 1, 10**9], "--max-length": [0, 1, 2, 10**9],
    "--topk": [0, 1, 10**9], "--micro-batch": [0, 1, 3, 10**9], "--chunk-size": [0, 1, 10**9],
    "--seed": [-1, 2**63, 2**64, 2**70, -(2**70)], "--dense-max": [0, 1, 10**12], "--every": [0, -1, 10**30],
    "--steps": ["", ",", "1,,2", "-1", "99999999999999999999", "1.5", " "], "--device": ["cpu", "cuda:7", "meta", "x"],
    "--task": ["auto", "masked-lm", "classification", "causal-lm"], "--layers": ["[", "**", "*.bias", "0", "007"],
    "--fail-above": [-1.0, 0.0, 1e308, float("nan")], "--data": ["/dev/zero", "/dev/null", ".", "/", ""],
}
COMPARE_OPTIONS = {"--tolerance": [-1.0, 0.0, float("nan"), float("inf")], "--levels": ["0", "-1", "nan", ",", "1e999"],
                   "--rank": [0, 1, 10**9], "--energy": [0.0, 1.0, 2.0, float("nan")], "--reference": ["c", "B"]}


def options_case(b: Builder) -> Case:
    command = b.rng.choice(["rmed", "rmed", "compare", "svd"])
    table = dict(OPTIONS) | (COMPARE_OPTIONS if command == "compare" else {})
    if command == "compare":
        table.pop("--fail-above")
    if command == "svd":
        table = {k: table[k] for k in ("--steps", "--every")} | {k: COMPARE_OPTIONS[k] for k in ("--rank", "--energy")}
    chosen = b.rng.sample(sorted(table), b.rng.randint(1, 2))
    extra = []
    for option in chosen:
        extra += [option, str(b.rng.choice(table[option]))]
    if command == "rmed":
        args = b.audit(b.seeds[b.rng.choice(["gpt2", "run_a"])]) + extra
    elif command == "svd":
        args = ["svd", str(b.seeds["run_a"]), "--layers", "*mlp*", *extra, "--json", str(b.out)]
    else:
        args = ["compare", str(b.seeds["run_a"]), str(b.seeds["run_b"]), "--layers", GPT2_LAYER, *FAST, "--no-cache",
                "--match-loss", *extra, "--json", str(b.out)]
    return b.case("options", " ".join(extra), args, expect=frozenset({0, 1, 2, 3}))


KINDS: dict[str, tuple[float, Callable[[Builder], Case]]] = {  # kind → (weight, maker)
    "config": (3, config_case), "safetensors": (3, safetensors_case), "index": (2, index_case),
    "tokenizer": (1, tokenizer_case), "custom-code": (1, custom_code_case), "pickle": (0.5, pickle_case),
    "text-data": (3, text_data_case), "tensor-data": (2.5, tensor_data_case), "report": (3, report_case),
    "cache": (1.5, cache_case), "run": (2, run_case), "output": (2, output_case), "options": (2, options_case),
    "json-data": (1.5, json_data_case), "adapter": (1.5, adapter_case), "hub": (1, hub_case),
}


def generate(seeds: dict[str, Path], work: Path, n: int, seed: int = 0, kinds: list[str] | None = None,
             start: int = 0) -> Iterator[Case]:
    """Cases ``start`` … ``start + n - 1`` of the stream for ``seed``: case ``i`` is made by the kind and
    random stream of ``(seed, i)`` alone."""
    names = kinds or list(KINDS)
    weights = [KINDS[k][0] for k in names]
    for i in range(start, start + n):
        rng = random.Random(f"{seed}:{i}")
        kind = rng.choices(names, weights)[0]
        yield KINDS[kind][1](Builder(seeds, work / f"case-{i}", rng))
