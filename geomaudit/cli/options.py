"""Options shared by the auditing commands, declared once (Typer ``Annotated`` aliases)."""

from enum import Enum
from typing import Annotated

import typer

DEFAULT_COORDS = 200


class Precision(str, Enum):
    fp32 = "fp32"
    tf32 = "tf32"
    fp64 = "fp64"


class Task(str, Enum):
    auto = "auto"
    causal_lm = "causal-lm"
    masked_lm = "masked-lm"
    classification = "classification"
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


Data = Annotated[str | None, typer.Option("--data", "-d", help=".jsonl/.csv/.txt text or pre-tokenized "
                 ".safetensors/.pt. Default for a language model: the embedded English corpus.")]
Coords = Annotated[int, typer.Option("--coords", "-n", help="Coordinates sampled per layer.")]
Layers = Annotated[list[str] | None, typer.Option("--layers", "-l", help="Glob over parameter names (repeat for "
                   "several); an integer N instead means every layer with N coordinates.")]
TopK = Annotated[int, typer.Option(help="k of R_topk: the k-th largest |H_ii| over the median.")]
BatchSize = Annotated[int | None, typer.Option(help="Examples in the audit batch, a seeded sample of the data "
                      "[default: the whole file of tensors; 32 of a text file]", show_default=False)]
MicroBatch = Annotated[int | None, typer.Option(help="Examples per forward pass (default: the whole batch); the "
                       "Hessian is accumulated exactly.")]
MaxLength = Annotated[int, typer.Option(help="Token limit per example for text data.")]
Seed = Annotated[int, typer.Option(help="Seeds coordinate sampling, MLM masking and new heads.")]
Device = Annotated[str, typer.Option(help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 …")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="fp32, tf32 matmuls, or fp64.")]
TaskOpt = Annotated[Task, typer.Option("--task", help="Loss of a Hugging Face model; auto reads config.json; "
                    "custom: the model's own loss from labels.")]
Model = Annotated[str | None, typer.Option("--model", help="module:factory returning the nn.Module of a "
                  "state-dict checkpoint.")]
Loss = Annotated[str | None, typer.Option("--loss", help="module:fn called as fn(model, batch) -> the loss, a mean "
                 "over examples, or (loss, items) for a mean over items (tokens); default model(**batch).loss.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Unpickle .pt/.bin files that need code "
                        "execution. Only for files you trust.")]
ChunkSize = Annotated[int | None, typer.Option(help="Hessian-vector products per batch (default: automatic, "
                      "halved on out-of-memory).")]
Steps = Annotated[str | None, typer.Option(help="Checkpoints of a trajectory to audit, e.g. 500,1000 "
                  "(default: all).")]
Every = Annotated[int | None, typer.Option(help="Audit the checkpoints whose step is a multiple of N.")]
CacheDir = Annotated[str | None, typer.Option(help="Where finished work is kept (default: $GEOMAUDIT_CACHE_DIR, "
                     "else ~/.cache/geomaudit).")]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the result cache.")]
MetricOpt = Annotated[Metric, typer.Option("--metric", help="Statistic the thresholds and ratios use "
                      "(r_med_stab: footnote 8, as in the paper's tables; s_med and r_diag_* need --smed; "
                      "r_u and r_v compare the low-rank weights of `geomaudit svd`).")]
Smed = Annotated[bool, typer.Option("--smed", help="Also S_med (App. A.9) and r_diag (App. F) from the same "
                 "Hessian columns.")]
Slq = Annotated[bool, typer.Option("--slq", help="With --smed: S_med of layers above --dense-max from a stochastic "
                "Lanczos estimate of the whole block's spectrum instead of the sampled submatrix.")]
Across = Annotated[list[str] | None, typer.Option("--across", help="With --smed: glob of layers whose Hessian "
                   "columns are taken together, for r_diag across layers (Fig. 15); repeat for several.")]
Alignment = Annotated[bool, typer.Option("--alignment", help="Also how the true gradient and Adam's step align "
                      "with |H_ii| (App. A.6; reads the checkpoint's optimizer.pt).")]
Merge = Annotated[bool, typer.Option("--merge", help="For a PEFT adapter folder: audit the base model with the "
                 "adapter merged into its weights, instead of the adapter's own tensors.")]
DenseMax = Annotated[int, typer.Option(help="With --smed: layers of at most this many entries get the dense "
                     "Hessian block; larger ones the submatrix of the sampled coordinates.")]


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
    from ..pipeline import AuditConfig

    o = options
    globs, n = split_layers(o["layers"] or [], o["coords"])
    cache = None if o["no_cache"] else str(o["cache_dir"] or default_cache_dir())
    return AuditConfig(checkpoint, o["data"], n, globs, o["topk"], o["batch_size"], o["micro_batch"],
                       o["max_length"], o["seed"], o["device"], o["precision"].value, o["task"].value, o["model"],
                       o["loss"], o["allow_pickle"], o["chunk_size"], parse_numbers(o["steps"], "--steps"),
                       o["every"], loss_from, cache, o["smed"], o["dense_max"], o["slq"],
                       tuple(o["across"] or ()), o["alignment"], o["merge"])
