"""The task table: what each kind of model head is, how it is fed and what it is scored with (SPEC §1, §3).

One row per task. A row says which transformers Auto class builds the model, which architectures are that
task (the Auto class's own mapping of class names, plus name suffixes), what the batch needs beyond the
model's inputs (``prepare``: labels from the examples, a seeded mask, decoder inputs …), the loss computed
from the logits in the audit's precision (transformers' own losses cast logits to float32), and the loss's
item count: the number of terms its mean runs over, which weights micro-batches exactly.

The first row that names an architecture decides (``BartForConditionalGeneration`` is in transformers' lists
of sequence-to-sequence and of masked LMs: it is a sequence-to-sequence LM here). A new head needs a new row,
not new code paths; and any architecture whose forward takes ``labels`` and returns ``.loss`` is audited on
that loss (``custom``) without a row of its own.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import InputError, UsageError

IGNORE_INDEX = -100
MASK_RATE = 0.15

Batch = Mapping[str, Tensor]


@dataclass(frozen=True)
class Examples:
    """The raw examples a batch was built from, in batch order (absent for pre-tokenized data).

    ``labels``: one per example (a class name or number, or a list with one per word); ``target_ids`` and
    ``target_mask``: the tokenized target texts of a sequence-to-sequence model; ``word_ids``: per example, the
    word each token came from (``None`` for special tokens); ``special_tokens_mask``: the tokenizer's.
    """

    labels: Sequence | None = None
    target_ids: Tensor | None = None
    target_mask: Tensor | None = None
    word_ids: Sequence[Sequence[int | None]] | None = None
    special_tokens_mask: Tensor | None = None


@dataclass(frozen=True)
class Task:
    """One kind of head (a row of ``TASKS``)."""

    name: str
    auto_class: str | None  # transformers.<auto_class> builds it; None: the checkpoint architecture's own class
    mapping: str | None  # transformers.models.auto.modeling_auto.<mapping>: model type → class name
    suffixes: tuple[str, ...]  # architectures named …<suffix> are this task too
    prepare: Callable[[dict, Examples, object, int], dict]  # (tensors, examples, loaded, seed) → tensors
    score: Callable[[Tensor, Tensor, object], Tensor] | None  # (logits, labels, config) → loss; None: .loss
    count: Callable[[Tensor], int] | None  # labels → the loss's item count; None: unknown
    default_batch: bool = False  # a language model has a default batch: the embedded corpus
    class_labels: bool = False  # labels are class indices of config.num_labels classes

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The mean loss of ``batch`` (the model in ``eval()`` mode)."""
        if self.score is None:
            return model_output_loss(model, batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return self.score(logits, batch["labels"], model.config)

    def items(self, batch: Batch) -> int | None:
        """How many terms the mean loss of ``batch`` averages over; ``None`` when that is not known."""
        return None if self.count is None else self.count(batch["labels"])

    def matches(self, architecture: str) -> bool:
        if self.mapping:
            from transformers.models.auto import modeling_auto

            if architecture in getattr(modeling_auto, self.mapping).values():
                return True
        return bool(self.suffixes) and architecture.endswith(self.suffixes)


def model_output_loss(model: nn.Module, batch: Batch) -> Tensor:
    """The model's own loss: ``model(**batch).loss`` (Hugging Face models compute it from ``labels``)."""
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", out)
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise InputError("the model returned no scalar loss for the data; give labels in the data or --loss module:fn")
    return loss


# ---------------------------------------------------------------- losses from logits, and their item counts

def _counted(labels: Tensor) -> int:
    """Class-index labels: those not ignored (-100); real-valued targets: every entry."""
    return labels.numel() if labels.is_floating_point() else int((labels != IGNORE_INDEX).sum())


def _shifted_count(labels: Tensor) -> int:
    return _counted(labels[:, 1:])


def _next_token(logits: Tensor, labels: Tensor, config) -> Tensor:
    """Causal LM: token t predicts label t+1 (transformers' ``ForCausalLMLoss``)."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX)


def _per_token(logits: Tensor, labels: Tensor, config) -> Tensor:
    """Masked LM, sequence-to-sequence LM, token classification: cross-entropy over the labelled tokens."""
    return nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


def _per_example(logits: Tensor, labels: Tensor, config) -> Tensor:
    """transformers' ``problem_type`` rule: regression (MSE), multi-label (BCE), else cross-entropy."""
    problem = config.problem_type
    if problem == "regression" or (problem is None and config.num_labels == 1):
        return nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).squeeze(-1))
    if problem == "multi_label_classification" or (problem is None and labels.is_floating_point()):
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------- what each task adds to a batch

def label_ids(values: Sequence, config) -> list[int]:
    """Class labels as ids: the model's own label names (``config.label2id``), else integers."""
    label2id = getattr(config, "label2id", None) or {}

    def one(value) -> int:
        if isinstance(value, str) and value in label2id:
            return int(label2id[value])
        try:
            number = int(value)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"label {_shown(value)} is neither an integer nor one of the model's labels "
                             f"{sorted(label2id)}") from None
        if not -(2**63) <= number < 2**63:
            raise InputError(f"label {_shown(value)} is out of range: class labels are small integers")
        return number

    return [one(v) for v in values]


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:40]}…"


def token_ids(tensors: dict) -> Tensor:
    """The batch's ``input_ids``, which a language model's labels are made from."""
    if "input_ids" not in tensors:
        raise InputError(f"the data has no input_ids (it has {', '.join(sorted(tensors)) or 'no tensors'}): a "
                         "language model's labels are its input tokens")
    return tensors["input_ids"]


def _own_tokens(tensors: dict, examples: Examples, loaded, seed: int) -> dict:
    """Causal LM: the labels are the input tokens; the loss shifts them. Padding is ignored, and so is a token
    that would be predicted from padding (the first token after left padding): its logits come from a row of
    attention with every key masked, which is no prediction at all."""
    if "labels" not in tensors:
        labels = token_ids(tensors).clone()
        if "attention_mask" in tensors:
            padding = tensors["attention_mask"] == 0
            labels[padding] = IGNORE_INDEX
            labels[:, 1:][padding[:, :-1]] = IGNORE_INDEX
        tensors["labels"] = labels
    return tensors


def _masked_tokens(tensors: dict, examples: Examples, loaded, seed: int) -> dict:
    """Masked LM: a seeded BERT-style mask of 15% of each example's ordinary tokens (at least one)."""
    if "labels" in tensors:
        return tensors
    tokenizer = loaded.tokenizer
    if tokenizer is None or tokenizer.mask_token_id is None:
        raise InputError("masking tokens for a masked LM needs the checkpoint's tokenizer with a mask token")
    ids = token_ids(tensors).clone()
    special = examples.special_tokens_mask
    if special is None:
        special = torch.tensor([tokenizer.get_special_tokens_mask(r, already_has_special_tokens=True)
                                for r in ids.tolist()])
    maskable = special == 0
    if "attention_mask" in tensors:
        maskable &= tensors["attention_mask"] == 1
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.zeros_like(maskable)
    for row in range(len(ids)):
        cols = maskable[row].nonzero().flatten()
        if len(cols):
            k = max(1, round(MASK_RATE * len(cols)))
            chosen[row, cols[torch.randperm(len(cols), generator=gen)[:k]]] = True
    tensors["labels"] = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    ids[chosen] = tokenizer.mask_token_id
    tensors["input_ids"] = ids
    return tensors


def _class_labels(tensors: dict, examples: Examples, loaded, seed: int) -> dict:
    """Classifiers: one label per example, by the model's label names or as integers."""
    if "labels" not in tensors:
        if examples.labels is None:
            raise InputError("the data has no labels: a classifier needs a `label` for every example")
        tensors["labels"] = torch.tensor(label_ids(examples.labels, loaded.model.config))
    return tensors


def _target_tokens(tensors: dict, examples: Examples, loaded, seed: int) -> dict:
    """Sequence-to-sequence LM: the labels are the tokens of the example's `target` text (padding ignored);
    the decoder reads them shifted right, as the model itself builds them from labels."""
    if "labels" not in tensors:
        if examples.target_ids is None:
            raise InputError("a sequence-to-sequence model needs a `target` text for every example "
                             "(or pre-tokenized `labels`)")
        tensors["labels"] = examples.target_ids.masked_fill(examples.target_mask == 0, IGNORE_INDEX)
    if "decoder_input_ids" not in tensors:
        shift = getattr(loaded.model, "prepare_decoder_input_ids_from_labels", None)
        if shift is None:
            raise InputError(f"{type(loaded.model).__name__} does not build its decoder inputs from labels: give "
                             "`decoder_input_ids` in the data")
        tensors["decoder_input_ids"] = shift(labels=tensors["labels"])
    return tensors


def _word_labels(tensors: dict, examples: Examples, loaded, seed: int) -> dict:
    """Token classification: a `label` list with one label per word of the text (split at whitespace), given
    to the word's first token; its other tokens and special tokens are ignored (-100)."""
    if "labels" in tensors:
        return tensors
    if examples.labels is None or examples.word_ids is None:
        raise InputError("a token classifier needs a `label` list with one label per word of every text "
                         "(or pre-tokenized `labels`)")
    rows = []
    for labels, word_ids in zip(examples.labels, examples.word_ids):
        ids, row, previous = label_ids(labels, loaded.model.config), [], None
        for word in word_ids:
            row.append(IGNORE_INDEX if word is None or word == previous else ids[word])
            previous = word
        rows.append(row)
    tensors["labels"] = torch.tensor(rows)
    return tensors


def _class_labels_if_any(tensors: dict, examples: Examples, loaded, seed: int) -> dict:
    """The model's own loss: labels from the examples when they have them."""
    return tensors if examples.labels is None else _class_labels(tensors, examples, loaded, seed)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("causal-lm", "AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", ("ForCausalLM", "LMHeadModel"),
         _own_tokens, _next_token, _shifted_count, default_batch=True),
    Task("seq2seq-lm", "AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", (),
         _target_tokens, _per_token, _counted),
    Task("masked-lm", "AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", ("ForMaskedLM",),
         _masked_tokens, _per_token, _counted, default_batch=True),
    Task("classification", "AutoModelForSequenceClassification",
         "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", ("ForSequenceClassification",),
         _class_labels, _per_example, _counted, class_labels=True),
    Task("token-classification", "AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
         ("ForTokenClassification",), _word_labels, _per_token, _counted, class_labels=True),
    Task("image-classification", "AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
         ("ForImageClassification",), _class_labels, _per_example, _counted, class_labels=True),
    Task("custom", None, None, (), _class_labels_if_any, None, None),
)}


def infer_task(architecture: str | None, has_labels: bool, model_type: str | None = None) -> Task:
    """The task of a Hugging Face architecture (class name).

    A row of ``TASKS`` that names it; else ``custom`` (the model's own ``.loss``) for a transformers class
    whose forward takes ``labels``; else, for a model without a head (``BertModel``, ``ViTModel``) and data with
    labels, the first classification row whose Auto class builds a head for ``model_type``, with a new head.
    """
    arch = architecture or ""
    if task_row(arch):
        return task_row(arch)
    if arch and "labels" in _forward_parameters(arch):
        return TASKS["custom"]
    if has_labels:
        return next((t for t in TASKS.values() if t.class_labels and _builds(t, model_type)), TASKS["classification"])
    raise UsageError(f"the checkpoint's architecture {arch or '(none given)'} has no loss head: give data with "
                     f"a `label` field or choose --task {'|'.join(n for n in TASKS if n != 'custom')}")


def _builds(task: Task, model_type: str | None) -> bool:
    from transformers.models.auto import modeling_auto

    return model_type in getattr(modeling_auto, task.mapping)


def task_row(architecture: str) -> Task | None:
    """The row of ``TASKS`` that names ``architecture``, if one does."""
    return next((t for t in TASKS.values() if architecture and t.matches(architecture)), None)


def model_class(task: Task, architecture: str):
    """The transformers class that builds ``task`` for a checkpoint of ``architecture``."""
    import transformers

    name = task.auto_class or architecture
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise InputError(f"transformers {transformers.__version__} has no model class {name or '(none given)'} "
                         "for this checkpoint's loss")
    return cls


def _forward_parameters(architecture: str) -> tuple[str, ...]:
    import inspect

    import transformers

    cls = getattr(transformers, architecture, None)
    return tuple(inspect.signature(cls.forward).parameters) if isinstance(cls, type) else ()
