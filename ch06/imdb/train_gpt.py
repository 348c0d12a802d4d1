"""Chapter 6 bonus: our GPT-2 as a classifier of any labelled text, IMDb movie reviews by default.

    python -m ch06.imdb.train_gpt --trainable all                 # the book's README run: pretrained GPT-2 124M
    python -m ch06.imdb.train_gpt --quick                         # small random-init model, offline
    python -m ch06.imdb.train_gpt --from-scratch                  # the book's --weights random
    python -m ch06.imdb.train_gpt --data reviews.jsonl --text-column review --label-column stars

The book's `train_gpt.py`, built from chapter 6's listings instead of copies of them:
`ch06.gpt_class_finetune.prepare_classifier` puts a fresh head with one output per class on the
model and chooses what trains (`--trainable` head / last_block / all: the book's `--trainable_layers`
last_layer / last_block / all), `calc_loss_batch` and `calc_accuracy_loader` read the logits at each
text's last real token (chapter 6's `# New:` change; the book's script reads position -1, a padding
position for every review shorter than `--context-length`), and the loop is chapter 6's, run by
`llmfs.trainer.train` as `python -m ch06.gpt_class_finetune` runs it. The model comes from chapter 6's
`ch06.cli`: OpenAI's GPT-2 weights (`load_pretrained`), a chapter-5 checkpoint (`--init-checkpoint`),
or random init (`--quick`, `--from-scratch`).

The book's `IMDBDataset` is here with two changes marked `# New:`: it takes a DataFrame (from
`labeled_data`, so any CSV/TSV/JSONL file and any number of classes works) and encodes with chapter 6's
`encode_text`, for which "<|endoftext|>" in a review is text, never the padding id.
"""

from __future__ import annotations

import argparse
import sys
import time

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT2_SIZES, GPT_CONFIG_124M, GPTModel
from ch06 import cli as ch06_cli
from ch06 import gpt_class_finetune as book
from ch06.gpt_class_finetune import PAD_TOKEN_ID, encode_text
from ch06.imdb.labeled_data import LabeledData, add_data_args, data_from_args
from ch06.imdb.report import print_accuracies, result, track_resources
from llmfs.cli import (
    Parser,
    check_input_file,
    device_name,
    non_negative_float,
    positive_float,
    positive_int,
    run,
)
from llmfs.errors import InvalidInput
from llmfs.finetuning import add_model_source_args, cpu_threads
from llmfs.runtime import get_device, outputs_dir, set_seed
from llmfs.trainer import make_optimizer, train

# The book's settings (train_gpt.py): AdamW 5e-5 with weight decay 0.1, batches of 8, one epoch,
# evaluation every 50 steps on 20 batches, reviews cut to 256 tokens, the last block trained.
BOOK_SETTINGS = {
    "learning_rate": 5e-5, "weight_decay": 0.1, "batch_size": 8, "num_epochs": 1, "eval_freq": 50, "eval_iter": 20,
    "context_length": 256, "trainable": "last_block", "seed": 123, "num_threads": None,
}
# A small random-init model learns everything from the data: every layer trains, with a higher rate.
QUICK_SETTINGS = {**BOOK_SETTINGS, "learning_rate": 1e-3, "num_epochs": 3, "eval_freq": 20, "eval_iter": 5,
                  "context_length": 64, "trainable": "all", "num_threads": 1}
FROM_SCRATCH_SETTINGS = {**BOOK_SETTINGS, "learning_rate": 1e-4, "trainable": "all"}
CONTEXT_CHOICES = ("longest_training_example", "model_context_length")

OFFLINE_ALTERNATIVES = """\
Without pretrained weights the classifier still runs offline:
  python -m ch06.imdb.train_gpt --quick          # small model from random init
  python -m ch06.imdb.train_gpt --from-scratch   # GPT-2 124M shape from random init (slow on a CPU, less accurate)"""


class IMDBDataset(Dataset):
    """Token ids and class indices of a text/label table, padded on the right to `max_length` tokens."""

    def __init__(self, csv_file, tokenizer, max_length=None, pad_token_id=PAD_TOKEN_ID):
        # New: a DataFrame with text and class-index label columns (labeled_data) works as well as a CSV path
        self.data = csv_file if isinstance(csv_file, pd.DataFrame) else pd.read_csv(csv_file)
        self.max_length = max_length if max_length is not None else self._longest_encoded_length(tokenizer)

        # Pre-tokenize texts
        self.encoded_texts = [
            encode_text(text, tokenizer)[:self.max_length]  # New: chapter 6's encode_text
            for text in self.data["text"]
        ]
        # Pad sequences to the longest sequence
        self.encoded_texts = [
            et + [pad_token_id] * (self.max_length - len(et))
            for et in self.encoded_texts
        ]

    def __getitem__(self, index):
        encoded = self.encoded_texts[index]
        label = self.data.iloc[index]["label"]
        return torch.tensor(encoded, dtype=torch.long), torch.tensor(label, dtype=torch.long)

    def __len__(self):
        return len(self.data)

    def _longest_encoded_length(self, tokenizer):
        return max(len(encode_text(text, tokenizer)) for text in self.data["text"])


def instantiate_model(mode: str = "pretrained", model_name: str = "gpt2", cfg: dict | None = None,
                      init_checkpoint=None, n_heads: int | None = None, device="cpu") -> GPTModel:
    """The language model to turn into a classifier (the book's `instantiate_model`, through chapter 6's loaders).

    mode "pretrained": OpenAI's weights of `model_name` (PretrainedWeightsUnavailable, saying how to get them
    or run offline, when they cannot be had); "quick": `cfg` or chapter 6's small config, random init;
    "scratch": the GPT-2 shape of `model_name`, random init (the book's --weights random).
    """
    if init_checkpoint is not None:
        return ch06_cli.load_init_checkpoint(init_checkpoint, n_heads=n_heads)
    if mode == "pretrained":
        return ch06_cli.load_pretrained(model_name, device, OFFLINE_ALTERNATIVES)
    if mode not in ("quick", "scratch"):
        raise InvalidInput(f"mode must be 'pretrained', 'quick' or 'scratch', got {mode!r}")
    if cfg is None:
        cfg = (ch06_cli.QUICK_CLASSIFIER_CONFIG if mode == "quick"
               else {**GPT_CONFIG_124M, **GPT2_SIZES.get(model_name, {}), "drop_rate": 0.0})
    return GPTModel(cfg)


def resolve_context_length(setting, model: GPTModel) -> int | None:
    """The book's --context_length: a number, "model_context_length", or "longest_training_example" (None)."""
    supported = model.pos_emb.weight.shape[0]
    if setting == "longest_training_example":
        return None
    if setting == "model_context_length":
        return supported
    if int(setting) > supported:
        raise InvalidInput(f"--context-length {setting} exceeds the model's context length {supported}")
    return int(setting)


def create_loaders(data: LabeledData, tokenizer, max_length: int | None, batch_size: int, seed: int,
                   context_length: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    """The book's three loaders; the validation and test sets use the training set's length."""
    train_dataset = IMDBDataset(data.train, tokenizer, max_length=max_length)
    if train_dataset.max_length > context_length:  # New: the longest review does not fit the model
        train_dataset = IMDBDataset(data.train, tokenizer, max_length=context_length)
    val_dataset = IMDBDataset(data.validation, tokenizer, max_length=train_dataset.max_length)
    test_dataset = IMDBDataset(data.test, tokenizer, max_length=train_dataset.max_length)
    generator = torch.Generator().manual_seed(seed)  # New: a seeded shuffle
    train_loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)
    val_loader = DataLoader(val_dataset, batch_size=batch_size, drop_last=False)
    test_loader = DataLoader(test_dataset, batch_size=batch_size, drop_last=False)
    return train_loader, val_loader, test_loader


def train_gpt(data: LabeledData, settings: dict | None = None, *, mode: str = "pretrained", model_name: str = "gpt2",
              cfg: dict | None = None, init_checkpoint=None, n_heads: int | None = None, device=None,
              progress: bool = False) -> dict:
    """Fine-tune a GPT classifier on `data`; returns its result row (`report.result`) plus "classifier"."""
    settings = {**(QUICK_SETTINGS if mode == "quick" else BOOK_SETTINGS), **(settings or {})}
    if len(data.train) < settings["batch_size"]:
        raise InvalidInput(f"the training split has {len(data.train)} rows, fewer than one batch of "
                           f"{settings['batch_size']} (lower --batch-size)")
    device = get_device(device)
    with cpu_threads(settings["num_threads"] if device.type == "cpu" else None), track_resources(device) as stats:
        set_seed(settings["seed"])
        model = instantiate_model(mode, model_name, cfg, init_checkpoint, n_heads, device)
        set_seed(settings["seed"])  # the same head init and batch order, whatever the model source consumed
        book.prepare_classifier(model, num_classes=data.num_classes, trainable=settings["trainable"])
        model.to(device)
        context_length = model.pos_emb.weight.shape[0]
        max_length = resolve_context_length(settings["context_length"], model)
        train_loader, val_loader, test_loader = create_loaders(
            data, get_gpt2_tokenizer(), max_length, settings["batch_size"], settings["seed"], context_length)
        eval_iter = settings["eval_iter"]

        def accuracies_after_epoch(m, epoch: int) -> dict:  # the end of the book's epoch loop
            train_accuracy = book.calc_accuracy_loader(train_loader, m, device, num_batches=eval_iter)
            val_accuracy = book.calc_accuracy_loader(val_loader, m, device, num_batches=eval_iter)
            print(f"Training accuracy: {train_accuracy*100:.2f}% | Validation accuracy: {val_accuracy*100:.2f}%")
            return {"train_accs": train_accuracy, "val_accs": val_accuracy}

        start_time = time.perf_counter()
        optimizer = make_optimizer(model, settings["learning_rate"], settings["weight_decay"])
        train(model, train_loader, val_loader, optimizer, device, settings["num_epochs"], settings["eval_freq"],
              eval_iter, loss_fn=lambda m, inputs, targets: book.calc_loss_batch(inputs, targets, m, device),
              evaluate_fn=lambda m: book.evaluate_model(m, train_loader, val_loader, device, eval_iter),
              epoch_end_fn=accuracies_after_epoch, final_checkpoint=False, progress=progress, desc="fine-tuning")
        seconds = time.perf_counter() - start_time
        print(f"Training completed in {seconds / 60:.2f} minutes.")

        print("\nEvaluating on the full datasets ...\n")
        accuracies = {name: book.calc_accuracy_loader(loader, model, device)
                      for name, loader in zip(("train", "validation", "test"), (train_loader, val_loader, test_loader))}
        print_accuracies(accuracies)
    source = {"pretrained": f"{model_name} pretrained", "scratch": f"{model_name} random init",
              "quick": "small GPT random init"}[mode] if init_checkpoint is None else "GPT from checkpoint"
    return {**result(source, "decoder (our GPTModel)", accuracies, seconds, stats["peak_mib"],
                     sum(p.numel() for p in model.parameters()), book.count_trainable_parameters(model),
                     gpu_peak_mib=stats.get("gpu_peak_mib"), max_length=train_loader.dataset.max_length),
            "classifier": model}


# --- The command ----------------------------------------------------------------------------------------

def context_length_argument(text: str):
    """--context-length: a whole number of tokens or one of the book's two words."""
    if text in CONTEXT_CHOICES:
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, {' or '.join(CONTEXT_CHOICES)}; "
                                         f"got {text}") from None


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The book's training knobs under the project's option names (the settings' defaults when not given)."""
    p.add_argument("--epochs", type=positive_int, help="number of epochs (default 1, as the book)")
    p.add_argument("--lr", type=positive_float, help="AdamW learning rate (default 5e-5; quick: 1e-3)")
    p.add_argument("--weight-decay", type=non_negative_float, help="AdamW weight decay (default 0.1)")
    p.add_argument("--batch-size", type=positive_int, help="batch size (default 8)")
    p.add_argument("--eval-freq", type=positive_int, help="evaluate the loss every N steps")
    p.add_argument("--eval-iter", type=positive_int, help="batches per evaluation")
    p.add_argument("--seed", type=int, default=123, help="random seed, also of the --data split (default 123)")
    p.add_argument("--context-length", type=context_length_argument,
                   help="tokens per text: a number (default 256; quick 64), longest_training_example or "
                        "model_context_length")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def training_overrides(args: argparse.Namespace) -> dict:
    values = {"num_epochs": args.epochs, "learning_rate": args.lr, "weight_decay": args.weight_decay,
              "batch_size": args.batch_size, "eval_freq": args.eval_freq, "eval_iter": args.eval_iter,
              "seed": args.seed, "context_length": args.context_length, "trainable": args.trainable}
    return {k: v for k, v in values.items() if v is not None}


def parser() -> Parser:
    p = Parser(prog="python -m ch06.imdb.train_gpt",
               description="Fine-tune our GPT-2 as a classifier of a labelled text file (IMDb by default).")
    add_data_args(p, outputs_dir("ch06-imdb"))
    add_model_source_args(p, "gpt2", "offline: a small random-init model, all layers trained")
    add_training_args(p)
    p.add_argument("--trainable", choices=book.TRAINABLE_CHOICES,
                   help="what trains: head, last_block (default) or all (quick/from scratch: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ch06.imdb.train_gpt [options]`; returns the exit code."""
    args = parser().parse_args(argv)
    mode = "quick" if args.quick else "scratch" if args.from_scratch else "pretrained"
    base = {"quick": QUICK_SETTINGS, "scratch": FROM_SCRATCH_SETTINGS, "pretrained": BOOK_SETTINGS}[mode]

    def work():
        ch06_cli.check_model_source(args)
        check_input_file(args.init_checkpoint, "--init-checkpoint")
        data = data_from_args(args, seed=args.seed)
        print(data.describe())
        train_gpt(data, {**base, **training_overrides(args)}, mode=mode, model_name=args.model,
                  init_checkpoint=args.init_checkpoint, n_heads=args.n_heads, device=args.device,
                  progress=not args.no_progress)

    return run(work, argv)


if __name__ == "__main__":
    sys.exit(main())
