"""Options shared by the auditing commands, declared once (Typer ``Annotated`` aliases)."""

from enum import Enum
from typing import Annotated

import typer

DEFAULT_COORDS = 200
DEFAULT_DENSE_MAX = 2048


class Precision(str, Enum):
    fp32 = "fp32"
    tf32 = "tf32"
    fp64 = "fp64"


class Task(str, Enum):
    auto = "auto"
    causal_lm = "causal-lm"
    seq2seq_lm = "seq2seq-lm"
    masked_lm = "masked-lm"
    classification = "classification"
    token_classification = "token-classification"
    image_classification = "image-classification"
    custom = "custom"


class Metric(str, Enum):
    r_med = "r_med"
    r_med_stab = "r_med_stab"
    r_topk = "r_topk"
    s_med = "s_med"
    r_diag_mean = "r_diag_mean"
    r_diag_median = "r_diag_median"
    r_u = "r_u"
    r_v = "r_v"


# the statistics ``rmed`` computes (``r_u``, ``r_v`` are ``svd``'s)
RmedMetric = Enum("RmedMetric", {m.name: m.value for m in Metric if m not in (Metric.r_u, Metric.r_v)}, type=str)


# help panels: every option of a command is listed under one of these
INPUT, SAMPLING, STATISTICS, PRECISION, PAIRING, OUTPUT, GATES = (
    "Input", "Sampling", "Statistics", "Precision and device", "Pairing", "Output", "Gates (CI)")


def flag(*names: str, help: str, panel: str):
    """A boolean flag: no value, so no type shown."""
    return typer.Option(*names, help=help, rich_help_panel=panel, metavar="")


Data = Annotated[str | None, typer.Option("--data", "-d", metavar="FILE", rich_help_panel=INPUT,
                                          help=".jsonl/.csv/.txt text or pre-tokenized .safetensors/.pt. Default "
                                               "for a language model: the embedded English corpus.")]
Coords = Annotated[int, typer.Option("--coords", "-n", metavar="N", rich_help_panel=SAMPLING,
                                     help="Coordinates sampled per layer.")]
Layers = Annotated[list[str] | None, typer.Option("--layers", "-l", metavar="GLOB|N", rich_help_panel=SAMPLING,
                                                  help="Glob over parameter names (repeat for several); an integer "
                                                       "N instead means every layer with N coordinates.")]
TopK = Annotated[int, typer.Option(metavar="K", rich_help_panel=STATISTICS,
                                   help="k of R_topk: the k-th largest |H_ii| over the median.")]
BatchSize = Annotated[int | None, typer.Option(metavar="N", rich_help_panel=INPUT, show_default=False,
                                               help="Examples in the audit batch, a seeded sample of the data "
                                                    "\\[default: the whole file of tensors; 32 of a text file]")]
MicroBatch = Annotated[int | None, typer.Option(metavar="M", rich_help_panel=PRECISION,
                                                help="Examples per forward pass (default: the whole batch); the "
                                                     "Hessian is accumulated exactly.")]
MaxLength = Annotated[int, typer.Option(metavar="N", rich_help_panel=INPUT,
                                        help="Token limit per example for text data.")]
Seed = Annotated[int, typer.Option(metavar="N", rich_help_panel=SAMPLING,
                                   help="Seeds coordinate sampling, MLM masking and new heads.")]
Device = Annotated[str, typer.Option(metavar="DEVICE", rich_help_panel=PRECISION,
                                     help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 …")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", rich_help_panel=PRECISION,
                                                 help="fp32, tf32 matmuls, or fp64.")]
TaskOpt = Annotated[Task, typer.Option("--task", rich_help_panel=INPUT,
                                       help="Loss of a Hugging Face model; auto reads config.json; custom: the "
                                            "model's own loss from labels.")]
Model = Annotated[str | None, typer.Option("--model", metavar="MODULE:FACTORY", rich_help_panel=INPUT,
                                           help="A callable returning the nn.Module of a state-dict checkpoint.")]
Loss = Annotated[str | None, typer.Option("--loss", metavar="MODULE:FN", rich_help_panel=INPUT,
                                          help="Called as fn(model, batch) -> the loss, a mean over examples, or "
                                               "(loss, items) for a mean over items (tokens); default "
                                               "model(**batch).loss.")]
AllowPickle = Annotated[bool, flag("--allow-pickle", panel=INPUT,
                                   help="Unpickle .pt/.bin files that need code execution. Only for files you "
                                        "trust.")]
ChunkSize = Annotated[int | None, typer.Option(metavar="K", rich_help_panel=PRECISION,
                                               help="Hessian-vector products per batch (default: automatic, "
                                                    "halved on out-of-memory).")]
Steps = Annotated[str | None, typer.Option(metavar="S,S,…", rich_help_panel=INPUT,
                                           help="Checkpoints of a trajectory to audit, e.g. 500,1000 (default: "
                                                "all).")]
Every = Annotated[int | None, typer.Option(metavar="N", rich_help_panel=INPUT,
                                           help="Audit the checkpoints whose step is a multiple of N.")]
CacheDir = Annotated[str | None, typer.Option(metavar="DIR", rich_help_panel=OUTPUT,
                                              help="Where finished work is kept (default: $GEOMAUDIT_CACHE_DIR, "
                                                   "else ~/.cache/geomaudit).")]
NoCache = Annotated[bool, flag("--no-cache", panel=OUTPUT, help="Neither read nor write the result cache.")]
CompareMetric = Annotated[Metric, typer.Option("--metric", rich_help_panel=PAIRING,
                                               help="Statistic compared (r_med_stab: footnote 8, as in the paper's "
                                                    "tables; s_med and r_diag_* need --smed; r_u and r_v compare "
                                                    "the low-rank weights of `geomaudit svd`).")]
GateMetric = Annotated[RmedMetric | None, typer.Option("--metric", rich_help_panel=GATES,
                                                       help="Statistic the gates use (default r_med_stab; s_med and "
                                                            "r_diag_* need --smed).")]
Smed = Annotated[bool, flag("--smed", panel=STATISTICS,
                            help="Also S_med (App. A.9) and r_diag (App. F) from the same Hessian columns.")]
Slq = Annotated[bool, flag("--slq", panel=STATISTICS,
                           help="With --smed: S_med of layers above --dense-max from a stochastic Lanczos estimate "
                                "of the whole block's spectrum instead of the sampled submatrix.")]
Across = Annotated[list[str] | None, typer.Option("--across", metavar="GLOB", rich_help_panel=STATISTICS,
                                                  help="With --smed: glob of layers whose Hessian columns are taken "
                                                       "together, for r_diag across layers (Fig. 15); repeat for "
                                                       "several.")]
Alignment = Annotated[bool, flag("--alignment", panel=STATISTICS,
                                 help="Also how the true gradient and Adam's step align with |H_ii| (App. A.6; "
                                      "reads each checkpoint's optimizer.pt).")]
Merge = Annotated[bool, flag("--merge", panel=INPUT,
                             help="For a PEFT adapter folder: audit the base model with the adapter merged into "
                                  "its weights, instead of the adapter's own tensors.")]
Ci = Annotated[bool, flag("--ci", panel=STATISTICS,
                          help="Add a column with each layer's 95% interval for R_med over the choice of "
                               "coordinates (always in the JSON).")]
SplitFused = Annotated[bool, flag("--split-fused", panel=SAMPLING,
                                  help="Audit fused q/k/v parameters (GPT-2's c_attn, GPT-NeoX's query_key_value "
                                       "…) as their q, k and v blocks, named like c_attn.weight:q.")]
DenseMax = Annotated[int | None, typer.Option(metavar="N", rich_help_panel=STATISTICS,
                                              help="With --smed: layers of at most this many entries get the dense "
                                                   "Hessian block, larger ones the submatrix of the sampled "
                                                   "coordinates \\[default: 2048].")]
Debug = Annotated[bool, flag("--debug", panel=OUTPUT, help="Show the full traceback of an error.")]
DryRun = Annotated[bool, flag("--dry-run", panel=OUTPUT,
                              help="Print the plan (checkpoints, layers, coordinates, HVPs) and exit without "
                                   "auditing: loads only the first checkpoint to audit and builds the audit batch, "
                                   "to resolve layers and micro-batches; computes no loss and no Hessian, reads "
                                   "and writes no cache, writes no report.")]


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"geomaudit {__version__}")
        raise typer.Exit()


Version = Annotated[bool, typer.Option("--version", metavar="", callback=_version, is_eager=True,
                                       rich_help_panel=OUTPUT, help="Print the version and exit.")]


def split_layers(values: list[str], coords: int) -> tuple[tuple[str, ...], int]:
    """``--layers 200`` means every layer with 200 coordinates (the product card's form); other values are globs."""
    from ..errors import UsageError

    numbers = [v for v in values if v.isdigit()]
    if len(numbers) > 1 or (numbers and coords != DEFAULT_COORDS and int(numbers[0]) != coords):
        raise UsageError("give the number of coordinates once: --coords N or one integer --layers N")
    return tuple(v for v in values if not v.isdigit()), int(numbers[0]) if numbers else coords


def parse_numbers(text: str | None, option: str, kind: type = int) -> tuple | None:
    """``"500,1000"`` → ``(500, 1000)``; a value that is not a number is a usage error."""
    from ..errors import UsageError

    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers, got {text!r}") from None


def audit_config(checkpoint: str, options: dict, loss_from: str = "audit"):
    """The library's ``AuditConfig`` from a command's shared options (its ``locals()``)."""
    from ..cache import default_cache_dir
    from ..errors import UsageError
    from ..pipeline import AuditConfig

    o = options
    if o["dense_max"] is not None and not o["smed"]:
        raise UsageError("--dense-max chooses how --smed computes S_med: it needs --smed")
    globs, coords = split_layers(o["layers"] or [], o["coords"])
    return AuditConfig(
        checkpoint=checkpoint, data=o["data"], coords=coords, layers=globs, topk=o["topk"],
        batch_size=o["batch_size"], micro_batch=o["micro_batch"], max_length=o["max_length"], seed=o["seed"],
        device=o["device"], precision=o["precision"].value, task=o["task"].value, model=o["model"], loss=o["loss"],
        allow_pickle=o["allow_pickle"], chunk_size=o["chunk_size"], steps=parse_numbers(o["steps"], "--steps"),
        every=o["every"], loss_from=loss_from,
        cache_dir=None if o["no_cache"] else str(o["cache_dir"] or default_cache_dir()), geometry=o["smed"],
        dense_max=DEFAULT_DENSE_MAX if o["dense_max"] is None else o["dense_max"], slq=o["slq"],
        across=tuple(o["across"] or ()), alignment=o["alignment"], merge=o["merge"],
        ci=o.get("ci", False), split_fused=o["split_fused"])


def gate_metric(metric: "RmedMetric | None", gated: bool) -> str:
    """The statistic the gates use; ``--metric`` without a gate would be ignored, so it is refused."""
    from ..errors import UsageError

    if metric is not None and not gated:
        raise UsageError(f"--metric {metric.value} picks the statistic of a gate: add --fail-above")
    return "r_med_stab" if metric is None else metric.value
