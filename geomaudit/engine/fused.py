"""Fused q/k/v parameters split into their query, key and value blocks (``--split-fused``).

Several architectures compute the attention's query, key and value with one projection whose output axis holds all
three, e.g. GPT-2's ``c_attn`` (``Conv1D``, weight [in, 3·out]). The three blocks have very different curvature
scales (the key bias's Hessian is exactly 0: softmax ignores a shift common to a row), so the median of the fused
tensor's |H_ii| is taken among a mix of scales and max/median measures the mix, not the layer: GPT-2's ``c_attn``
has R_med ≥ 1000 (R_med_stab saturated) in every run. Split, each block is audited as a layer of its own.

``FUSED`` is the one table of known layouts: the class of the module that owns the fused parameters, their names
inside it, the axis of the weight that holds q, k and v (a bias has one axis), and the layout along that axis as
``groups`` repeats of the segments ``(label, width)`` read from the module (``Layout``). Every row is tested on a
tiny model built from a config (``tests/engine/test_fused.py``): zeroing one block makes the gradient of its
partners vanish exactly (q = 0 leaves the scores independent of k, k = 0 of q, v = 0 the output of q and k).

A block's name is its parameter's with ``:`` and the label, e.g. ``transformer.h.0.attn.c_attn.weight:q``; a block
keeps the fused tensor's other axes, so its shape is the fused shape with the split axis cut to the block's width.
Coordinates are sampled within the block (``sample_indices`` of the block's shape) and mapped to the fused tensor's
flat indices, which is what the engine differentiates.
"""

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

SEPARATOR = ":"
LABELS = ("q", "k", "v")


@dataclass(frozen=True)
class Layout:
    """Along the split axis: ``groups`` repeats of ``segments`` ((label, width), in memory order)."""

    groups: int
    segments: tuple[tuple[str, int], ...]

    def positions(self) -> dict[str, np.ndarray]:
        """Each label's positions along the split axis, ascending."""
        period = sum(w for _, w in self.segments)
        out, offset = {}, 0
        for label, width in self.segments:
            runs = [g * period + offset + np.arange(width) for g in range(self.groups)]
            out[label] = np.concatenate(runs).astype(np.int64)
            offset += width
        return out

    @property
    def length(self) -> int:
        return self.groups * sum(w for _, w in self.segments)


def _qkv(q: int, k: int, v: int) -> tuple[tuple[str, int], ...]:
    return (("q", q), ("k", k), ("v", v))


def _falcon(m) -> Layout:
    """Falcon: grouped [kv_heads, heads/kv_heads + 2, head_dim] (new architecture), multi-query [heads + 2,
    head_dim], else per head [heads, 3, head_dim] (``FalconAttention._split_heads``)."""
    h, d = m.num_heads, m.head_dim
    if m.new_decoder_architecture:
        return Layout(m.num_kv_heads, _qkv(h // m.num_kv_heads * d, d, d))
    return Layout(1, _qkv(h * d, d, d)) if m.multi_query else Layout(h, _qkv(d, d, d))


@dataclass(frozen=True)
class FusedLayout:
    owner: str                     # class name of the module holding the fused parameters
    params: tuple[str, ...]        # their names inside it
    axis: int                      # the weight's axis holding q, k, v (a 1-D bias: its only axis)
    layout: Callable[[nn.Module], Layout]  # read from the owner module


FUSED = (
    # GPT-2: Conv1D weight [in, 3·out]; query, key, value = c_attn(x).split(embed_dim)
    FusedLayout("GPT2Attention", ("c_attn.weight", "c_attn.bias"), -1,
                lambda m: Layout(1, _qkv(m.embed_dim, m.embed_dim, m.embed_dim))),
    # GPT-BigCode: multi-query [q: embed, k: head_dim, v: head_dim], else per head [heads, 3, head_dim]
    FusedLayout("GPTBigCodeAttention", ("c_attn.weight", "c_attn.bias"), 0,
                lambda m: Layout(1, _qkv(m.embed_dim, m.kv_dim, m.kv_dim)) if m.multi_query
                else Layout(m.num_heads, _qkv(m.head_dim, m.head_dim, m.head_dim))),
    # GPT-NeoX / Pythia: per head [heads, 3, head_size]
    FusedLayout("GPTNeoXAttention", ("query_key_value.weight", "query_key_value.bias"), 0,
                lambda m: Layout(m.config.num_attention_heads, _qkv(m.head_size, m.head_size, m.head_size))),
    # BLOOM: per head [heads, 3, head_dim]
    FusedLayout("BloomAttention", ("query_key_value.weight", "query_key_value.bias"), 0,
                lambda m: Layout(m.num_heads, _qkv(m.head_dim, m.head_dim, m.head_dim))),
    FusedLayout("FalconAttention", ("query_key_value.weight", "query_key_value.bias"), 0, _falcon),
    # CodeGen: [mp_num, q, v, k] with mp_num = 4 (note the order)
    FusedLayout("CodeGenAttention", ("qkv_proj.weight",), 0,
                lambda m: Layout(m.mp_num, (("q", m.embed_dim // m.mp_num), ("v", m.embed_dim // m.mp_num),
                                            ("k", m.embed_dim // m.mp_num)))),
    # Phi-3: [q: heads·head_dim, k: kv_heads·head_dim, v: kv_heads·head_dim]
    FusedLayout("Phi3Attention", ("qkv_proj.weight",), 0,
                lambda m: Layout(1, _qkv(m.config.num_attention_heads * m.head_dim,
                                         m.num_key_value_heads * m.head_dim, m.num_key_value_heads * m.head_dim))),
    # torch.nn.MultiheadAttention with equal q/k/v dimensions: in_proj_weight [3·embed, embed]
    FusedLayout("MultiheadAttention", ("in_proj_weight", "in_proj_bias"), 0,
                lambda m: Layout(1, _qkv(m.embed_dim, m.embed_dim, m.embed_dim))),
)

# names that look like a fused q/k/v projection, for saying so when no row of FUSED covers one
FUSED_LOOKING = re.compile(r"(^|\.)(c_attn|query_key_value|qkv_proj|qkv|Wqkv|W_pack|in_proj_weight|in_proj_bias)"
                           r"(\.|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Block:
    """The ``label`` block of the fused parameter ``param`` (shape ``fused_shape``): ``positions`` along ``axis``."""

    param: str
    label: str
    fused_shape: tuple[int, ...]
    axis: int
    positions: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.param}{SEPARATOR}{self.label}"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.positions) if a == self.axis else n for a, n in enumerate(self.fused_shape))

    def fused_indices(self, flat: np.ndarray) -> np.ndarray:
        """The fused tensor's flat indices of the block's flat (row-major) indices ``flat``; ascending in, ascending
        out (positions ascend along the axis).

        >>> b = Block("w", "k", (2, 6), 1, np.array([2, 3]))
        >>> b.shape, b.fused_indices(np.arange(4)).tolist()
        ((2, 2), [2, 3, 8, 9])
        """
        coords = list(np.unravel_index(np.asarray(flat, dtype=np.int64), self.shape))
        coords[self.axis] = self.positions[coords[self.axis]]
        return np.ravel_multi_index(tuple(coords), self.fused_shape).astype(np.int64)

    def describe(self) -> dict:
        return {"name": self.param, "shape": list(self.fused_shape)}


def fused_blocks(model: nn.Module) -> tuple[dict[str, tuple[Block, ...]], list[str]]:
    """The q, k, v blocks of every fused parameter whose owner module is in ``FUSED`` (parameter name → blocks), and
    the trainable parameters that look fused (``FUSED_LOOKING``) but are not covered: no row, or a row whose layout
    does not add up to the tensor's axis (e.g. GPT-2's cross-attention ``c_attn``, which holds k and v only)."""
    rows = {row.owner: row for row in FUSED}
    found: dict[str, tuple[Block, ...]] = {}
    for prefix, module in model.named_modules():
        row = rows.get(type(module).__name__)
        if row is None:
            continue
        named = dict(module.named_parameters())
        for local in row.params:
            param = named.get(local)
            if param is None or not param.requires_grad:
                continue
            shape = tuple(param.shape)
            axis = (row.axis if param.ndim > 1 else 0) % param.ndim
            layout = row.layout(module)
            if layout.length != shape[axis]:
                continue
            name = f"{prefix}.{local}" if prefix else local
            found[name] = tuple(Block(name, label, shape, axis, at) for label, at in layout.positions().items())
    uncovered = [n for n, p in model.named_parameters()
                 if p.requires_grad and n not in found and FUSED_LOOKING.search(n)]
    return found, uncovered


def select(names: Sequence[str], blocks: dict[str, tuple[Block, ...]], patterns: Sequence[str]) -> list[str]:
    """``names`` with each fused parameter replaced by its blocks' names, kept where a glob of ``patterns`` matches
    the block's name or its parameter's (all if ``patterns`` is empty)."""
    out = []
    for n in names:
        for candidate in [b.name for b in blocks[n]] if n in blocks else [n]:
            if not patterns or any(fnmatch.fnmatchcase(c, p) for p in patterns for c in {candidate, n}):
                out.append(candidate)
    return out
