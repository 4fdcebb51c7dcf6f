"""``geomaudit rmed``: the R_med family per layer of a checkpoint (SPEC §1, §4)."""

from enum import Enum
from typing import Annotated

import typer

from .common import JsonOption, app, check_json_target, emit, handle_errors, stderr


class Precision(str, Enum):
    fp32 = "fp32"
    tf32 = "tf32"
    fp64 = "fp64"


class Task(str, Enum):
    auto = "auto"
    causal_lm = "causal-lm"
    masked_lm = "masked-lm"
    classification = "classification"


def split_layers(values: list[str], coords: int) -> tuple[tuple[str, ...], int]:
    """``--layers 200`` means every layer with 200 coordinates (the product card's form); other values are globs."""
    from ..errors import UsageError

    numbers = [v for v in values if v.isdigit()]
    if len(numbers) > 1 or (numbers and coords != DEFAULT_COORDS and int(numbers[0]) != coords):
        raise UsageError("give the number of coordinates once: --coords N or one integer --layers N")
    return tuple(v for v in values if not v.isdigit()), int(numbers[0]) if numbers else coords


DEFAULT_COORDS = 200


@app.command()
def rmed(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Argument(help="A Hugging Face save_pretrained directory, or a state-dict "
                                                   "file with --model.")],
    data: Annotated[str | None, typer.Option("--data", "-d", help=".jsonl/.csv/.txt text or pre-tokenized "
                    ".safetensors/.pt. Default for a language model: the embedded English corpus.")] = None,
    coords: Annotated[int, typer.Option("--coords", "-n", help="Coordinates sampled per layer.")] = DEFAULT_COORDS,
    layers: Annotated[list[str] | None, typer.Option("--layers", "-l", help="Glob over parameter names (repeat for "
                      "several); an integer N instead means every layer with N coordinates.")] = None,
    topk: Annotated[int, typer.Option(help="k of R_topk: the k-th largest |H_ii| over the median.")] = 10,
    json_path: JsonOption = None,
    batch_size: Annotated[int, typer.Option(help="Examples in the audit batch.")] = 32,
    micro_batch: Annotated[int | None, typer.Option(help="Examples per forward pass (default: the whole "
                           "batch); the Hessian is accumulated exactly.")] = None,
    max_length: Annotated[int, typer.Option(help="Token limit per example for text data.")] = 128,
    seed: Annotated[int, typer.Option(help="Seeds coordinate sampling, MLM masking and new heads.")] = 0,
    device: Annotated[str, typer.Option(help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 …")] = "auto",
    precision: Annotated[Precision, typer.Option(help="fp32, tf32 matmuls, or fp64.")] = Precision.fp32,
    task: Annotated[Task, typer.Option(help="Loss of a Hugging Face model; auto reads config.json.")] = Task.auto,
    model: Annotated[str | None, typer.Option("--model", help="module:factory returning the nn.Module of a "
                     "state-dict checkpoint.")] = None,
    loss: Annotated[str | None, typer.Option("--loss", help="module:fn called as fn(model, batch) -> scalar "
                    "loss (mean over examples); default model(**batch).loss.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Unpickle .pt/.bin files that need code "
                            "execution. Only for files you trust.")] = False,
    chunk_size: Annotated[int | None, typer.Option(help="Hessian-vector products per batch (default: automatic, "
                          "halved on out-of-memory).")] = None,
):
    """Per-layer R_med, R_med_stab, R_topk and zero fraction of the exact Hessian diagonal."""
    with handle_errors(ctx):
        check_json_target(json_path)
        globs, n = split_layers(layers or [], coords)
        from ..pipeline import AuditConfig, run_rmed

        config = AuditConfig(checkpoint, data, n, globs, topk, batch_size, micro_batch, max_length, seed, device,
                             precision.value, task.value, model, loss, allow_pickle, chunk_size)
        with _progress() as progress:
            document = run_rmed(config, progress)
        if document["model"]["initialised"]:
            stderr.print(f"note: {', '.join(document['model']['initialised'])} not in the checkpoint: "
                         f"initialised from --seed {seed}", highlight=False, soft_wrap=True)
        emit(document, json_path, _render)


def _render(document: dict) -> list:
    from ..report.tables import rmed_tables

    return rmed_tables(document)


class _progress:
    """Rich progress on stderr: a bar over the layers and one over the current layer's coordinates."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ..pipeline import Progress as Callbacks

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=stderr, transient=True)
        self.bar.start()
        self.layers = self.bar.add_task("layers", total=None)
        self.coords = self.bar.add_task("", total=None, visible=False)

        def on_layer(position: int, count: int, name: str, work: int) -> None:
            self.bar.update(self.layers, total=count, completed=position - 1)
            self.bar.reset(self.coords, total=work, description=f"  {name}", visible=True)

        return Callbacks(on_status=lambda msg: stderr.print(msg, highlight=False, soft_wrap=True), on_layer=on_layer,
                         on_chunk=lambda n: self.bar.advance(self.coords, n))

    def __exit__(self, *exc):
        self.bar.stop()
        return False
