"""Chapter 6: fine-tuning a GPT model as an SMS spam classifier, the book's listings.

Sections 6.2-6.3, the data: `download_and_unzip_spam_data` (listing 6.1, through the offline-first
data helper), `create_balanced_dataset` and `random_split` (the 70/10/20 split written to CSV
files), `SpamDataset` (right padding, truncation, validated input) and the three data loaders.
Sections 6.5-6.8, the classifier: the classification head (`prepare_classifier`), the loss and
accuracy (`calc_loss_batch`, `calc_loss_loader`, `calc_accuracy_loader`), `evaluate_model` (chapter 5's
functions, given this chapter's loss), the training loop `train_classifier_simple`, `plot_values` and
`classify_review`. The chapter's run as
a script (`python -m ch06.gpt_class_finetune`) is `ch06.cli`, which trains with the project's
training layer (`llmfs.trainer`).

One deliberate difference from the book, marked `# New:` where it happens: the logits are
read at each message's last *real* token, not at position -1. The model is causal, so the
output at position t has seen tokens 0..t and nothing after. Batches are padded on the right,
so the book's `[:, -1, :]` reads a padding position for every message shorter than the
longest, and the prediction then depends on how much padding its batch needed. At the last
real token the output is exactly what the model computes for the unpadded message.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import ch05.gpt_train
from ch04.gpt import REQUIRED_KEYS, GPTModel
from llmfs.atomic import atomic_path, atomic_write
from llmfs.download import get_data_file
from llmfs.errors import InvalidInput
from llmfs.finetuning import load_with_config, save_with_config
from llmfs.runtime import outputs_dir

SPAM_FILE = "SMSSpamCollection"
LABEL_MAP = {"ham": 0, "spam": 1}          # text label in the raw file -> class index
PAD_TOKEN_ID = 50256                       # GPT-2's <|endoftext|>, used as the padding token
SPLIT_NAMES = ("train", "validation", "test")


# --- 6.2 Preparing the dataset --------------------------------------------------------------------

def load_spam_data(path: str | Path | None = None) -> pd.DataFrame:
    """The SMS Spam Collection as a DataFrame with columns Label ("ham"/"spam") and Text.

    `path` defaults to the verified copy from `llmfs.download.get_data_file` (mirror, cache
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


def prepare_spam_splits(output_dir: str | Path | None = None, data_path: str | Path | None = None,
                        seed: int = 123, train_frac: float = 0.7, validation_frac: float = 0.1) -> dict[str, Path]:
    """Load, balance, encode labels (ham=0, spam=1), split 70/10/20 and write train/validation/test.csv.

    Returns {"train": path, "validation": path, "test": path}. Re-running gives identical files.
    `output_dir` defaults to outputs/ch06 (`llmfs.runtime.outputs_dir`, looked up at call time).
    """
    balanced = create_balanced_dataset(load_spam_data(data_path), seed=seed)
    balanced["Label"] = balanced["Label"].map(LABEL_MAP)
    parts = random_split(balanced, train_frac, validation_frac, seed=seed)
    output_dir = Path(output_dir) if output_dir is not None else outputs_dir("ch06")
    return {name: write_csv(part, output_dir / f"{name}.csv") for name, part in zip(SPLIT_NAMES, parts)}


def download_and_unzip_spam_data(url: str, zip_path: str | Path, extracted_path: str | Path,
                                 data_file_path: str | Path) -> None:
    """The book's listing 6.1: put the SMS Spam Collection at `data_file_path` (e.g. a .tsv name).

    Same signature and messages as the book. The file comes through `llmfs.download.get_data_file`
    (the offline mirror $LLMFS_DATA_MIRROR, the cache, else a download from `url`, checked by
    sha256), which unpacks the archive itself, so no zip file is left at `zip_path`;
    `extracted_path` is created as in the book.
    """
    data_file_path = Path(data_file_path)  # New: a str path works too (the book's needs a Path)
    if data_file_path.exists():
        print(f"{data_file_path} already exists. Skipping download and extraction.")
        return

    # New: downloading and unzipping in one step, offline first and verified
    source = get_data_file(SPAM_FILE, url=url)
    Path(extracted_path).mkdir(parents=True, exist_ok=True)

    # Add .tsv file extension (New: by writing a copy under that name, atomically)
    with atomic_write(data_file_path, "wb") as f:
        f.write(source.read_bytes())
    print(f"File downloaded and saved as {data_file_path}")


# --- 6.3 Creating data loaders --------------------------------------------------------------------

def encode_text(text: str, tokenizer) -> list[int]:
    """GPT-2 token ids of `text`; a literal "<|endoftext|>" in a message is ordinary text, never the pad id."""
    return tokenizer.encode(text, disallowed_special=())


def read_labeled_csv(csv_file: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read a Label/Text CSV and check it: both columns present, labels 0 or 1, no empty text.

    Errors are InvalidInput (a ValueError, and one line from a command) naming the file and the data
    row (1-based; line = row + 1 because of the header).
    """
    if isinstance(csv_file, pd.DataFrame):
        df, source = csv_file.reset_index(drop=True), "DataFrame"
    else:
        source = str(csv_file)
        # Read everything as text so a message like "NA" stays a message and a bad label can be reported as written.
        try:
            df = pd.read_csv(csv_file, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{source} is not a readable CSV file ({str(exc).strip().splitlines()[0]})") from None
    missing = [c for c in ("Label", "Text") if c not in df.columns]
    if missing:
        raise InvalidInput(f"{source}: missing column(s) {missing}; expected columns 'Label' and 'Text', "
                           f"found {list(df.columns)}")
    labels = []
    for i, (label, text) in enumerate(zip(df["Label"], df["Text"])):
        value = str(label).strip()
        if value not in ("0", "1"):
            raise InvalidInput(f"{source}: row {i + 1} (line {i + 2}): label {label!r} is not 0 or 1 "
                               "(0 = not spam, 1 = spam)")
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput(f"{source}: row {i + 1} (line {i + 2}): the text is empty")
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


# --- 6.4 onwards: the classifier ----------------------------------------------------------------------

CLASS_NAMES = {0: "not spam", 1: "spam"}   # class index -> what classify_review returns
MODEL_FILE = "review_classifier.pth"

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

def calc_accuracy_loader(data_loader, model: nn.Module, device, num_batches: int | None = None) -> float:
    model.eval()
    correct_predictions, num_examples = 0, 0

    if num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            input_batch, target_batch = input_batch.to(device), target_batch.to(device)

            with torch.no_grad():
                logits = last_token_logits(model, input_batch)  # New: the last real token, not [:, -1, :]
            predicted_labels = torch.argmax(logits, dim=-1)

            num_examples += predicted_labels.shape[0]
            correct_predictions += (predicted_labels == target_batch).sum().item()
        else:
            break
    return correct_predictions / num_examples


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device) -> torch.Tensor:
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = last_token_logits(model, input_batch)  # New: the last real token, not [:, -1, :]
    loss = torch.nn.functional.cross_entropy(logits, target_batch)
    return loss


# The book writes chapter 5's loss over a loader and evaluation out again here, so that they call
# this chapter's calc_loss_batch (the notebook shows that copy). Ours hands this chapter's
# calc_loss_batch to chapter 5's functions, so the loop exists once.
def calc_loss_loader(data_loader, model: nn.Module, device, num_batches: int | None = None) -> float:
    # New: chapter 5's code, given this chapter's loss
    return ch05.gpt_train.calc_loss_loader(data_loader, model, device, num_batches, calc_loss_batch)


def evaluate_model(model: nn.Module, train_loader, val_loader, device, eval_iter: int) -> tuple[float, float]:
    # New: chapter 5's code, given this chapter's loss
    return ch05.gpt_train.evaluate_model(model, train_loader, val_loader, device, eval_iter, calc_loss_batch)


# --- 6.7 Fine-tuning the model on supervised data ----------------------------------------------------

def train_classifier_simple(model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer, device,
                            num_epochs: int, eval_freq: int, eval_iter: int):
    # Initialize lists to track losses and examples seen
    train_losses, val_losses, train_accs, val_accs = [], [], [], []
    examples_seen, global_step = 0, -1

    # Main training loop
    for epoch in range(num_epochs):
        model.train()  # Set model to training mode

        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()  # Reset loss gradients from previous batch iteration
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()  # Calculate loss gradients
            optimizer.step()  # Update model weights using loss gradients
            examples_seen += input_batch.shape[0]  # New: track examples instead of tokens
            global_step += 1

            # Optional evaluation step
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                print(f"Ep {epoch+1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")

        # Calculate accuracy after each epoch
        train_accuracy = calc_accuracy_loader(train_loader, model, device, num_batches=eval_iter)
        val_accuracy = calc_accuracy_loader(val_loader, model, device, num_batches=eval_iter)
        print(f"Training accuracy: {train_accuracy*100:.2f}% | ", end="")
        print(f"Validation accuracy: {val_accuracy*100:.2f}%")
        train_accs.append(train_accuracy)
        val_accs.append(val_accuracy)

    return train_losses, val_losses, train_accs, val_accs, examples_seen


def plot_values(epochs_seen, examples_seen, train_values, val_values, label: str = "loss",
                path: str | Path | None = None):
    """Training and validation curves against epochs (bottom axis) and examples seen (top axis).

    Returns the figure; with `path` it is also saved there (atomically) and closed.
    """
    import matplotlib.pyplot as plt  # New: imported on use, so importing this module stays light

    fig, ax1 = plt.subplots(figsize=(5, 3))

    # Plot training and validation loss against epochs
    ax1.plot(epochs_seen, train_values, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()

    # Create a second x-axis for examples seen
    ax2 = ax1.twiny()  # Create a second x-axis that shares the same y-axis
    ax2.plot(examples_seen, train_values, alpha=0)  # Invisible plot for aligning ticks
    ax2.set_xlabel("Examples seen")

    fig.tight_layout()  # Adjust layout to make room
    if path is not None:  # New: saved only when asked, where asked (the book writes f"{label}-plot.pdf")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
        plt.close(fig)
    return fig  # New: the caller shows or saves it (the book calls plt.show())

# --- 6.8 Using the LLM as a spam classifier ------------------------------------------------------------

def classify_review(text: str, model: nn.Module, tokenizer, device, max_length: int | None = None,
                    pad_token_id: int = PAD_TOKEN_ID) -> str:
    if not isinstance(text, str) or not text.strip():  # New: a clear error instead of an empty batch
        raise ValueError("cannot classify an empty text")
    model.eval()

    # Prepare inputs to the model
    input_ids = encode_text(text, tokenizer)  # New: "<|endoftext|>" in a message is text, not padding
    supported_context_length = model.pos_emb.weight.shape[0]
    # New: max_length None means the model's context length (the book needs a number)
    limit = supported_context_length if max_length is None else min(max_length, supported_context_length)
    # Truncate sequences if they too long
    input_ids = input_ids[:limit]
    length = len(input_ids)  # New: where the message ends, to read its last real token

    # Pad sequences to the longest sequence
    input_ids += [pad_token_id] * (limit - len(input_ids)) if max_length is not None else []
    input_tensor = torch.tensor(input_ids, device=device).unsqueeze(0)  # add batch dimension

    # Model inference
    with torch.no_grad():
        logits = last_token_logits(model, input_tensor, lengths=torch.tensor([length]))  # New: last real token
    predicted_label = torch.argmax(logits, dim=-1).item()

    # Return the classified result
    return CLASS_NAMES[predicted_label]


def save_classifier(model: GPTModel, path: str | Path, max_length: int | None = None,
                    pad_token_id: int = PAD_TOKEN_ID) -> Path:
    """The weights plus, beside them, the config, the training max_length and the pad id."""
    return save_with_config(model, path, num_classes=model.out_head.out_features, max_length=max_length,
                            pad_token_id=pad_token_id)


def load_classifier(path: str | Path, device="cpu") -> tuple[GPTModel, dict]:
    """Rebuild a classifier saved by `save_classifier`; returns (model in eval mode, metadata)."""
    return load_with_config(path, device, required=REQUIRED_KEYS,
                            build=lambda meta: build_classifier(meta["config"], num_classes=meta["num_classes"]))


if __name__ == "__main__":
    import sys

    from ch06.cli import main

    sys.exit(main())
