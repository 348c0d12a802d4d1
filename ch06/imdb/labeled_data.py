"""Chapter 6 bonus: any labelled text file as train/validation/test splits for the classifiers.

The book's IMDb scripts read three CSV files with the columns `text` and `label` (0/1). The
classifiers here read any labelled text in the same way: CSV, TSV or JSONL files (chosen by the
file's suffix), a text column and a label column named by the caller (`--text-column`,
`--label-column`), labels written as words ("positive", "spam") or as numbers. Either three files
(train, validation, test) or one file that `ch06.gpt_class_finetune.random_split` cuts with a seed.

Everything is checked before any model is built: a missing or unreadable file, a missing column,
an empty text or label, an empty split, a single class in the training data, or a validation/test
label the training data never shows is an `InvalidInput` naming the file and the row (one line from
a command).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ch06.gpt_class_finetune import random_split
from llmfs.cli import path_argument
from llmfs.errors import InvalidInput

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SPLIT_NAMES = ("train", "validation", "test")


def file_format(path: str | Path) -> str:
    """'csv', 'tsv' or 'jsonl', from the file's suffix (InvalidInput for any other)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InvalidInput(f"{path}: unknown file format {suffix or '(no suffix)'!r}; use a .csv, .tsv or "
                           ".jsonl file (one JSON object per line)")
    return FORMATS[suffix]


def _read_jsonl(path: Path) -> pd.DataFrame:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"{path}: line {line_number} is not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise InvalidInput(f"{path}: line {line_number} is not a JSON object (one record per line, "
                                   f"e.g. {{\"text\": ..., \"label\": ...}})")
            records.append({k: v if isinstance(v, str) or v is None else json.dumps(v) for k, v in record.items()})
    return pd.DataFrame.from_records(records)


def read_labeled_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> pd.DataFrame:
    """A CSV/TSV/JSONL file as a DataFrame with the columns `text` and `label` (both str, as written).

    Reads every value as text, so a review that says "NA" stays a review and a label is reported as
    written. Errors name the file and the 1-based data row.
    """
    path = Path(path)
    fmt = file_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if path.stat().st_size == 0:
        raise InvalidInput(f"{path} is empty (0 bytes)")
    try:
        if fmt == "jsonl":
            df = _read_jsonl(path)
        else:
            df = pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path} is not a readable {fmt.upper()} file "
                           f"({str(exc).strip().splitlines()[0]})") from None
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        raise InvalidInput(f"{path}: no column {missing[0]!r} (--{'text' if missing[0] == text_column else 'label'}"
                           f"-column); the file has the columns {list(df.columns)}")
    if len(df) == 0:
        raise InvalidInput(f"{path} holds no rows")
    for i, (text, label) in enumerate(zip(df[text_column], df[label_column])):
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput(f"{path}: row {i + 1}: the text ({text_column!r}) is empty")
        if label is None or not str(label).strip():
            raise InvalidInput(f"{path}: row {i + 1}: the label ({label_column!r}) is empty")
    return pd.DataFrame({"text": list(df[text_column]), "label": [str(v).strip() for v in df[label_column]]})


def class_names(labels) -> list[str]:
    """The distinct labels in a stable order: by value when all are whole numbers (0, 1, 2, ...), else
    alphabetically. A label's class index is its position here."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


@dataclass
class LabeledData:
    """Three splits with the columns `text` (str) and `label` (class index, int), and the class names."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    classes: list[str]
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def splits(self) -> dict[str, pd.DataFrame]:
        return {"train": self.train, "validation": self.validation, "test": self.test}

    def describe(self) -> str:
        sizes = ", ".join(f"{name} {len(df):,}" for name, df in self.splits().items())
        return f"{sizes} rows; {self.num_classes} classes {self.classes}"


def encode_labels(splits: dict[str, pd.DataFrame], sources: dict[str, str]) -> LabeledData:
    """Class indices from the training split's labels; checks every split has rows, the training split
    has two classes or more, and validation/test hold no label the training split lacks."""
    for name in SPLIT_NAMES:
        if len(splits[name]) == 0:
            raise InvalidInput(f"the {name} split is empty ({sources[name]}); give more rows or other split "
                               "fractions")
    classes = class_names(splits["train"]["label"])
    if len(classes) < 2:
        raise InvalidInput(f"the training data ({sources['train']}) has a single class {classes}; a classifier "
                           "needs at least two labels")
    index = {name: i for i, name in enumerate(classes)}
    encoded = {}
    for name in SPLIT_NAMES:
        unknown = sorted(set(splits[name]["label"]) - set(index))
        if unknown:
            raise InvalidInput(f"the {name} split ({sources[name]}) has label(s) {unknown[:5]} that the training "
                               f"data never shows (its classes: {classes})")
        df = splits[name].reset_index(drop=True)
        encoded[name] = pd.DataFrame({"text": df["text"], "label": df["label"].map(index).astype(int)})
    return LabeledData(encoded["train"], encoded["validation"], encoded["test"], classes, dict(sources))


def load_labeled_data(train: str | Path | None = None, validation: str | Path | None = None,
                      test: str | Path | None = None, *, data: str | Path | None = None, text_column: str = "text",
                      label_column: str = "label", seed: int = 123, train_frac: float = 0.7,
                      validation_frac: float = 0.1) -> LabeledData:
    """The three splits: from `train`, `validation` and `test` files, or from one `data` file shuffled with
    `seed` and cut into train_frac / validation_frac / the rest (chapter 6's `random_split`)."""
    if data is not None:
        if any(p is not None for p in (train, validation, test)):
            raise InvalidInput("give either one data file (split with the seed) or the train, validation and "
                               "test files, not both")
        if not (0 < train_frac < 1 and 0 < validation_frac < 1 and train_frac + validation_frac < 1):
            raise InvalidInput(f"the split fractions must be > 0 and leave a test part: train {train_frac} + "
                               f"validation {validation_frac} < 1")
        df = read_labeled_file(data, text_column, label_column)
        parts = random_split(df, train_frac, validation_frac, seed=seed)
        where = f"{data} split with seed {seed}"
        return encode_labels(dict(zip(SPLIT_NAMES, parts)), dict.fromkeys(SPLIT_NAMES, where))
    given = {"train": train, "validation": validation, "test": test}
    absent = [name for name, p in given.items() if p is None]
    if absent:
        raise InvalidInput(f"no {' / '.join(absent)} file: give --train, --validation and --test, or one --data "
                           "file to split")
    for p in given.values():  # every file's format and presence before reading any of them
        file_format(p)
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p} does not exist")
    frames = {name: read_labeled_file(p, text_column, label_column) for name, p in given.items()}
    return encode_labels(frames, {name: str(p) for name, p in given.items()})


# --- The same options in every command --------------------------------------------------------------

def add_data_args(p: argparse.ArgumentParser, default_dir: Path) -> None:
    """--train/--validation/--test or --data, the column names and the split fractions."""
    p.add_argument("--data-dir", type=path_argument, default=default_dir,
                   help=f"folder holding train.csv, validation.csv and test.csv (default {default_dir}: what "
                        "`python -m ch06.imdb.download_prepare_dataset` writes); used when no file is named")
    p.add_argument("--train", type=path_argument, help="training file (.csv, .tsv or .jsonl)")
    p.add_argument("--validation", type=path_argument, help="validation file")
    p.add_argument("--test", type=path_argument, help="test file")
    p.add_argument("--data", type=path_argument, help="one labelled file, split with --seed instead")
    p.add_argument("--text-column", default="text", help="the column holding the text (default text)")
    p.add_argument("--label-column", default="label", help="the column holding the label (default label)")
    p.add_argument("--train-frac", type=float, default=0.7, help="with --data: training share (default 0.7)")
    p.add_argument("--validation-frac", type=float, default=0.1, help="with --data: validation share (default 0.1)")


def data_from_args(args: argparse.Namespace, seed: int = 123) -> LabeledData:
    """The splits the options name; with no file named, the three CSV files in --data-dir."""
    files = (args.train, args.validation, args.test)
    if args.data is None and all(p is None for p in files):
        folder = Path(args.data_dir)
        files = tuple(folder / f"{name}.csv" for name in SPLIT_NAMES)
        if not all(p.is_file() for p in files):
            raise FileNotFoundError(f"{folder} holds no train.csv, validation.csv and test.csv; make the IMDb "
                                    "splits with `python -m ch06.imdb.download_prepare_dataset`, or name your own "
                                    "files with --train/--validation/--test or --data")
    return load_labeled_data(*files, data=args.data, text_column=args.text_column, label_column=args.label_column,
                             seed=seed, train_frac=args.train_frac, validation_frac=args.validation_frac)


# --- A small labelled data set made offline -------------------------------------------------------------

_POSITIVE = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming", "gripping", "excellent"]
_NEGATIVE = ["boring", "awful", "dull", "clumsy", "terrible", "tedious", "painful", "dreadful"]
_NEUTRAL = ["the plot", "the cast", "the music", "the ending", "the director", "the script", "the camera work",
            "the pacing", "the dialogue", "the second half"]
_FRAMES = ["I thought {a} was {w}.", "Honestly, {a} felt {w} to me.", "{A} is {w}, and {b} is {v}.",
           "We watched it last night: {a} was {w}.", "All in all {a} seemed {w}, {b} too."]
_NEGATED_FRAMES = ["I thought {a} was not {w}.", "Honestly, {a} was never {w}.", "{A} is not {w} at all."]


def synthetic_reviews(n: int = 400, seed: int = 123, negated: float = 0.25) -> pd.DataFrame:
    """`n` made-up one-line movie reviews with the labels "positive" / "negative" (half each, shuffled).

    The sentiment is carried by one opinion word per clause, the rest is filler both classes share,
    so a classifier beats chance only by learning those words: a small, offline stand-in for IMDb
    with a planted signal. In a share `negated` of the reviews the opinion is the opposite word,
    negated ("the plot was not boring" is positive): word counts alone cannot read those, a model
    that sees word order can.
    """
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        a, b = rng.sample(_NEUTRAL, 2)
        if rng.random() < negated:
            opposite = _NEGATIVE if label == "positive" else _POSITIVE
            text = rng.choice(_NEGATED_FRAMES).format(a=a, A=a.capitalize(), w=rng.choice(opposite))
        else:
            words = _POSITIVE if label == "positive" else _NEGATIVE
            text = rng.choice(_FRAMES).format(a=a, A=a.capitalize(), b=b, w=rng.choice(words), v=rng.choice(words))
        rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return pd.DataFrame(rows)
