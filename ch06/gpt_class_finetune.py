"""Chapter 6: fine-tuning a GPT model to classify text messages as spam or not spam.

Sections 6.2-6.8 as importable functions: the SMS spam data (download, balancing,
splitting, CSV files written atomically), `SpamDataset` (right padding, truncation,
validated input), the classification head (`prepare_classifier`), loss and accuracy
read at the last *real* token of every sequence, the training loop
`train_classifier_simple`, `classify_review`, and saving/loading the classifier.

    python -m ch06.gpt_class_finetune                 # the book's run: pretrained GPT-2 124M, 5 epochs
    python -m ch06.gpt_class_finetune --quick         # offline: small random-init model, about a minute on a CPU
    python -m ch06.gpt_class_finetune --from-scratch  # GPT-2 124M shape, random init, every layer trained
    python -m ch06.gpt_class_finetune --quick --init-checkpoint outputs/ch05/model.pth

Imports chapter 2 (data files, tokenizer, atomic writes, device/seed helpers),
chapter 4 (`GPTModel`) and chapter 5 (optimizer, loss plot, saving weights,
pretrained GPT-2 weights).

Why the last real token: the model is causal, so the output at position t has seen
tokens 0..t and nothing after. Batches are padded on the right, so the output at the
last real token of a message is exactly what the model computes for the unpadded
message; the outputs at the padding positions come from padding the model never
saw in training the classifier's way. Reading the last real token makes every
prediction independent of how much padding its batch happened to need.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # the text bar: tqdm.auto warns in notebooks without ipywidgets

from ch02.atomic import atomic_path, atomic_write
from ch02.download import get_data_file
from ch02.runtime import get_device, set_seed
from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT2_SIZES, GPT_CONFIG_124M, GPTModel
from ch05.checkpoint import (
    CheckpointMismatchError,
    config_from_state_dict,
    load_model,
    load_state_file,
    save_model,
    saved_config,
)
from ch05.gpt_train import average_over_batches, forward_context, make_optimizer, plot_losses
from ch05.onednn_linear import add_no_onednn_argument

SPAM_FILE = "SMSSpamCollection"
LABEL_MAP = {"ham": 0, "spam": 1}          # text label in the raw file -> class index
CLASS_NAMES = {0: "not spam", 1: "spam"}   # class index -> what classify_review returns
PAD_TOKEN_ID = 50256                       # GPT-2's <|endoftext|>, used as the padding token
SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_OUTPUT_DIR = "outputs/ch06"
MODEL_FILE = "review_classifier.pth"


# --- 6.2 Preparing the dataset --------------------------------------------------------------------

def load_spam_data(path: str | Path | None = None) -> pd.DataFrame:
    """The SMS Spam Collection as a DataFrame with columns Label ("ham"/"spam") and Text.

    `path` defaults to the verified copy from `ch02.download.get_data_file` (mirror, cache
    or download). 4,825 ham and 747 spam messages.
    """
    path = get_data_file(SPAM_FILE) if path is None else Path(path)
    return pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"])


def create_balanced_dataset(df: pd.DataFrame, seed: int = 123) -> pd.DataFrame:
    """Keep every spam message and an equally large random sample of ham messages.

    The raw data is 87% ham, so a classifier that always says "ham" would already score
    87%; with balanced classes, accuracy measures what the model learned.
    """
    num_spam = int((df["Label"] == "spam").sum())
    ham = df[df["Label"] == "ham"]
    if num_spam == 0 or len(ham) < num_spam:
        raise ValueError(f"cannot balance: {num_spam} spam and {len(ham)} ham rows "
                         "(need at least one spam row and at least as many ham rows as spam rows)")
    ham_subset = ham.sample(num_spam, random_state=seed)
    return pd.concat([ham_subset, df[df["Label"] == "spam"]])


def random_split(df: pd.DataFrame, train_frac: float, validation_frac: float,
                 seed: int = 123) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Shuffle the rows (fixed seed), then cut them into train / validation / test parts.

    Sizes are int(len * train_frac) and int(len * validation_frac); the test part gets the rest.
    """
    if not (0 < train_frac < 1 and 0 <= validation_frac < 1 and train_frac + validation_frac < 1):
        raise ValueError(f"need 0 < train_frac, 0 <= validation_frac and train_frac + validation_frac < 1; "
                         f"got {train_frac} and {validation_frac}")
    df = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(df) * train_frac)
    validation_end = train_end + int(len(df) * validation_frac)
    return df[:train_end], df[train_end:validation_end], df[validation_end:]


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a DataFrame as CSV atomically (a crash never leaves half a file)."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        f.write(df.to_csv(index=False).encode("utf-8"))
    return path


def prepare_spam_splits(output_dir: str | Path = DEFAULT_OUTPUT_DIR, data_path: str | Path | None = None,
                        seed: int = 123, train_frac: float = 0.7, validation_frac: float = 0.1) -> dict[str, Path]:
    """Load, balance, encode labels (ham=0, spam=1), split 70/10/20 and write train/validation/test.csv.

    Returns {"train": path, "validation": path, "test": path}. Re-running gives identical files.
    """
    balanced = create_balanced_dataset(load_spam_data(data_path), seed=seed)
    balanced["Label"] = balanced["Label"].map(LABEL_MAP)
    parts = random_split(balanced, train_frac, validation_frac, seed=seed)
    output_dir = Path(output_dir)
    return {name: write_csv(part, output_dir / f"{name}.csv") for name, part in zip(SPLIT_NAMES, parts)}


def download_and_unzip_spam_data(url: str, zip_path: str | Path, extracted_path: str | Path,
                                 data_file_path: str | Path) -> None:
    """The book's listing 6.1: put the SMS Spam Collection at `data_file_path` (e.g. a .tsv name).

    Same signature and messages as the book. The file comes through `ch02.download.get_data_file`
    (the offline mirror, the cache, else a download from `url`, checked by sha256), which
    unpacks the archive itself, so no zip file is left at `zip_path`; `extracted_path` is
    created as in the book.
    """
    data_file_path = Path(data_file_path)
    if data_file_path.exists():
        print(f"{data_file_path} already exists. Skipping download and extraction.")
        return
    source = get_data_file(SPAM_FILE, url=url)
    Path(extracted_path).mkdir(parents=True, exist_ok=True)
    with atomic_write(data_file_path, "wb") as f:
        f.write(source.read_bytes())
    print(f"File downloaded and saved as {data_file_path}")


# --- 6.3 Creating data loaders --------------------------------------------------------------------

def encode_text(text: str, tokenizer) -> list[int]:
    """GPT-2 token ids of `text`; a literal "<|endoftext|>" in a message is ordinary text, never the pad id."""
    return tokenizer.encode(text, disallowed_special=())


def read_labeled_csv(csv_file: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read a Label/Text CSV and check it: both columns present, labels 0 or 1, no empty text.

    Errors are ValueErrors naming the file and the data row (1-based; line = row + 1 because of the header).
    """
    if isinstance(csv_file, pd.DataFrame):
        df, source = csv_file.reset_index(drop=True), "DataFrame"
    else:
        source = str(csv_file)
        # Read everything as text so a message like "NA" stays a message and a bad label can be reported as written.
        df = pd.read_csv(csv_file, dtype=str, keep_default_na=False)
    missing = [c for c in ("Label", "Text") if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; expected columns 'Label' and 'Text', "
                         f"found {list(df.columns)}")
    labels = []
    for i, (label, text) in enumerate(zip(df["Label"], df["Text"])):
        value = str(label).strip()
        if value not in ("0", "1"):
            raise ValueError(f"{source}: row {i + 1} (line {i + 2}): label {label!r} is not 0 or 1 "
                             "(0 = not spam, 1 = spam)")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{source}: row {i + 1} (line {i + 2}): the text is empty")
        labels.append(int(value))
    return pd.DataFrame({"Label": labels, "Text": list(df["Text"])})


class SpamDataset(Dataset):
    """Token ids and labels of a Label/Text CSV, padded on the right to one common length.

    The length is the longest message (after tokenization) unless `max_length` is given,
    in which case longer messages are truncated to their first `max_length` tokens.
    Validation and test sets should use the training set's length:
    `SpamDataset(val_csv, tokenizer, max_length=train_dataset.max_length)`.

    `self.lengths` holds each message's true token count (after truncation). Items are
    (input_ids, label) as in the book; the true length is recovered from the padding,
    which is why the pad id may not occur inside a message (checked here).
    """

    def __init__(self, csv_file, tokenizer, max_length: int | None = None, pad_token_id: int = PAD_TOKEN_ID):
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens or None, got {max_length}")
        self.data = read_labeled_csv(csv_file)
        self.pad_token_id = pad_token_id
        encoded = [encode_text(text, tokenizer) for text in self.data["Text"]]
        for i, ids in enumerate(encoded):
            if pad_token_id in ids:
                raise ValueError(f"row {i + 1}: the message contains the pad token id {pad_token_id}, so padding "
                                 "could not be told apart from text; use a pad id outside the text's tokens")
        self.max_length = max(len(ids) for ids in encoded) if max_length is None else max_length
        encoded = [ids[:self.max_length] for ids in encoded]
        self.lengths = [len(ids) for ids in encoded]
        self.encoded_texts = [ids + [pad_token_id] * (self.max_length - len(ids)) for ids in encoded]
        self._inputs = torch.tensor(self.encoded_texts, dtype=torch.long)  # (num_rows, max_length)
        self._labels = torch.tensor(self.data["Label"].tolist(), dtype=torch.long)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._inputs[index], self._labels[index]

    def __len__(self) -> int:
        return len(self._labels)

    def _longest_encoded_length(self) -> int:
        return max(self.lengths)


def create_spam_loaders(paths: dict[str, Path], tokenizer, batch_size: int = 8, max_length: int | None = None,
                        pad_token_id: int = PAD_TOKEN_ID, seed: int = 123,
                        num_workers: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train (shuffled with a seeded generator, last partial batch dropped), validation and test loaders."""
    train_ds = SpamDataset(paths["train"], tokenizer, max_length=max_length, pad_token_id=pad_token_id)
    val_ds = SpamDataset(paths["validation"], tokenizer, max_length=train_ds.max_length, pad_token_id=pad_token_id)
    test_ds = SpamDataset(paths["test"], tokenizer, max_length=train_ds.max_length, pad_token_id=pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=True,
                              num_workers=num_workers, generator=generator)
    val_loader = DataLoader(val_ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    test_loader = DataLoader(test_ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, val_loader, test_loader


# --- 6.5 Adding a classification head ---------------------------------------------------------------

TRAINABLE_CHOICES = ("head", "last_block", "all")


def prepare_classifier(model: GPTModel, num_classes: int = 2, trainable: str = "last_block") -> GPTModel:
    """Turn a GPT language model into a classifier, in place, and choose what trains.

    The output head (emb_dim -> vocab_size) is replaced by a fresh nn.Linear(emb_dim, num_classes).
    trainable: "last_block" (the book: last transformer block, final_norm and the new head),
    "all" (every parameter), or "head" (only the new head).
    """
    if trainable not in TRAINABLE_CHOICES:
        raise ValueError(f"trainable must be one of {TRAINABLE_CHOICES}, got {trainable!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    for param in model.parameters():
        param.requires_grad = trainable == "all"
    ref = model.tok_emb.weight
    model.out_head = nn.Linear(model.out_head.in_features, num_classes).to(device=ref.device, dtype=ref.dtype)
    if trainable == "last_block":
        for module in (model.trf_blocks[-1], model.final_norm):
            for param in module.parameters():
                param.requires_grad = True
    if hasattr(model, "cfg"):
        model.cfg["num_classes"] = num_classes  # so a saved classifier can be rebuilt with the right head
    return model


def make_classifier_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only: chapter 5's `make_optimizer` (fused kernel where
    available, frozen layers skipped, a clear error when nothing is trainable)."""
    return make_optimizer(model, lr, weight_decay)


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_classifier(cfg: dict, num_classes: int = 2, trainable: str = "all") -> GPTModel:
    """A GPTModel with a classification head, from a config (random init)."""
    return prepare_classifier(GPTModel(cfg), num_classes=num_classes, trainable=trainable)


# --- 6.6 Calculating the classification loss and accuracy --------------------------------------------

def sequence_lengths(input_batch: torch.Tensor, pad_token_id: int = PAD_TOKEN_ID) -> torch.Tensor:
    """True length of each right-padded sequence: 1 + the position of its last non-pad token. (b,) long."""
    is_real = input_batch != pad_token_id                 # (b, num_tokens)
    if not bool(is_real.any(dim=1).all()):
        raise ValueError("a sequence in the batch consists of padding only; there is no token to classify")
    num_tokens = input_batch.shape[1]
    # argmax finds the first True, so search the reversed rows for the last one.
    return num_tokens - is_real.flip(1).int().argmax(dim=1)


def last_token_logits(model: nn.Module, input_batch: torch.Tensor, pad_token_id: int = PAD_TOKEN_ID,
                      lengths: torch.Tensor | None = None, trim: bool = True) -> torch.Tensor:
    """Class logits read at each sequence's last real token: (b, num_tokens) ids -> (b, num_classes).

    `lengths` (true lengths) default to the ones found from the padding. With `trim`, padding
    columns after the longest sequence of the batch are dropped before the forward pass: the
    model is causal, so this changes no logit at a real token, and it saves the work of
    running padding through the network (SMS messages average 23 tokens).
    """
    if lengths is None:
        lengths = sequence_lengths(input_batch, pad_token_id)
    lengths = torch.as_tensor(lengths, device=input_batch.device)
    if trim:
        input_batch = input_batch[:, :int(lengths.max())]
    logits = model(input_batch)                           # (b, num_tokens, num_classes)
    rows = torch.arange(input_batch.shape[0], device=input_batch.device)
    return logits[rows, lengths - 1]                      # (b, num_classes)


def _pad_id(data_loader, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return pad_token_id
    return getattr(getattr(data_loader, "dataset", None), "pad_token_id", PAD_TOKEN_ID)


@contextlib.contextmanager
def evaluation(model: nn.Module):
    """Eval mode (no dropout) and no autograd for the block; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def calc_accuracy_loader(data_loader, model: nn.Module, device, num_batches: int | None = None,
                         pad_token_id: int | None = None) -> float:
    """Fraction of correctly classified examples in the first `num_batches` batches (all when None)."""
    pad_token_id = _pad_id(data_loader, pad_token_id)
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    correct, seen = 0, 0
    with evaluation(model):
        for i, (input_batch, target_batch) in enumerate(data_loader):
            if i >= num_batches:
                break
            input_batch, target_batch = input_batch.to(device), target_batch.to(device)
            predicted = last_token_logits(model, input_batch, pad_token_id).argmax(dim=-1)
            correct += int((predicted == target_batch).sum())
            seen += target_batch.shape[0]
    if seen == 0:
        raise ValueError("the data loader yielded no examples")
    return correct / seen


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module, device,
                    pad_token_id: int = PAD_TOKEN_ID) -> torch.Tensor:
    """Cross-entropy of the class logits at each sequence's last real token."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = last_token_logits(model, input_batch, pad_token_id)  # (b, num_classes)
    return F.cross_entropy(logits.float(), target_batch)


def calc_loss_loader(data_loader, model: nn.Module, device, num_batches: int | None = None,
                     pad_token_id: int | None = None) -> float:
    """Average loss over the first `num_batches` batches (all when None), without autograd."""
    pad_token_id = _pad_id(data_loader, pad_token_id)
    return average_over_batches(
        data_loader, lambda inputs, targets: calc_loss_batch(inputs, targets, model, device, pad_token_id),
        num_batches)


# --- 6.7 Fine-tuning the model on supervised data ----------------------------------------------------

def evaluate_model(model: nn.Module, train_loader, val_loader, device, eval_iter: int) -> tuple[float, float]:
    """Train and validation loss on `eval_iter` batches each, in eval mode (as in chapter 5)."""
    with evaluation(model):
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    return train_loss, val_loss


def train_classifier_simple(model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer, device,
                            num_epochs: int, eval_freq: int, eval_iter: int, *, progress: bool = True,
                            use_onednn: bool = True) -> tuple[list[float], list[float], list[float], list[float], int]:
    """The chapter's loop: chapter 5's training loop with labels instead of next tokens.

    Losses are evaluated every `eval_freq` steps on `eval_iter` batches; accuracies after
    every epoch on `eval_iter` batches. Returns (train_losses, val_losses, train_accs,
    val_accs, examples_seen), where examples_seen is the total number of training examples used.
    On a CPU the linear layers run through oneDNN unless `use_onednn=False` (chapter 5's
    `forward_context`: same results, faster).
    """
    train_losses, val_losses, train_accs, val_accs = [], [], [], []
    examples_seen, global_step = 0, -1
    pad_token_id = _pad_id(train_loader, None)
    bar = tqdm(total=num_epochs * len(train_loader), disable=not progress, desc="fine-tuning", unit="step")
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad(set_to_none=True)
            with forward_context(device, None, use_onednn):
                loss = calc_loss_batch(input_batch, target_batch, model, device, pad_token_id)
            loss.backward()
            optimizer.step()
            examples_seen += input_batch.shape[0]
            global_step += 1
            bar.update(1)
            if global_step % eval_freq == 0:
                with forward_context(device, None, use_onednn):
                    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
                bar.write(f"Ep {epoch + 1} (Step {global_step:06d}): "
                          f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        with forward_context(device, None, use_onednn):
            train_accuracy = calc_accuracy_loader(train_loader, model, device, num_batches=eval_iter)
            val_accuracy = calc_accuracy_loader(val_loader, model, device, num_batches=eval_iter)
        bar.write(f"Training accuracy: {train_accuracy * 100:.2f}% | Validation accuracy: {val_accuracy * 100:.2f}%")
        train_accs.append(train_accuracy)
        val_accs.append(val_accuracy)
    bar.close()
    return train_losses, val_losses, train_accs, val_accs, examples_seen


def plot_values(epochs_seen, examples_seen, train_values, val_values, label: str = "loss",
                path: str | Path | None = None):
    """Training and validation curves against epochs (bottom) and examples seen (top axis).

    Chapter 5's loss plot with the labels changed to `label` and "Examples seen".
    """
    import matplotlib.pyplot as plt

    fig = plot_losses(epochs_seen, examples_seen, train_values, val_values, path=None)
    ax1, ax2 = fig.axes
    ax1.set_ylabel(label.capitalize())
    ax1.legend([f"Training {label}", f"Validation {label}"], loc="best")
    ax2.set_xlabel("Examples seen")
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
        plt.close(fig)
    return fig


# --- 6.8 Using the LLM as a spam classifier ------------------------------------------------------------

def classify_review(text: str, model: nn.Module, tokenizer, device, max_length: int | None = None,
                    pad_token_id: int = PAD_TOKEN_ID) -> str:
    """Classify one message: "spam" or "not spam".

    The text is truncated to `max_length` tokens and never beyond the model's context
    length (its positional embedding); padding it to `max_length` would not change the
    answer, because the logits are read at its last real token.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("cannot classify an empty text")
    input_ids = encode_text(text, tokenizer)
    supported = model.pos_emb.weight.shape[0]
    limit = supported if max_length is None else min(max_length, supported)
    input_ids = input_ids[:limit]
    length = len(input_ids)
    if max_length is not None:
        input_ids = input_ids + [pad_token_id] * (limit - length)
    input_tensor = torch.tensor(input_ids, device=device).unsqueeze(0)  # (1, num_tokens)
    with evaluation(model):
        logits = last_token_logits(model, input_tensor, lengths=torch.tensor([length]))
    return CLASS_NAMES[int(logits.argmax(dim=-1))]


def save_classifier(model: GPTModel, path: str | Path, max_length: int | None = None,
                    pad_token_id: int = PAD_TOKEN_ID) -> Path:
    """Save the weights (chapter 5's atomic `save_model`) and, next to them, a JSON file with
    the config, the training max_length and the pad id, so the classifier can be rebuilt."""
    path = save_model(model, path)
    meta = {"config": model.cfg, "num_classes": model.out_head.out_features,
            "max_length": max_length, "pad_token_id": pad_token_id}
    with atomic_write(path.with_suffix(".json")) as f:
        json.dump(meta, f, indent=2)
    return path


def load_classifier(path: str | Path, device="cpu") -> tuple[GPTModel, dict]:
    """Rebuild a classifier saved by `save_classifier`; returns (model in eval mode, metadata)."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} (the classifier's config, written by save_classifier) does not exist")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    model = build_classifier(meta["config"], num_classes=meta["num_classes"])
    load_model(model, path, map_location="cpu")
    return model.to(device).eval(), meta


# --- Starting points: pretrained GPT-2, a chapter-5 checkpoint, or random init ---------------------------

QUICK_CLASSIFIER_CONFIG = {**GPT_CONFIG_124M, "context_length": 128, "emb_dim": 64, "n_heads": 4,
                           "n_layers": 2, "drop_rate": 0.1}

BOOK_SETTINGS = {
    "learning_rate": 5e-5, "weight_decay": 0.1, "batch_size": 8, "num_epochs": 5,
    "eval_freq": 50, "eval_iter": 5, "max_length": None, "trainable": "last_block", "seed": 123,
    "num_threads": None,  # None: PyTorch's default number of CPU threads
}
# Random init learns everything from 1,045 messages: every layer trains, with a higher learning rate.
QUICK_SETTINGS = {**BOOK_SETTINGS, "learning_rate": 1e-3, "num_epochs": 4, "max_length": 64, "trainable": "all",
                  "num_threads": 1}
FROM_SCRATCH_SETTINGS = {**BOOK_SETTINGS, "learning_rate": 1e-4, "trainable": "all"}

PRETRAINED_HELP = """\
The pretrained GPT-2 weights could not be loaded ({reason}).
Ways to get them:
  * with internet access they are downloaded once (about 0.5 GB for gpt2) and cached;
  * behind a firewall, point Hugging Face downloads at a mirror, e.g.
        HF_ENDPOINT=https://hf-mirror.com python -m ch06.gpt_class_finetune
  * without any network, fetch them on a connected machine (python -m ch05.gpt_download gpt2), copy the
    Hugging Face cache (~/.cache/huggingface) over, or pass a folder holding model.safetensors with --model PATH."""

OFFLINE_ALTERNATIVES = """\
Without pretrained weights the chapter still runs offline:
  python -m ch06.gpt_class_finetune --quick          # small model from random init, about a minute on a CPU
  python -m ch06.gpt_class_finetune --from-scratch   # GPT-2 124M shape from random init (slow on a CPU, less accurate)
  python -m ch06.gpt_class_finetune --quick --init-checkpoint outputs/ch05/model.pth   # start from chapter 5"""


class PretrainedUnavailable(RuntimeError):
    """Raised by `main` when the book's run needs pretrained weights that cannot be had."""


def load_pretrained(name_or_path: str, device) -> GPTModel:
    """Pretrained GPT-2 via chapter 5 (imported here: the download code is only needed now)."""
    try:
        from ch05.gpt_download import PretrainedWeightsUnavailable, load_pretrained_gpt2
    except ImportError as exc:
        raise PretrainedUnavailable(f"{PRETRAINED_HELP.format(reason=exc)}\n{OFFLINE_ALTERNATIVES}") from exc
    try:
        return load_pretrained_gpt2(name_or_path, drop_rate=0.0, device=device)
    except PretrainedWeightsUnavailable as exc:
        # chapter 5's message already says how to get the weights; add the offline routes.
        raise PretrainedUnavailable(f"{exc}\n{OFFLINE_ALTERNATIVES}") from exc


def load_init_checkpoint(path: str | Path, drop_rate: float = 0.0, n_heads: int | None = None) -> GPTModel:
    """A GPTModel initialized from a chapter-5 file: a training checkpoint or a weights-only model.pth.

    The config comes from the file (or config.json beside it), else from the tensor shapes
    (chapter 5's `config_from_state_dict`; `n_heads` settles the head count).
    """
    data = load_state_file(path, "cpu")
    state = data["model_state_dict"] if "model_state_dict" in data else data
    try:
        cfg = dict(saved_config(path) or config_from_state_dict(state, n_heads=n_heads))
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(f"{path}: {exc} (--n-heads on the command line)") from None
    if n_heads is not None:
        cfg["n_heads"] = n_heads
    cfg["drop_rate"] = drop_rate
    model = GPTModel(cfg)
    load_model(model, path)
    return model


@contextlib.contextmanager
def cpu_threads(num_threads: int | None):
    """Temporarily run PyTorch's CPU ops on `num_threads` threads (None: leave the setting alone).

    The quick model's matrices are so small that extra threads only add synchronisation; on a
    busy machine (other processes on the same cores) several threads can be ten times slower.
    """
    if not num_threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(settings: dict, output_dir: str | Path = DEFAULT_OUTPUT_DIR, *, mode: str = "pretrained",
         model_name: str = "gpt2", init_checkpoint: str | Path | None = None, n_heads: int | None = None,
         cfg: dict | None = None, device=None, progress: bool = True, use_onednn: bool = True) -> dict:
    """Prepare the data, build the model, fine-tune, evaluate, save plots and the classifier.

    mode: "pretrained" (the book: GPT-2 weights via chapter 5, raises PretrainedUnavailable with
    instructions when they cannot be had), "quick" (small random-init model, or `init_checkpoint`),
    "scratch" (GPT-2 shape of `model_name`, random init). `cfg` overrides the model config in the
    random-init modes. `settings["num_threads"]` (quick: 1) limits CPU threads while it runs.
    `use_onednn` (default on): on an x86 CPU, linear layers run through oneDNN in training and
    evaluation (chapter 5's `forward_context`; same results, faster).
    """
    if mode not in ("pretrained", "quick", "scratch"):
        raise ValueError(f"mode must be 'pretrained', 'quick' or 'scratch', got {mode!r}")
    device = torch.device(device) if device is not None else get_device()
    with cpu_threads(settings.get("num_threads") if device.type == "cpu" else None):
        return _fine_tune(settings, Path(output_dir), mode, model_name, init_checkpoint, n_heads, cfg, device,
                          progress, use_onednn)


def _fine_tune(settings, output_dir, mode, model_name, init_checkpoint, n_heads, cfg, device, progress,
               use_onednn) -> dict:
    set_seed(settings["seed"])
    if init_checkpoint is not None:
        model = load_init_checkpoint(init_checkpoint, n_heads=n_heads)
        source = f"weights from {init_checkpoint}"
    elif mode == "pretrained":
        model = load_pretrained(model_name, device)
        source = f"pretrained {model_name}"
    else:
        if cfg is None:
            cfg = QUICK_CLASSIFIER_CONFIG if mode == "quick" else {**GPT_CONFIG_124M, **GPT2_SIZES.get(model_name, {}),
                                                                   "drop_rate": 0.0}
        model = GPTModel(cfg)
        source = "random init"
    set_seed(settings["seed"])  # the same head init and batch order, whatever the model source consumed
    prepare_classifier(model, num_classes=2, trainable=settings["trainable"])
    model.to(device)
    paths = prepare_spam_splits(output_dir, seed=settings["seed"])

    context_length = model.pos_emb.weight.shape[0]
    max_length = settings["max_length"]
    if max_length is not None and max_length > context_length:
        raise ValueError(f"max_length {max_length} exceeds the model's context length {context_length}")
    tokenizer = get_gpt2_tokenizer()
    train_loader, val_loader, test_loader = create_spam_loaders(
        paths, tokenizer, batch_size=settings["batch_size"], max_length=max_length, seed=settings["seed"])
    if train_loader.dataset.max_length > context_length:
        # The longest message does not fit: truncate every split to the context length.
        train_loader, val_loader, test_loader = create_spam_loaders(
            paths, tokenizer, batch_size=settings["batch_size"], max_length=context_length, seed=settings["seed"])
    max_length = train_loader.dataset.max_length
    print(f"device: {device}; model: {source}; {count_trainable_parameters(model):,} of "
          f"{sum(p.numel() for p in model.parameters()):,} parameters trainable ({settings['trainable']}); "
          f"max_length {max_length}; {len(train_loader)} training batches per epoch")

    optimizer = make_classifier_optimizer(model, settings["learning_rate"], settings["weight_decay"])
    start = time.perf_counter()
    train_losses, val_losses, train_accs, val_accs, examples_seen = train_classifier_simple(
        model, train_loader, val_loader, optimizer, device, num_epochs=settings["num_epochs"],
        eval_freq=settings["eval_freq"], eval_iter=settings["eval_iter"], progress=progress, use_onednn=use_onednn)
    seconds = time.perf_counter() - start

    with forward_context(device, None, use_onednn):
        accuracies = {name: calc_accuracy_loader(loader, model, device)
                      for name, loader in zip(SPLIT_NAMES, (train_loader, val_loader, test_loader))}
    for name, acc in accuracies.items():
        print(f"{name.capitalize()} accuracy: {acc * 100:.2f}%")
    print(f"Training took {seconds / 60:.2f} minutes")

    import matplotlib.pyplot as plt

    num_epochs = settings["num_epochs"]
    if train_losses:
        plot_values(torch.linspace(0, num_epochs, len(train_losses)).tolist(),
                    torch.linspace(0, examples_seen, len(train_losses)).tolist(),
                    train_losses, val_losses, label="loss", path=output_dir / "loss-plot.png")
    plot_values(torch.linspace(0, num_epochs, len(train_accs)).tolist(),
                torch.linspace(0, examples_seen, len(train_accs)).tolist(),
                train_accs, val_accs, label="accuracy", path=output_dir / "accuracy-plot.png")
    plt.close("all")
    model_path = save_classifier(model, output_dir / MODEL_FILE, max_length=max_length)
    print(f"saved {model_path} and plots in {output_dir}")
    return {"model": model, "accuracies": accuracies, "train_losses": train_losses, "val_losses": val_losses,
            "train_accs": train_accs, "val_accs": val_accs, "examples_seen": examples_seen, "seconds": seconds,
            "max_length": max_length, "model_path": model_path, "loaders": (train_loader, val_loader, test_loader)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fine-tune a GPT model as an SMS spam classifier (chapter 6).")
    p.add_argument("--quick", action="store_true",
                   help="offline: a small random-init model (or --init-checkpoint), all layers trained, ~1 min on a CPU")
    p.add_argument("--from-scratch", action="store_true",
                   help="no pretrained weights: random init of the --model shape, all layers trained")
    p.add_argument("--init-checkpoint", default=None,
                   help="start from a chapter-5 checkpoint.pth or model.pth instead of random/pretrained weights")
    p.add_argument("--n-heads", type=int, default=None, help="attention heads of --init-checkpoint, if not guessable")
    p.add_argument("--model", default="gpt2",
                   help="pretrained GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local folder/file")
    p.add_argument("--trainable", choices=TRAINABLE_CHOICES, help="what trains (default last_block; quick/scratch: all)")
    p.add_argument("--epochs", type=int, help="number of epochs (default 5; quick: 4)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 5e-5; quick: 1e-3; from scratch: 1e-4)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    p.add_argument("--batch-size", type=int, help="batch size (default 8)")
    p.add_argument("--eval-freq", type=int, help="evaluate the loss every N steps (default 50)")
    p.add_argument("--eval-iter", type=int, help="batches per evaluation (default 5)")
    p.add_argument("--max-length", type=int,
                   help="pad/truncate messages to N tokens (default: the longest training message; quick: 64)")
    p.add_argument("--seed", type=int, help="random seed (default 123)")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="where CSV splits, plots and the model go")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_no_onednn_argument(p)
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> tuple[str, dict]:
    mode = "quick" if args.quick else "scratch" if args.from_scratch else "pretrained"
    base = {"quick": QUICK_SETTINGS, "scratch": FROM_SCRATCH_SETTINGS, "pretrained": BOOK_SETTINGS}[mode]
    settings = dict(base)
    overrides = {"num_epochs": args.epochs, "learning_rate": args.lr, "weight_decay": args.weight_decay,
                 "batch_size": args.batch_size, "eval_freq": args.eval_freq, "eval_iter": args.eval_iter,
                 "max_length": args.max_length, "trainable": args.trainable, "seed": args.seed}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return mode, settings


def cli(argv=None) -> int:
    args = parse_args(argv)
    mode, settings = settings_from_args(args)
    try:
        main(settings, args.output_dir, mode=mode, model_name=args.model, init_checkpoint=args.init_checkpoint,
             n_heads=args.n_heads, device=args.device, progress=not args.no_progress, use_onednn=not args.no_onednn)
    except PretrainedUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
