"""Chapter 6, sections 6.2-6.3: the SMS spam data, balanced and split, as a PyTorch dataset.

`download_and_unzip_spam_data` (the book's listing, through the offline-first data helper),
`create_balanced_dataset` and `random_split` (the 70/10/20 split written to CSV files), then
`SpamDataset` (right padding, truncation, validated input) and the three data loaders.
The classifier itself is in `ch06.gpt_class_finetune`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from ch02.atomic import atomic_write
from ch02.download import get_data_file
from ch02.runtime import outputs_dir

SPAM_FILE = "SMSSpamCollection"
LABEL_MAP = {"ham": 0, "spam": 1}          # text label in the raw file -> class index
PAD_TOKEN_ID = 50256                       # GPT-2's <|endoftext|>, used as the padding token
SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_OUTPUT_DIR = outputs_dir("ch06")  # outputs/ch06 in the checkout (see ch02.runtime.outputs_dir)


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
