"""Audits on several processes: ``torchrun --nproc-per-node N -m geomaudit rmed|compare …`` (SPEC §2).

Every rank loads the checkpoint and the batch, and runs the same audit in the same order. The work items are
(checkpoint × layer × coordinate piece): each layer's sampled coordinates are split into one contiguous piece per
rank, piece p going to rank (p + t) mod N, where t counts the layers audited so far (so ragged pieces rotate). A rank
computes the Hessian rows of its piece only; one all-reduce (sum) per layer gives every rank the whole layer — the
other ranks' rows are exact zeros there, and x + 0 = x, so the values are bit for bit a single process's when every
rank computes as that process would (same device kind, dtype and kernels). A layer's ``--slq`` spectrum is computed
by one rank in the same rotation and broadcast. Rank 0 alone reads and writes the result cache and broadcasts what it
found; rank 0 alone prints and writes the report. Backends: gloo on CPU, NCCL on CUDA (rank r on ``cuda:LOCAL_RANK``).
Several nodes work as torchrun sets them up (``--nnodes``, ``--rdzv-endpoint``).
"""

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .engine.hdiag import DiagonalEngine, HessianColumns


def launched() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank under torchrun (0 when not launched by it); needs no torch import."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


@dataclass(frozen=True)
class Group:
    """The processes of one torchrun launch."""

    rank: int
    size: int

    def piece(self, count: int, turn: int) -> range:
        """The positions 0..count-1 this rank computes at the ``turn``-th layer (contiguous, near-equal pieces)."""
        p = (self.rank - turn) % self.size
        base, extra = divmod(count, self.size)
        start = p * base + min(p, extra)
        return range(start, start + base + (p < extra))

    def total(self, tensor: Tensor) -> Tensor:
        """The element-wise sum of ``tensor`` over the ranks, in place."""
        torch.distributed.all_reduce(tensor)
        return tensor

    def broadcast(self, value, src: int = 0):
        """Rank ``src``'s ``value`` (any picklable object), on every rank."""
        box = [value]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]


def join(device: torch.device) -> tuple[Group | None, torch.device]:
    """Under torchrun, join its process group (once) and return it with this rank's device; else ``(None, device)``.

    gloo on CPU, NCCL on CUDA, where rank r computes on ``cuda:LOCAL_RANK``.
    """
    if not launched():
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Group(torch.distributed.get_rank(), torch.distributed.get_world_size()), device


def leave() -> None:
    """Leave the process group (after the last collective; a no-op outside torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class ShardedEngine(DiagonalEngine):
    """A ``DiagonalEngine`` whose layers are computed piecewise by the ranks of ``group`` and summed."""

    def __init__(self, group: Group, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.group, self.turn = group, 0

    def _accumulate(self, name: str, indices: Sequence[int] | Tensor, on_chunk: Callable[[int], None] | None,
                    keep_columns: bool, across: Sequence[str] = (), rows: range | None = None) -> HessianColumns:
        mine = self.group.piece(len(indices), self.turn)
        self.turn += 1
        cols = super()._accumulate(name, indices, on_chunk, keep_columns, across, rows=mine)
        for part in (cols.diag, cols.block, cols.sq_norms, cols.sq_norms_across):
            self.group.total(part)
        if on_chunk:  # the other ranks' share of the work, done by now
            on_chunk((len(indices) - len(mine)) * len(self.micro_batches))
        return cols

    def abs_spectrum(self, name: str, probes: int = 8, steps: int = 40, seed: int = 0) -> dict[str, float]:
        owner = self.turn % self.group.size
        self.turn += 1
        mine = super().abs_spectrum(name, probes, steps, seed) if self.group.rank == owner else None
        return self.group.broadcast(mine, src=owner)
