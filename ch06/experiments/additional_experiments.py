"""Chapter 6 bonus: additional classification fine-tuning experiments (the book's
`ch06/02_bonus_additional-experiments/additional_experiments.py`).

The chapter fine-tunes one setting: pretrained GPT-2 124M, the last transformer block trained,
the logits read at the last token, messages padded to the longest training message. The book's
bonus script asks what changes when each choice changes, one switch at a time:

* `trainable_layers`: "last_layer" (only the new head; our chapter calls it "head"),
  "last_block" (the chapter), "last_two_blocks", "all", "lora" (appendix E's adapters on every
  linear layer, everything else frozen);
* `trainable_token_pos`: which output feeds the loss: "last" (the last *real* token, as our
  chapter does, the book's "flexible"), "first", or pooled: "average" / "max" of the final
  hidden states over the real tokens (padding excluded; the book's `--average_embeddings`
  averages over every position, padding included);
* `context_length`: "longest_training_example", "model_context_length" or a number of tokens;
* `disable_causal_mask`: every token attends to every other token;
* `pad_token_id` and `ignore_index` (the loss skips targets equal to it);
* the model size and pretrained or random weights (the chapter's `--model` / `--from-scratch`).

Nothing here copies or changes a chapter class: `Experiment` prepares a chapter-6 classifier
(`ch06.gpt_class_finetune.prepare_classifier`, then appendix E's `add_lora` or more unfrozen
blocks), switches the causal mask off through the attention modules' own mask buffer, and reads
pooled hidden states with a forward hook on `final_norm`. `ch06.cli.finetune(..., experiment=...)`
runs it with the chapter's training layer, so `python -m ch06.gpt_class_finetune` gains the
book's switches (`--trainable-layers`, `--trainable-token-pos`, `--average-embeddings`,
`--context-length`, `--disable-causal-mask`, `--pad-token-id`, `--ignore-index`, `--lora-rank`,
`--lora-alpha`, `--weights`, `--model-size`), and `run_grid` runs several rows as a table.

    python -m ch06.gpt_class_finetune --trainable-layers lora --lora-rank 16 --lora-alpha 16   # the book's row 10
    python -m ch06.gpt_class_finetune --quick --trainable-token-pos average --disable-causal-mask
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

import ch05.gpt_train
from ch03.attention import causal_mask
from ch06.cli import BOOK_SETTINGS, QUICK_SETTINGS, finetune
from llmfs.cli import chapter_module
from llmfs.errors import InvalidInput
from llmfs.finetuning import load_with_config, save_with_config

# The chapter's listings (the module `python -m ch06.gpt_class_finetune` runs, never a second copy).
book = chapter_module("ch06.gpt_class_finetune")

TRAINABLE_LAYERS = ("last_layer", "last_block", "last_two_blocks", "all", "lora")
TRAINABLE_TOKEN_POS = ("last", "first", "average", "max")
CONTEXT_LENGTHS = ("longest_training_example", "model_context_length")
# New: the chapter's --trainable names (head, last_block, all) for the book's layer names
CHAPTER_TRAINABLE = {"last_layer": "head", "last_block": "last_block", "last_two_blocks": "last_block",
                     "all": "all", "lora": "head"}


# --- Which token feeds the head ---------------------------------------------------------------------

def final_hidden_states(model: nn.Module, input_batch: torch.Tensor) -> torch.Tensor:
    """The output of `final_norm`, (b, num_tokens, emb_dim): what the head reads, per token.

    Captured with a forward hook, so `GPTModel.forward` stays the chapter's.
    """
    captured = []
    handle = model.final_norm.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        model(input_batch)
    finally:
        handle.remove()
    return captured[0]


def pool_embeddings(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """Average or max of each sequence's hidden states over its real tokens: (b, T, emb) -> (b, emb).

    Positions at or after `lengths[i]` are padding and never count, so appending padding leaves
    the pooled vector as it is (with the causal mask on: the real tokens never see the padding).
    """
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    is_real = (positions[None, :] < lengths.to(hidden.device)[:, None]).unsqueeze(-1)  # (b, T, 1)
    if pooling == "average":
        return (hidden * is_real).sum(dim=1) / is_real.sum(dim=1)  # (b, emb)
    if pooling == "max":
        return hidden.masked_fill(~is_real, float("-inf")).amax(dim=1)  # (b, emb)
    raise ValueError(f"pooling must be 'average' or 'max', got {pooling!r}")


def classifier_logits(model: nn.Module, input_batch: torch.Tensor, trainable_token_pos: str = "last",
                      pad_token_id: int = book.PAD_TOKEN_ID, trim: bool = True) -> torch.Tensor:
    """Class logits of right-padded token ids (b, num_tokens) -> (b, num_classes).

    "last": at the last real token (the chapter's `last_token_logits`); "first": at position 0;
    "average" / "max": the head applied to the pooled hidden states of the real tokens.
    With `trim` (as the chapter does) the padding columns after the batch's longest message are
    dropped first: under the causal mask no real token sees them, so nothing changes but the time.
    Without the causal mask the real tokens do see the padding, so an `Experiment` then passes
    trim=False and the whole padded length runs through the model, as in the book's script.
    """
    if trainable_token_pos == "last":
        return book.last_token_logits(model, input_batch, pad_token_id, trim=trim)
    if trim:
        input_batch = input_batch[:, :int(book.sequence_lengths(input_batch, pad_token_id).max())]
    if trainable_token_pos == "first":
        return model(input_batch)[:, 0, :]                     # (b, num_classes)
    if trainable_token_pos in ("average", "max"):
        hidden = final_hidden_states(model, input_batch)       # (b, num_tokens, emb_dim)
        lengths = book.sequence_lengths(input_batch, pad_token_id)
        return model.out_head(pool_embeddings(hidden, lengths, trainable_token_pos))
    raise ValueError(f"trainable_token_pos must be one of {TRAINABLE_TOKEN_POS}, got {trainable_token_pos!r}")


# --- The book's loss, accuracy and evaluation with the switches ------------------------------------

def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module, device,
                    trainable_token_pos: str = "last", ignore_index: int = -100,
                    pad_token_id: int = book.PAD_TOKEN_ID, trim: bool = True) -> torch.Tensor:
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = classifier_logits(model, input_batch, trainable_token_pos, pad_token_id, trim)
    # Targets equal to ignore_index count neither in the mean nor in the gradient.
    return F.cross_entropy(logits, target_batch, ignore_index=ignore_index)


@torch.no_grad()  # Disable gradient tracking for efficiency
def calc_accuracy_loader(data_loader, model: nn.Module, device, num_batches: int | None = None,
                         trainable_token_pos: str = "last", pad_token_id: int = book.PAD_TOKEN_ID,
                         trim: bool = True) -> float:
    model.eval()
    correct_predictions, num_examples = 0, 0
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        logits = classifier_logits(model, input_batch, trainable_token_pos, pad_token_id, trim)
        predicted_labels = torch.argmax(logits, dim=-1)
        num_examples += predicted_labels.shape[0]
        correct_predictions += (predicted_labels == target_batch).sum().item()
    return correct_predictions / num_examples


# --- Which layers train, and the causal mask ------------------------------------------------------

def set_causal_mask(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch the causal mask of every block's attention on or off, in place.

    `MultiHeadAttention` hides the future with its `mask` buffer (True = hidden); an all-False
    buffer hides nothing. Its fused path builds the causal mask itself (`is_causal=True`), so the
    explicit mask-and-softmax path is used while the mask is off.
    """
    for block in model.trf_blocks:
        att = block.att
        if not isinstance(getattr(att, "mask", None), torch.Tensor):
            raise ValueError(f"{type(att).__name__} has no mask buffer to switch; use ch04.gpt.GPTModel")
        size = att.mask.shape[0]
        att.mask = causal_mask(size).to(att.mask.device) if enabled else torch.zeros_like(att.mask)
        if not enabled:
            att.use_sdpa = False
    return model


count_trainable_parameters = book.count_trainable_parameters  # the chapter's, re-exported for the grid


@dataclass(frozen=True)
class Experiment:
    """One row of the book's table: the switches that differ from the chapter's run.

    The defaults are the chapter's choices; `train_rows` (New: keeps quick runs short) uses only
    the first N rows of the training split and N // 4 of the validation and test splits.
    An instance offers the chapter's functions with the switches applied, so
    `ch06.cli.finetune(..., experiment=Experiment(...))` calls them instead of the listings.
    """

    trainable_layers: str = "last_block"
    trainable_token_pos: str = "last"
    context_length: str | int = "longest_training_example"
    disable_causal_mask: bool = False
    pad_token_id: int = book.PAD_TOKEN_ID
    ignore_index: int = -100
    lora_rank: int = 8
    lora_alpha: float = 8
    train_rows: int | None = None

    def __post_init__(self):
        self.check()

    def check(self, vocab_size: int | None = None) -> None:
        """Refuse values and combinations that cannot work (InvalidInput: one line from the command)."""
        if self.trainable_layers not in TRAINABLE_LAYERS:
            raise InvalidInput(f"trainable_layers must be one of {', '.join(TRAINABLE_LAYERS)}, "
                               f"got {self.trainable_layers!r}")
        if self.trainable_token_pos not in TRAINABLE_TOKEN_POS:
            raise InvalidInput(f"trainable_token_pos must be one of {', '.join(TRAINABLE_TOKEN_POS)}, "
                               f"got {self.trainable_token_pos!r}")
        if not (self.context_length in CONTEXT_LENGTHS
                or (isinstance(self.context_length, int) and not isinstance(self.context_length, bool)
                    and self.context_length >= 1)):
            raise InvalidInput(f"context_length must be {' or '.join(CONTEXT_LENGTHS)} or a positive number of "
                               f"tokens, got {self.context_length!r}")
        if self.ignore_index in (0, 1):
            raise InvalidInput(f"ignore_index {self.ignore_index} is a class label (0 = not spam, 1 = spam): the "
                               "loss would skip those messages; use -100 (nothing ignored) or the pad id")
        if self.pad_token_id < 0 or (vocab_size is not None and self.pad_token_id >= vocab_size):
            limit = "" if vocab_size is None else f" (the vocabulary has ids 0..{vocab_size - 1})"
            raise InvalidInput(f"pad_token_id {self.pad_token_id} is not a token id{limit}")
        if self.trainable_layers == "lora" and (self.lora_rank < 1 or not self.lora_alpha > 0):
            raise InvalidInput(f"LoRA needs rank >= 1 and alpha > 0, got rank {self.lora_rank}, "
                               f"alpha {self.lora_alpha}")
        if self.train_rows is not None and self.train_rows < 8:
            raise InvalidInput(f"train_rows must be at least 8, got {self.train_rows}")

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        """What differs from the chapter's run, e.g. 'lora (rank 16, alpha 16), token first'."""
        parts = []
        default = Experiment()
        if self.trainable_layers != default.trainable_layers:
            lora = f" (rank {self.lora_rank}, alpha {self.lora_alpha})" if self.trainable_layers == "lora" else ""
            parts.append(f"{self.trainable_layers}{lora}")
        if self.trainable_token_pos != default.trainable_token_pos:
            parts.append(f"token {self.trainable_token_pos}")
        if self.context_length != default.context_length:
            parts.append(f"context {self.context_length}")
        if self.disable_causal_mask:
            parts.append("no causal mask")
        if self.pad_token_id != default.pad_token_id:
            parts.append(f"pad id {self.pad_token_id}")
        if self.ignore_index != default.ignore_index:
            parts.append(f"ignore_index {self.ignore_index}")
        return ", ".join(parts) or "the chapter's settings"

    # -- the chapter's functions with the switches --------------------------------------------------

    def prepare_classifier(self, model: nn.Module, num_classes: int = 2, trainable: str | None = None) -> nn.Module:
        """The chapter's head and freezing, then this row's changes. `trainable`, when given, must
        name this experiment's layers (the chapter's "head" is the book's "last_layer")."""
        layers = {"head": "last_layer"}.get(trainable, trainable) or self.trainable_layers
        if layers != self.trainable_layers:
            raise ValueError(f"trainable {trainable!r} differs from the experiment's {self.trainable_layers!r}")
        self.check(vocab_size=model.tok_emb.weight.shape[0])
        book.prepare_classifier(model, num_classes=num_classes, trainable=CHAPTER_TRAINABLE[layers])
        if layers == "last_two_blocks":
            for param in model.trf_blocks[-2].parameters():
                param.requires_grad = True
        elif layers == "lora":
            from appendix_e.lora import add_lora

            add_lora(model, rank=self.lora_rank, alpha=self.lora_alpha)  # every linear layer, the new head too
        if self.disable_causal_mask:
            set_causal_mask(model, enabled=False)
        return model

    def max_length(self, max_length: int | None, model_context_length: int) -> int | None:
        """The padded length: the command's --max-length (None: the longest training message) unless
        this row asks for the model's context length or a number."""
        if self.context_length == "model_context_length":
            return model_context_length
        if isinstance(self.context_length, int):
            return self.context_length
        return max_length

    def prepare_splits(self, paths: dict[str, Path]) -> dict[str, Path]:
        """With `train_rows`, a slice of each split written beside the full ones; else the splits."""
        if self.train_rows is None:
            return paths
        rows = {"train": self.train_rows, "validation": max(self.train_rows // 4, 1),
                "test": max(self.train_rows // 4, 1)}
        return {name: book.write_csv(pd.read_csv(path).head(rows[name]), path.with_name(f"{name}-slice.csv"))
                for name, path in paths.items()}

    def create_spam_loaders(self, paths, tokenizer, batch_size: int = 8, max_length: int | None = None,
                            seed: int = 123, num_workers: int = 0):
        try:
            return book.create_spam_loaders(paths, tokenizer, batch_size=batch_size, max_length=max_length,
                                            pad_token_id=self.pad_token_id, seed=seed, num_workers=num_workers)
        except ValueError as exc:  # the pad id occurs in a message: the user's choice of id
            if "pad token id" in str(exc):
                raise InvalidInput(f"--pad-token-id {self.pad_token_id}: {exc}") from None
            raise

    def calc_loss_batch(self, input_batch, target_batch, model, device) -> torch.Tensor:
        return calc_loss_batch(input_batch, target_batch, model, device, self.trainable_token_pos,
                               self.ignore_index, self.pad_token_id, trim=not self.disable_causal_mask)

    def calc_accuracy_loader(self, data_loader, model, device, num_batches: int | None = None) -> float:
        return calc_accuracy_loader(data_loader, model, device, num_batches, self.trainable_token_pos,
                                    self.pad_token_id, trim=not self.disable_causal_mask)

    def evaluate_model(self, model, train_loader, val_loader, device, eval_iter: int) -> tuple[float, float]:
        # chapter 5's evaluation, given this row's loss
        return ch05.gpt_train.evaluate_model(model, train_loader, val_loader, device, eval_iter,
                                             self.calc_loss_batch)

    def save_classifier(self, model: nn.Module, path, max_length: int | None = None) -> Path:
        """The chapter's files plus this row's switches; LoRA adapters are merged into a copy first,
        so the chapter's `load_classifier` reads the weights (`load_experiment_classifier` also
        restores the switches)."""
        if self.trainable_layers == "lora":
            from appendix_e.lora import merge_lora

            model = merge_lora(copy.deepcopy(model))
        return save_with_config(model, path, num_classes=model.out_head.out_features, max_length=max_length,
                                pad_token_id=self.pad_token_id, experiment=self.as_dict())


def load_experiment_classifier(path, device="cpu") -> tuple[nn.Module, dict, Experiment]:
    """A classifier saved by an experiment run: (model in eval mode, metadata, its Experiment)."""
    model, meta = load_with_config(path, device, required=book.REQUIRED_KEYS,
                                   build=lambda m: book.build_classifier(m["config"], num_classes=m["num_classes"]))
    experiment = Experiment(**meta.get("experiment", {}))
    if experiment.disable_causal_mask:
        set_causal_mask(model, enabled=False)
    return model, meta, experiment


# --- Several rows as a table ----------------------------------------------------------------------

# The book's README table, rows as numbered there (source: rasbt/LLMs-from-scratch,
# ch06/02_bonus_additional-experiments/README.md; A100 GPU; accuracies in %, time in minutes).
BOOK_RESULTS = [
    # row, model, weights, trainable token position, trainable layers, context length, train, val, test, minutes
    (1, "gpt2-small (124M)", "pretrained", "last", "last_block", "longest train ex. (120)", 96.63, 99.33, 95.00, 0.28),
    (2, "gpt2-small (124M)", "pretrained", "first", "last_block", "longest train ex. (120)", 78.46, 80.54, 75.00, 0.28),
    (3, "gpt2-small (124M)", "pretrained", "last", "last_layer", "longest train ex. (120)", 78.65, 79.87, 72.00, 0.25),
    (4, "gpt2-small (124M)", "pretrained", "last", "last_two_blocks", "longest train ex. (120)", 98.85, 98.66, 98.33,
     0.33),
    (5, "gpt2-small (124M)", "pretrained", "last", "all", "longest train ex. (120)", 99.62, 96.64, 96.67, 0.69),
    (6, "gpt2-medium (355M)", "pretrained", "last", "last_block", "longest train ex. (120)", 87.50, 91.28, 84.67, 0.75),
    (7, "gpt2-large (774M)", "pretrained", "last", "last_block", "longest train ex. (120)", 99.52, 98.66, 96.67, 1.50),
    (8, "gpt2-xl (1558M)", "pretrained", "last", "last_block", "longest train ex. (120)", 99.81, 99.33, 98.33, 2.83),
    (9, "gpt2-small (124M)", "random", "last", "all", "longest train ex. (120)", 100.00, 96.64, 93.67, 0.69),
    (10, "gpt2-small (124M)", "pretrained", "last", "LoRA", "longest train ex. (120)", 100.00, 97.32, 96.67, 0.75),
    (11, "gpt2-small (124M)", "pretrained", "last", "last_block", "context length (1024)", 83.08, 87.92, 78.33, 2.46),
    (12, "gpt2-small (124M)", "pretrained", "last", "last_block", "variable: no padding (batch size 1)", 100.00,
     98.66, 98.00, 1.75),
    (13, "gpt2-small (124M)", "pretrained", "last", "last_block", "variable: no padding (batch size 8)", 99.33,
     98.66, 98.33, 1.70),
    (14, "gpt2-small (124M)", "pretrained", "last", "last_block", "longest train ex. (120); but no causal mask",
     99.23, 98.66, 95.33, 0.29),
    (15, "gpt2-small (124M)", "pretrained", "last", "last_block",
     "longest train ex. (120) and `ignore_index` for padding", 96.63, 99.33, 95.00, 0.28),
]
BOOK_COLUMNS = ["row", "model", "weights", "trainable token position", "trainable layers", "context length",
                "training acc", "validation acc", "test acc", "training time (min)"]
BOOK_SOURCE = ("rasbt/LLMs-from-scratch, ch06/02_bonus_additional-experiments/README.md (A100 GPU; "
               "the book reads the last token at position -1, padding included, and its LoRA row uses "
               "rank 16, alpha 16)")

# The grid: the book's rows that vary one switch of the chapter's run (book row number, Experiment),
# plus our pooled variants (no book row). Rows 6-9 change the model (--model / --from-scratch),
# rows 12-13 drop padding (batch size 1, not offered here).
GRID = [
    (1, Experiment()),
    (2, Experiment(trainable_token_pos="first")),
    (3, Experiment(trainable_layers="last_layer")),
    (4, Experiment(trainable_layers="last_two_blocks")),
    (5, Experiment(trainable_layers="all")),
    (10, Experiment(trainable_layers="lora", lora_rank=16, lora_alpha=16)),
    (11, Experiment(context_length="model_context_length")),
    (14, Experiment(disable_causal_mask=True)),
    (15, Experiment(ignore_index=book.PAD_TOKEN_ID)),
    (None, Experiment(trainable_token_pos="average")),
    (None, Experiment(trainable_token_pos="max")),
]

# Quick mode (the notebook's stored outputs): the chapter's tiny random-init model on the first 200
# training messages (50 validation, 50 test), 2 epochs, the quick run's learning rate. Full mode: the
# book's settings on all 1,045 training messages.
QUICK_TRAIN_ROWS = 200
QUICK_GRID_SETTINGS = {**QUICK_SETTINGS, "num_epochs": 2, "max_length": None, "eval_freq": 100, "eval_iter": 2}
FULL_GRID_SETTINGS = dict(BOOK_SETTINGS)


def run_grid(settings: dict, output_dir: str | Path, grid=GRID, *, mode: str = "quick",
             train_rows: int | None = None, verbose: bool = False, **finetune_kwargs) -> pd.DataFrame:
    """Fine-tune once per row of `grid` ((book row or None, Experiment) pairs) with `ch06.cli.finetune`
    and return the table: accuracies in %, trainable parameters, training time in seconds.

    Each row starts from the same seed and writes into its own folder under `output_dir`.
    `train_rows` slices the data for every row (quick runs). Each run's own log is shown with
    `verbose`; otherwise one line per row. No loss plots are drawn.
    """
    rows = []
    for i, (book_row, experiment) in enumerate(grid):
        if train_rows is not None:
            experiment = replace(experiment, train_rows=train_rows)
        run_settings = {**settings, "trainable": experiment.trainable_layers}
        start = time.perf_counter()
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
            result = finetune(run_settings, Path(output_dir) / f"row-{i:02d}", mode=mode, experiment=experiment,
                              progress=False, plots=False, **finetune_kwargs)
        accuracies = ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in result["accuracies"].items())
        print(f"row {book_row or '-'} ({experiment.label}): {accuracies}; {result['seconds']:.1f} s training")
        rows.append({
            "book row": book_row if book_row is not None else "-",
            "experiment": experiment.label,
            "trainable parameters": count_trainable_parameters(result["model"]),
            "max_length": result["max_length"],
            **{f"{name} acc": round(100 * acc, 2) for name, acc in result["accuracies"].items()},
            "training time (s)": round(result["seconds"], 2),
            "run time (s)": round(time.perf_counter() - start, 2),
        })
    return pd.DataFrame(rows).rename(columns={"validation acc": "val acc"})


def book_results() -> pd.DataFrame:
    """The book's table (see BOOK_SOURCE) as a DataFrame."""
    return pd.DataFrame(BOOK_RESULTS, columns=BOOK_COLUMNS)


def trainable_parameter_formula(cfg: dict, trainable_layers: str, num_classes: int = 2, lora_rank: int = 8) -> int:
    """How many parameters train, from the config alone (what the tests check the models against).

    E = emb_dim; a block holds Q/K/V (3 E^2, plus 3 E biases with qkv_bias), the output projection
    (E^2 + E), the feed-forward (E x 4E and 4E x E with biases) and two LayerNorms (2 x 2E).
    LoRA adds rank x (in + out) per linear layer: four E x E and two E x 4E per block, plus the head.
    """
    E, L, C = cfg["emb_dim"], cfg["n_layers"], num_classes
    head = E * C + C
    block = 3 * E * E + (3 * E if cfg["qkv_bias"] else 0) + E * E + E + (E * 4 * E + 4 * E) + (4 * E * E + E) + 4 * E
    final_norm = 2 * E
    if trainable_layers == "last_layer":
        return head
    if trainable_layers == "last_block":
        return head + block + final_norm
    if trainable_layers == "last_two_blocks":
        return head + 2 * block + final_norm
    if trainable_layers == "all":
        return cfg["vocab_size"] * E + cfg["context_length"] * E + L * block + final_norm + head
    if trainable_layers == "lora":
        return L * lora_rank * (4 * (E + E) + 2 * (E + 4 * E)) + lora_rank * (E + C)
    raise ValueError(f"unknown trainable_layers {trainable_layers!r}")


__all__ = [
    "BOOK_RESULTS", "BOOK_SOURCE", "FULL_GRID_SETTINGS", "GRID", "QUICK_GRID_SETTINGS", "QUICK_TRAIN_ROWS", "TRAINABLE_LAYERS", "TRAINABLE_TOKEN_POS", "Experiment",
    "book_results", "calc_accuracy_loader", "calc_loss_batch", "classifier_logits", "count_trainable_parameters",
    "final_hidden_states", "load_experiment_classifier", "pool_embeddings", "run_grid", "set_causal_mask",
    "trainable_parameter_formula",
]
