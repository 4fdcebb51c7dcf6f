"""From command-line settings to a report: io → engine → results (no printing here)."""

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .cache import CacheEntry, checkpoint_digest
from .distributed import ShardedEngine, join
from .engine.audit import audit_checkpoint, audit_gradient, audit_loss, select_layers
from .engine.fused import fused_blocks
from .engine.hdiag import DiagonalEngine
from .engine.roundoff import TOP as CHECKED_TOP
from .engine.stats import alignment_stats, saturated
from .errors import InputError, UsageError
from .io.checkpoints import LoadedModel, load_checkpoint
from .io.data import AuditBatch, build_batch, embedded_corpus, has_labels, read_records
from .io.optimizer import adam_state, adaptive_step
from .io.trajectory import CheckpointRef, discover, expand_runs
from .progress import Plan, PlannedLayer
from .report.document import report_document
from .results import CheckpointResult, json_number
from .runtime import check_seed, resolve_device, set_precision

CHECKED = CHECKED_TOP + 1  # entries per layer the round-off check recomputes at most: the top ones and the median
EMBEDDED_SOURCE = "embedded corpus (pydoc_data.topics)"
LOSS_SOURCES = ("audit", "trainer_state")


@dataclass(frozen=True)
class AuditConfig:
    """Everything an audit depends on; recorded in the report's ``settings``."""

    checkpoint: str
    data: str | None = None
    coords: int = 200
    layers: tuple[str, ...] = ()
    topk: int = 10
    batch_size: int | None = None
    micro_batch: int | None = None
    max_length: int = 128
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    task: str = "auto"
    model: str | None = None
    loss: str | None = None
    allow_pickle: bool = False
    chunk_size: int | None = None
    steps: tuple[int, ...] | None = None
    every: int | None = None
    loss_from: str = "audit"
    cache_dir: str | None = None
    geometry: bool = False
    dense_max: int = 2048
    slq: bool = False
    across: tuple[str, ...] = ()
    alignment: bool = False
    merge: bool = False
    ci: bool = False  # show the per-layer R_med interval as a table column (it is in the JSON either way)
    split_fused: bool = False  # audit fused q/k/v parameters as their q, k and v blocks (``engine.fused``)

    def validate(self) -> None:
        for name in ("coords", "topk", "batch_size", "micro_batch", "max_length", "chunk_size", "dense_max"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        check_seed(self.seed)
        if (self.slq or self.across) and not self.geometry:
            raise UsageError(f"{'--slq' if self.slq else '--across'} works on the Hessian columns: it needs --smed")
        if self.split_fused and self.geometry:
            raise UsageError("--split-fused does not combine with --smed yet: S_med and r_diag are taken over whole "
                             "parameter tensors")
        if self.loss_from not in LOSS_SOURCES:
            raise UsageError(f"--loss-from must be one of {', '.join(LOSS_SOURCES)}, got {self.loss_from!r}")

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("checkpoint", "data", "cache_dir")}


@dataclass
class Progress:
    """Callbacks a front end passes in to show progress; every one is optional.

    ``on_plan(plan)`` comes before an audit's first Hessian (``None`` when the audit is over),
    ``on_checkpoint(position, count)`` as each planned checkpoint starts, then ``on_layer`` and ``on_chunk`` as
    ``engine.audit.audit_checkpoint`` describes them.
    """

    on_status: Callable[[str], None] | None = None
    on_layer: Callable[[int, int, str, int], None] | None = None
    on_chunk: Callable[[int], None] | None = None
    on_plan: Callable[[Plan | None], None] | None = None
    on_checkpoint: Callable[[int, int], None] | None = None

    def status(self, message: str) -> None:
        if self.on_status:
            self.on_status(message)

    def plan(self, plan: Plan | None) -> None:
        if self.on_plan:
            self.on_plan(plan)

    def checkpoint(self, position: int, count: int) -> None:
        if self.on_checkpoint:
            self.on_checkpoint(position, count)


MAX_NEW_LABELS = 100_000


def _label_count(records) -> int | None:
    """Classes of a new classification head: the largest integer label + 1 (at least 2), at most
    ``MAX_NEW_LABELS`` (one stray huge label would otherwise build a head of that many rows)."""
    labels = None if records is None or isinstance(records, dict) else records.labels  # text or image folders
    integer = re.compile(r"-?\d{1,18}")
    if not labels or not all((isinstance(v, int) and not isinstance(v, bool)) or
                             (isinstance(v, str) and integer.fullmatch(v)) for v in labels):
        return None
    largest = max(int(v) for v in labels)
    if largest >= MAX_NEW_LABELS:
        raise InputError(f"the data has a label of {_short_int(largest)}: integer labels index the classes "
                         f"0..n-1 of a classification head, which geomaudit builds with at most {MAX_NEW_LABELS:,}")
    return max(2, largest + 1)


def _short_int(n: int) -> str:
    text = str(n)
    return text if len(text) <= 20 else f"{text[:8]}… ({len(text)} digits)"


class Auditor:
    """Audits checkpoints of one architecture on one batch, built once from the first checkpoint loaded."""

    def __init__(self, config: AuditConfig, progress: Progress | None = None):
        config.validate()
        self.config, self.progress = config, progress or Progress()
        self.dtype = set_precision(config.precision)
        self.group, self.device = join(resolve_device(config.device))  # torchrun: this rank's group and device
        self.records = read_records(Path(config.data)) if config.data else None
        self.batch: AuditBatch | None = None
        self.model_info: dict | None = None
        self._loaded: tuple[Path, LoadedModel, list] | None = None
        self._digests: dict[Path, str] = {}
        self._announced: set[Path] = set()
        self._noted = False  # the --split-fused notes are said once

    def _load(self, path: Path, probe: bool = True) -> tuple[LoadedModel, list]:
        """The checkpoint at ``path`` on the audit device, with its micro-batches (the last one is kept). Its
        ``loading`` line is printed once, also when it is loaded again (compare: for its loss, then its audit).
        ``probe=False`` skips the forward pass that checks an fp64 audit's precision (``--dry-run``)."""
        if self._loaded and self._loaded[0] == path:
            return self._loaded[1], self._loaded[2]
        c, records = self.config, self.records
        if path not in self._announced:
            self._announced.add(path)
            self.progress.status(f"loading {path}")
        labelled = records is not None and has_labels(records)
        loaded = load_checkpoint(path, task=c.task, has_labels=labelled, num_labels=_label_count(records),
                                 factory=c.model, loss=c.loss, allow_pickle=c.allow_pickle, seed=c.seed,
                                 merge=c.merge)
        if self.batch is None:
            source = c.data
            if records is None:
                if not loaded.task.default_batch or loaded.tokenizer is None:
                    raise UsageError("--data is needed: only a language model with a tokenizer has a default batch")
                records, source = embedded_corpus(), EMBEDDED_SOURCE
            self.batch = build_batch(records, loaded, batch_size=c.batch_size, max_length=c.max_length,
                                     seed=c.seed, source=source)
            self.progress.status(f"audit batch: {self.batch.selection} of {source}")
            self.model_info = loaded.describe()
        loaded.model.to(device=self.device, dtype=self.dtype)
        micro = self.batch.micro_batches(loaded, c.micro_batch or self.batch.examples, self.device, self.dtype)
        if probe and self.dtype == torch.float64 and self.model_info.get("float32_modules") is None:
            lowered = self.model_info["float32_modules"] = loaded.check_precision(micro[0].tensors)
            if lowered:
                self.progress.status(f"warning: {len(lowered)} module(s) computed below float64 in this fp64 audit, "
                                     f"so its numbers are only float32-accurate: {', '.join(lowered)}")
        self._loaded = (path, loaded, micro)
        return loaded, micro

    def plan(self, refs: list[CheckpointRef], hessian: bool = True, note: str | None = None,
             probe: bool = True) -> Plan:
        """The work of auditing ``refs``: their layers (from the first checkpoint: one architecture) with the
        coordinates each samples and the HVPs those take (every column of a dense ``--smed`` block)."""
        c = self.config
        loaded, micro = self._load(refs[0].path, probe=probe)
        params = dict(loaded.model.named_parameters())
        names, blocks = self._layers(loaded) if hessian else (select_layers(loaded.model, c.layers), {})
        if not hessian:
            names = [n for n in names if params[n].ndim >= 2]
        layers = []
        for name in names:
            shape = blocks[name].shape if name in blocks else tuple(params[name].shape)
            numel = int(np.prod(shape, dtype=np.int64))
            coords = min(c.coords, numel)
            columns = numel if c.geometry and numel <= c.dense_max else coords
            layers.append(PlannedLayer(name, shape, coords, columns * len(micro), min(CHECKED, coords) * len(micro)))
        return Plan(tuple(str(r.path) for r in refs), tuple(layers), len(micro), hessian=hessian, note=note)

    def _cache(self, path: Path) -> CacheEntry:
        c = self.config
        if path not in self._digests:
            self._digests[path] = checkpoint_digest(path)
        key = {"checkpoint": self._digests[path], "data": self.batch.fingerprint, "coords": c.coords,
               "seed": c.seed, "precision": c.precision, "task": c.task, "micro_batch": c.micro_batch,
               "model": c.model, "loss": c.loss, "geometry": c.geometry, "dense_max": c.dense_max, "slq": c.slq,
               "merge": c.merge, "split_fused": c.split_fused}
        owner = self.group is None or self.group.rank == 0  # rank 0 alone reads and writes the cache
        entry = CacheEntry(Path(c.cache_dir) if c.cache_dir and owner else None, key)
        if entry.corrupt:
            self.progress.status(f"ignoring a corrupt cache entry for {path}: recomputing")
        return entry

    def loss(self, ref: CheckpointRef) -> float:
        """The audit loss of a checkpoint, or its logged training loss with ``--loss-from trainer_state``."""
        if self.config.loss_from == "trainer_state":
            if ref.logged_loss is None:
                raise InputError(f"trainer_state.json logs no loss at step {ref.step} ({ref.path})")
            return ref.logged_loss
        loaded, micro = self._load(ref.path)
        entry = self._cache(ref.path)
        if entry.loss is None:
            entry.save(audit_loss(loaded.model, loaded.loss_fn, micro))
        return entry.loss if self.group is None else self.group.broadcast(entry.loss)

    def audit(self, ref: CheckpointRef, run: str | None = None) -> CheckpointResult:
        """Every selected layer of one checkpoint, reusing and extending its cache entry."""
        loaded, micro = self._load(ref.path)
        entry = self._cache(ref.path)
        loss = entry.loss if entry.loss is not None else audit_loss(loaded.model, loaded.loss_fn, micro)
        cached = entry.layers
        if self.group is not None:  # every rank audits what rank 0 found missing from its cache, at its loss
            loss, cached = self.group.broadcast((loss, cached))
        c = self.config
        layers, blocks = self._layers(loaded)
        result = audit_checkpoint(
            loaded.model, loaded.loss_fn, micro, layers, blocks=blocks, coords=c.coords,
            seed=c.seed, topk=c.topk, chunk_size=c.chunk_size, path=str(ref.path), step=ref.step, loss=loss,
            geometry=c.geometry, dense_max=c.dense_max, slq=c.slq,
            across=select_layers(loaded.model, c.across) if c.across else (),
            cached=cached, on_result=lambda layer: entry.save(loss, layer.to_dict()),
            on_layer=self.progress.on_layer, on_chunk=self.progress.on_chunk,
            make_engine=DiagonalEngine if self.group is None else partial(ShardedEngine, self.group))
        entry.save(loss)
        if c.alignment:
            result = replace(result, layers=self._aligned(ref, loaded, micro, result.layers))
        return replace(result, run=run, logged_loss=ref.logged_loss)

    def _layers(self, loaded: LoadedModel) -> tuple[list[str], dict]:
        """The audited layers' names and the fused blocks among them; with ``split_fused``, notes (once) on fused
        parameters that are not split and on a selection that holds none that is."""
        if not self.config.split_fused:
            return select_layers(loaded.model, self.config.layers), {}
        found, uncovered = fused_blocks(loaded.model)
        layers = select_layers(loaded.model, self.config.layers, found)
        blocks = {b.name: b for bs in found.values() for b in bs if b.name in layers}
        if not self._noted:
            self._noted = True
            left = [n for n in uncovered if n in layers]
            if left:
                self.progress.status(f"note: --split-fused has no layout for {', '.join(left)}: audited whole "
                                     "(known layouts: geomaudit.engine.fused.FUSED)")
            if not blocks:
                self.progress.status("note: --split-fused: no selected layer is a fused q/k/v parameter of a known "
                                     "layout; nothing is split")
        return layers, blocks

    def _aligned(self, ref: CheckpointRef, loaded: LoadedModel, micro: list, layers: tuple) -> tuple:
        """Each layer with how its gradient and Adam step line up with |H_ii| at the sampled coordinates."""
        moments = adam_state(ref.path, loaded.model)
        grads = audit_gradient(loaded.model, loaded.loss_fn, micro, list(dict.fromkeys(la.param for la in layers)))
        aligned = []
        for la in layers:
            if la.zero_hessian:  # no order among round-off values to correlate with
                aligned.append(la)
                continue
            at = torch.as_tensor(la.indices)
            g = grads[la.param].reshape(-1)[at.to(grads[la.param].device)].double().cpu().numpy()
            step = adaptive_step(moments[la.param]).reshape(-1)[at].double().numpy()
            aligned.append(replace(la, alignment=alignment_stats(la.h_diag, g, step)))
        return tuple(aligned)

    def document(self, command: str, checkpoints: list[CheckpointResult], extra: dict) -> dict:
        _, loaded, micro = self._loaded
        data = self.batch.describe(loaded, micro)
        document = report_document(command, self.config.settings(), self.model_info, data, checkpoints,
                                   self.device, self.dtype) | extra
        document["environment"]["ranks"] = 1 if self.group is None else self.group.size
        return document


def _rmed_setup(config: AuditConfig, progress: Progress | None, dry_run: bool):
    config.validate()
    trajectory = discover(config.checkpoint, config.steps, config.every)
    check_alignment(config, trajectory.checkpoints)
    auditor = Auditor(config, progress)
    plan = auditor.plan(list(trajectory.checkpoints), probe=not dry_run)
    auditor.progress.status(plan.line())
    return trajectory, auditor, plan


def plan_rmed(config: AuditConfig, progress: Progress | None = None) -> Plan:
    """What ``run_rmed`` would compute (``--dry-run``): loads the first checkpoint and builds the audit batch to
    resolve the layers and micro-batches; no forward or backward pass, no cache read or written."""
    return _rmed_setup(config, progress, dry_run=True)[2]


def run_rmed(config: AuditConfig, progress: Progress | None = None) -> dict:
    """Audit one checkpoint, or every picked checkpoint of a trajectory on the same batch (SPEC §4)."""
    trajectory, auditor, plan = _rmed_setup(config, progress, dry_run=False)
    results = []
    auditor.progress.plan(plan)
    try:
        for n, ref in enumerate(trajectory.checkpoints, 1):
            auditor.progress.checkpoint(n, len(trajectory.checkpoints))
            results.append(auditor.audit(ref, str(trajectory.root)))
    finally:
        auditor.progress.plan(None)
    return auditor.document("rmed", results, {"trajectories": [trajectory.describe()]})


@dataclass(frozen=True)
class CompareConfig:
    """How two sets of runs are paired and compared (SPEC §4; paper Tables 1–2 and 7)."""

    runs_a: tuple[str, ...]
    runs_b: tuple[str, ...]
    match_loss: bool = False
    tolerance: float = 0.02
    levels: tuple[float, ...] | None = None
    reference: str = "a"
    metric: str = "r_med_stab"
    rank: int | None = None
    energy: float = 0.9
    paired: bool = False  # run i of A goes with run i of B: per-repeat ratios, interval over repeats and layers

    def settings(self) -> dict:
        return asdict(self)

    def validate(self, audit: AuditConfig) -> None:
        """Refuse, before any work, what the comparison could not do or would ignore."""
        from .gates import check_metric

        if self.reference not in ("a", "b"):
            raise UsageError(f"--reference must be a or b, got {self.reference!r}")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise UsageError(f"--tolerance is a relative distance, at least 0, got {self.tolerance}")
        if self.levels is not None and not (self.levels and all(math.isfinite(v) and v > 0 for v in self.levels)):
            raise UsageError(f"--levels takes positive losses, got {','.join(map(str, self.levels)) or 'none'}")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if not 0 < self.energy <= 1:
            raise UsageError(f"--energy is a share of the spectrum's energy in (0, 1], got {self.energy}")
        if self.levels is not None and not self.match_loss:
            raise UsageError("--levels applies only with --match-loss")
        check_metric(self.metric, audit)
        extras = [flag for flag, on in (("--smed", audit.geometry), ("--alignment", audit.alignment)) if on]
        if self.metric in SVD_METRICS and audit.split_fused:
            raise UsageError(f"--metric {self.metric} compares whole weight matrices: --split-fused applies to the "
                             "Hessian's statistics")
        if self.metric in SVD_METRICS and extras:
            raise UsageError(f"--metric {self.metric} compares the weights' singular vectors, no Hessian is "
                             f"computed: {' and '.join(extras)} would be ignored")


SVD_METRICS = ("r_u", "r_v")


def check_alignment(config: AuditConfig, refs) -> None:
    """``--alignment`` reads every audited checkpoint's ``optimizer.pt``: all must be there before any work."""
    missing = [ref.path for ref in refs if not (Path(ref.path) / "optimizer.pt").is_file()]
    if config.alignment and missing:
        raise InputError(f"--alignment needs the optimizer state of every audited checkpoint: "
                         f"{Path(missing[0]) / 'optimizer.pt'} does not exist"
                         + (f" (nor in {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _low_rank_values(auditor: Auditor, ref: CheckpointRef, compare: "CompareConfig") -> dict[str, float]:
    """R_u or R_v of the checkpoint's approximately low-rank ≥2-D weights (Sec. 6: only those are compared)."""
    from .engine.svd import model_spectra

    loaded, _ = auditor._load(ref.path)
    names = [n for n in select_layers(loaded.model, auditor.config.layers)
             if dict(loaded.model.named_parameters())[n].ndim >= 2]
    spectra = model_spectra(loaded.model, names, rank=compare.rank, energy=compare.energy)
    return {s["name"]: s[compare.metric] for s in spectra if s["low_rank"]}


def _row(row) -> dict:
    """A layer row for JSON: undefined numbers as null."""
    def number(v):
        return json_number(v) if isinstance(v, float) else [json_number(x) for x in v] if isinstance(v, tuple) else v

    return {k: number(v) for k, v in asdict(row).items()}


def _point(point) -> dict:
    return {"run": point.run, "step": point.step, "loss": point.loss}


def _compare_setup(config: AuditConfig, compare: CompareConfig, progress: Progress | None, dry_run: bool):
    """The runs of both sides, their losses (``None`` in a dry run that would need audit losses), the pairings
    and the plan of the checkpoints they audit."""
    from .compare import Point, pair_by_loss, pair_by_step

    config.validate()
    compare.validate(config)
    sides = {side: [discover(p, config.steps, config.every) for p in expand_runs(patterns)]
             for side, patterns in (("a", compare.runs_a), ("b", compare.runs_b))}
    if compare.paired and len(sides["a"]) != len(sides["b"]):
        raise UsageError(f"--paired needs as many runs in A as in B, got {len(sides['a'])} and {len(sides['b'])}")
    auditor = Auditor(config, progress)
    refs = {(str(t.root), ref.step): ref for runs in sides.values() for t in runs for ref in t.checkpoints}
    check_alignment(config, refs.values())
    unknown = dry_run and compare.match_loss and config.loss_from == "audit"  # pairing needs what a dry run skips

    def loss(ref: CheckpointRef) -> float:
        return math.nan if dry_run and config.loss_from == "audit" else auditor.loss(ref)

    curves = {side: [[Point(str(t.root), ref.step, loss(ref), {}) for ref in t.checkpoints] for t in runs]
              for side, runs in sides.items()}
    try:
        pairings = ([] if unknown else pair_by_loss(curves["a"], curves["b"], compare.levels, compare.tolerance)
                    if compare.match_loss else pair_by_step(curves["a"], curves["b"]))
    except ValueError as err:
        raise InputError(str(err)) from err
    keys = list(refs) if unknown else list(dict.fromkeys(
        (p.run, p.step) for pairing in pairings if pairing.refused is None for p in (*pairing.a, *pairing.b)))
    note = ("at most: which checkpoints --match-loss pairs depends on their audit losses, which a dry run does not "
            "compute" if unknown else None)
    if not keys:
        raise InputError("no pair of checkpoints was within the loss tolerance: nothing was compared "
                         f"({'; '.join(p.refused for p in pairings)})")
    plan = auditor.plan([refs[k] for k in keys], hessian=compare.metric not in SVD_METRICS, note=note,
                        probe=not dry_run)
    auditor.progress.status(plan.line())
    return sides, auditor, refs, curves, pairings, plan


def plan_compare(config: AuditConfig, compare: CompareConfig, progress: Progress | None = None) -> Plan:
    """What ``run_compare`` would compute (``--dry-run``): the runs and their pairing (by step, or by the losses
    of trainer_state.json), the first checkpoint loaded and the audit batch built to resolve the layers; no loss,
    no Hessian, no cache read or written."""
    return _compare_setup(config, compare, progress, dry_run=True)[-1]


def run_compare(config: AuditConfig, compare: CompareConfig, progress: Progress | None = None) -> dict:
    """Pair the checkpoints of runs A and B by step or by loss, audit the paired ones on one batch, compare."""
    from .compare import Point, compare_layers, summarize

    sides, auditor, refs, curves, pairings, plan = _compare_setup(config, compare, progress, dry_run=False)
    audited: dict[tuple, CheckpointResult] = {}

    spectra: dict[tuple, dict] = {}

    def with_values(point: Point) -> Point:
        key = (point.run, point.step)
        if compare.metric in SVD_METRICS:
            if key not in spectra:
                spectra[key] = _low_rank_values(auditor, refs[key], compare)
            return replace(point, values=spectra[key])
        if key not in audited:
            position = len(audited) + 1
            auditor.progress.status(f"auditing {refs[key].path} (checkpoint {position} of {len(plan.checkpoints)})")
            auditor.progress.checkpoint(position, len(plan.checkpoints))
            audited[key] = auditor.audit(refs[key], point.run)
        layers = audited[key].layers
        stab = compare.metric == "r_med_stab"
        def bounds(metric):
            if f"{metric}_ci_low" not in layers[0].stats:
                return {}
            return {la.name: (la.stats[f"{metric}_ci_low"], la.stats[f"{metric}_ci_high"]) for la in layers}

        return replace(point, values={la.name: la.stats[compare.metric] for la in layers},
                       excluded={la.name: "Hessian zero to round-off" for la in layers if la.zero_hessian},
                       saturated=frozenset(la.name for la in layers if stab and saturated(la.stats)),
                       fallback={la.name: la.stats["r_med"] for la in layers} if stab else {},
                       bounds=bounds(compare.metric), fallback_bounds=bounds("r_med") if stab else {})

    pairs = []
    auditor.progress.plan(plan)
    try:
        for pairing in pairings:
            entry = {"label": pairing.label, "step": pairing.step, "level": pairing.level,
                     "refused": pairing.refused, "a": [_point(p) for p in pairing.a],
                     "b": [_point(p) for p in pairing.b], "layers": [], "left_out": [], "summary": None}
            if pairing.refused is None:
                full = replace(pairing, a=tuple(map(with_values, pairing.a)), b=tuple(map(with_values, pairing.b)))
                rows, entry["left_out"] = compare_layers(full, compare.reference, compare.paired)
                entry["layers"] = [_row(r) for r in rows]
                ratios = [r.ratios for r in rows] if compare.paired else [r.ratio for r in rows]
                entry["summary"] = summarize(np.array(ratios).T, seed=config.seed) | {
                    f"layers_clearly_{side}_1": sum(r.apart == side for r in rows) for side in ("above", "below")}
            pairs.append(entry)
    finally:
        auditor.progress.plan(None)
    direction = "B/A" if compare.reference == "a" else "A/B"
    extra = {"trajectories": [t.describe() for runs in sides.values() for t in runs],
             "compare": compare.settings() | {"mode": "loss" if compare.match_loss else "step",
                                              "direction": direction, "loss_source": config.loss_from,
                                              "runs": {side: [str(t.root) for t in runs]
                                                       for side, runs in sides.items()},
                                              "pairs": pairs,
                                              "losses": [_point(p) for side in ("a", "b") for run in curves[side]
                                                         for p in run]}}
    return auditor.document("compare", list(audited.values()), extra)
