"""What an audit will do before it starts (a :class:`Plan`), and how far it has got while it runs (a
:class:`Tracker`: counts, elapsed time, an estimate of the time left). No printing here: the command line shows
both as one plan line, rich bars on a terminal, and plain lines every few seconds elsewhere (``cli.common``).

The unit of work is the Hessian-vector product (HVP): one double-backward per sampled coordinate and micro-batch
(with ``--smed``, one per column of a dense block), the unit ``engine.audit`` reports its progress in.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 'es' if word.endswith('ch') else 's'}"


def clock(seconds: float) -> str:
    """``0:42``, ``3:10``, ``1:02:05``: elapsed or remaining time as the progress lines print it."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass(frozen=True)
class PlannedLayer:
    name: str
    shape: tuple[int, ...]
    coords: int  # coordinates sampled: min(--coords, entries)
    hvps: int  # HVPs per checkpoint: coordinates (or dense columns) × micro-batches
    checks: int = 0  # at most this many recomputed for the round-off check (``engine.roundoff``) per checkpoint


@dataclass(frozen=True)
class Plan:
    """The checkpoints an audit will compute, its layers and their work, before any Hessian is computed.

    ``hessian`` is False for ``--metric r_u|r_v``, which reads singular values only. ``note`` qualifies the plan
    (an upper bound when the checkpoints to audit depend on losses not computed yet).
    """

    checkpoints: tuple[str, ...]
    layers: tuple[PlannedLayer, ...]
    micro_batches: int
    hessian: bool = True
    note: str | None = None

    @property
    def hvps(self) -> int:
        """The HVPs of the sampled coordinates, in all."""
        return len(self.checkpoints) * sum(la.hvps for la in self.layers) if self.hessian else 0

    @property
    def checks(self) -> int:
        """At most this many entries recomputed per checkpoint by the round-off check."""
        return sum(la.checks for la in self.layers) if self.hessian else 0

    @property
    def work(self) -> int:
        """HVPs and round-off checks in all (an upper bound: the check may recompute fewer)."""
        return self.hvps + len(self.checkpoints) * self.checks

    def line(self) -> str:
        """``plan: 8 checkpoints × 28 layers, 5,600 coordinates per checkpoint, 1 micro-batch: 45,696 HVPs in all
        (44,800 for the coordinates, up to 896 to check round-off)``."""
        head = f"plan: {plural(len(self.checkpoints), 'checkpoint')} × {plural(len(self.layers), 'layer')}"
        if not self.hessian:
            text = f"{head}, singular values only (no Hessian)"
        else:
            coords = sum(la.coords for la in self.layers)
            text = (f"{head}, {coords:,} coordinates per checkpoint, {plural(self.micro_batches, 'micro-batch')}: "
                    f"{self.work:,} HVPs in all ({self.hvps:,} for the coordinates, up to "
                    f"{self.work - self.hvps:,} to check round-off)")
        return text + (f"; {self.note}" if self.note else "")

    def grids(self) -> list:
        """The plan as a table (``--dry-run``): the layers with their coordinates and HVPs per checkpoint, the
        checkpoints and the plan line under it."""
        from .report.layout import Column, Grid, number

        columns = [Column("shape", right=False)] + ([Column("coords"), Column("HVPs")] if self.hessian else [])
        grid = Grid(f"plan: the layers of each checkpoint ({plural(self.micro_batches, 'micro-batch')})",
                    [Column("layer", right=False)], columns)
        for la in self.layers:
            grid.add_row(la.name, "×".join(map(str, la.shape)),
                         *([number(la.coords, ",d"), number(la.hvps, ",d")] if self.hessian else []))
        grid.caption = "\n".join([f"checkpoint {i}: {path}" for i, path in enumerate(self.checkpoints, 1)]
                                  + [self.line()])
        return [grid]


@dataclass
class Tracker:
    """Progress through a plan: HVPs done of the total, which checkpoint and layer, time elapsed and left.

    The total starts as the plan's work and follows what the audit announces: a layer served from the cache runs
    no HVP (its share leaves the total when the next layer starts), and a checkpoint's round-off check, announced
    as a layer that is not in the plan, replaces the plan's upper bound for it by its real count (and leaves the
    total when the checkpoint ends without one). The time left is the work left at the rate so far.
    """

    plan: Plan | None = None
    now: Callable[[], float] = time.monotonic
    started: float = math.nan
    total: int = 0
    done: int = 0
    checkpoint: tuple[int, int] | None = None
    layer: tuple[int, int, str] | None = None
    layer_work: int = 0
    layer_done: int = 0
    reserved: int = 0  # the current checkpoint's share of the plan's round-off bound, not announced yet

    def __post_init__(self) -> None:
        self.started = self.now()

    def start(self, plan: Plan | None) -> None:
        self.plan, self.started, self.done, self.total = plan, self.now(), 0, plan.work if plan else 0
        self.checkpoint = self.layer = None
        self.layer_work = self.layer_done = self.reserved = 0

    @property
    def planned(self) -> set[str]:
        return {la.name for la in self.plan.layers} if self.plan else set()

    def on_checkpoint(self, position: int, count: int) -> None:
        self._close_checkpoint()
        self.checkpoint = (position, count)
        self.reserved = self.plan.checks if self.plan else 0

    def on_layer(self, position: int, count: int, name: str, work: int) -> None:
        self._close_layer()
        self.layer, self.layer_work, self.layer_done = (position, count, name), work, 0
        if self.plan is not None and name not in self.planned:  # the round-off check
            self.total += work - self.reserved
            self.reserved = 0

    def on_chunk(self, n: int) -> None:
        self.done += n
        self.layer_done += n

    def _close_layer(self) -> None:
        """A layer that ran fewer HVPs than it announced was (partly) served from the cache."""
        if self.plan is not None and self.layer is not None:
            self.total -= max(0, self.layer_work - self.layer_done)
        self.layer, self.layer_work, self.layer_done = None, 0, 0

    def _close_checkpoint(self) -> None:
        self._close_layer()
        self.total -= self.reserved
        self.reserved = 0

    def finish(self) -> None:
        self._close_checkpoint()

    @property
    def elapsed(self) -> float:
        return self.now() - self.started

    def left(self) -> float | None:
        """Seconds left at the rate so far; None before the first HVP."""
        if not self.done or self.plan is None:
            return None
        return max(0, self.total - self.done) * self.elapsed / self.done

    def line(self) -> str:
        """``audited 120 of 5,600 HVPs (checkpoint 1 of 8, layer 3 of 28), 0:42 elapsed, about 3:10 left``."""
        where = []
        if self.checkpoint:
            where.append(f"checkpoint {self.checkpoint[0]} of {self.checkpoint[1]}")
        if self.plan is None and self.layer:  # work outside an audit (training in `geomaudit experiment`)
            position, count, name = self.layer
            text = f"{name}: {self.layer_done:,} of {self.layer_work:,} ({position} of {count})"
        else:
            if self.layer and self.layer[2] in self.planned:
                where.append(f"layer {self.layer[0]} of {self.layer[1]}")
            elif self.layer:
                where.append(self.layer[2])
            if not self.plan.hessian:  # singular values: no HVP to count
                text = ", ".join(where) or "started"
            else:
                text = f"audited {self.done:,} of {max(self.total, self.done):,} HVPs" + (
                    f" ({', '.join(where)})" if where else "")
        left = self.left()
        return f"{text}, {clock(self.elapsed)} elapsed" + ("" if left is None else f", about {clock(left)} left")

    def estimate(self) -> str | None:
        """``estimate: about 8:30 in all (0:51 for the first 560 of 5,600 HVPs)``, or None before the first HVP."""
        left = self.left()
        if left is None:
            return None
        return (f"estimate: about {clock(self.elapsed + left)} in all ({clock(self.elapsed)} for the first "
                f"{self.done:,} of {self.total:,} HVPs)")
