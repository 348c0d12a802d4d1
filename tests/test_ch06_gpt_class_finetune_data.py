"""Tests for the data part of ch06/gpt_class_finetune.py (sections 6.2-6.3): the spam data (counts, balancing, splits, CSV checks), SpamDataset
padding/truncation and the loaders; the data comes from the shared mirror."""

import pandas as pd
import pytest
import torch

from ch06.gpt_class_finetune import (
    PAD_TOKEN_ID,
    SpamDataset,
    create_balanced_dataset,
    create_spam_loaders,
    download_and_unzip_spam_data,
    load_spam_data,
    prepare_spam_splits,
    random_split,
    read_labeled_csv,
    sequence_lengths,
)
from llmfs.errors import InvalidInput

TEXTS = ["Hi, are we still meeting for lunch today?",
         "WINNER!! You have been selected to receive a $900 prize. Call 09061701461 now",
         "ok",
         "Sorry, I'll call later"]


def write_csv(path, rows, columns=("Label", "Text")):
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def test_raw_counts_and_balancing():
    df = load_spam_data()
    assert df["Label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}
    balanced = create_balanced_dataset(df)
    assert balanced["Label"].value_counts().to_dict() == {"ham": 747, "spam": 747}
    # every spam row is kept; the ham sample is seeded, so it is the same every time
    assert set(balanced.index[balanced["Label"] == "spam"]) == set(df.index[df["Label"] == "spam"])
    assert balanced.index.equals(create_balanced_dataset(df).index)
    assert not balanced.index.equals(create_balanced_dataset(df, seed=1).index)


def test_split_sizes_and_files(splits, tmp_path):
    parts = random_split(pd.DataFrame({"x": range(1494)}), 0.7, 0.1)
    assert [len(p) for p in parts] == [1045, 149, 300]
    frames = {name: pd.read_csv(path) for name, path in splits.items()}
    assert {name: len(f) for name, f in frames.items()} == {"train": 1045, "validation": 149, "test": 300}
    for f in frames.values():
        assert list(f.columns) == ["Label", "Text"]
        assert set(f["Label"]) == {0, 1}
    assert sum((f["Label"] == 1).sum() for f in frames.values()) == 747
    # re-running writes identical files, with no temporary files left behind
    again = prepare_spam_splits(tmp_path)
    for name in splits:
        assert again[name].read_bytes() == splits[name].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.csv", "train.csv", "validation.csv"]


def test_random_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="train_frac"):
        random_split(pd.DataFrame({"x": range(10)}), 0.9, 0.2)


def test_dataset_pads_to_longest_and_truncates(tmp_path, tokenizer):
    path = write_csv(tmp_path / "d.csv", [(0, t) for t in TEXTS[:2]] + [(1, t) for t in TEXTS[2:]])
    lengths = [len(tokenizer.encode(t)) for t in TEXTS]
    ds = SpamDataset(path, tokenizer)
    assert ds.max_length == max(lengths) and ds.lengths == lengths and len(ds) == 4
    for i, text in enumerate(TEXTS):
        ids, label = ds[i]
        assert ids.dtype == torch.long and ids.shape == (max(lengths),)
        assert ids[:lengths[i]].tolist() == tokenizer.encode(text)
        assert (ids[lengths[i]:] == PAD_TOKEN_ID).all()
        assert int(label) == (0 if i < 2 else 1)
    short = SpamDataset(path, tokenizer, max_length=5)
    assert short.max_length == 5 and short.lengths == [min(n, 5) for n in lengths]
    assert short[1][0].tolist() == tokenizer.encode(TEXTS[1])[:5]  # truncation keeps the first tokens
    longer = SpamDataset(path, tokenizer, max_length=40)             # e.g. a validation set at the training length
    assert longer[0][0].shape == (40,) and longer.lengths == lengths
    assert sequence_lengths(torch.stack([longer[i][0] for i in range(4)])).tolist() == lengths


def test_dataset_never_turns_text_into_the_pad_id(tmp_path, tokenizer):
    path = write_csv(tmp_path / "d.csv", [(1, "free entry <|endoftext|>")])
    ds = SpamDataset(path, tokenizer)
    assert PAD_TOKEN_ID not in ds[0][0][:ds.lengths[0]].tolist()
    with pytest.raises(ValueError, match="pad token id"):
        SpamDataset(path, tokenizer, pad_token_id=tokenizer.encode("free")[0])


def test_csv_errors_name_file_and_row(tmp_path, tokenizer):
    missing = write_csv(tmp_path / "missing.csv", [(0, "hi")], columns=("Class", "Text"))
    with pytest.raises(InvalidInput, match=r"missing\.csv.*missing column.*'Label'"):
        SpamDataset(missing, tokenizer)
    bad_label = write_csv(tmp_path / "bad_label.csv", [(0, "hi"), ("spam", "win"), (1, "prize")])
    with pytest.raises(InvalidInput, match=r"bad_label\.csv: row 2 \(line 3\): label 'spam' is not 0 or 1"):
        SpamDataset(bad_label, tokenizer)
    other_label = write_csv(tmp_path / "other.csv", [(0, "hi"), (1, "x"), (2, "y")])
    with pytest.raises(InvalidInput, match=r"other\.csv: row 3 .*label '2'"):
        SpamDataset(other_label, tokenizer)
    empty = write_csv(tmp_path / "empty.csv", [(0, "hi"), (1, "  ")])
    with pytest.raises(InvalidInput, match=r"empty\.csv: row 2 .*empty"):
        SpamDataset(empty, tokenizer)
    with pytest.raises(ValueError, match="max_length"):  # the calling code's mistake: a plain ValueError
        SpamDataset(bad_label, tokenizer, max_length=0)
    (tmp_path / "latin1.csv").write_bytes(b"Label,Text\n0,caf\xe9\n")
    with pytest.raises(InvalidInput, match=r"latin1\.csv is not a readable CSV file"):
        read_labeled_csv(tmp_path / "latin1.csv")
    (tmp_path / "nothing.csv").write_bytes(b"")
    with pytest.raises(InvalidInput, match=r"nothing\.csv is not a readable CSV file"):
        read_labeled_csv(tmp_path / "nothing.csv")


def test_loaders_use_the_training_length(splits, tokenizer):
    train_loader, val_loader, test_loader = create_spam_loaders(splits, tokenizer, batch_size=8)
    length = train_loader.dataset.max_length
    assert val_loader.dataset.max_length == test_loader.dataset.max_length == length
    assert len(train_loader) == 1045 // 8 and len(test_loader) == 38
    inputs, targets = next(iter(test_loader))
    assert inputs.shape == (8, length) and targets.shape == (8,)


def test_download_and_unzip_spam_data_as_in_the_book(tmp_path, capsys):
    """The book's call (listing 6.1) puts a verified copy at data_file_path; the mirror serves it offline."""
    from llmfs.download import DATA_FILES, get_data_file

    url = DATA_FILES["SMSSpamCollection"].url
    extracted_path = tmp_path / "sms_spam_collection"
    data_file_path = extracted_path / "SMSSpamCollection.tsv"
    download_and_unzip_spam_data(url, tmp_path / "sms_spam_collection.zip", extracted_path, data_file_path)
    assert data_file_path.read_bytes() == get_data_file("SMSSpamCollection", download=False).read_bytes()
    assert capsys.readouterr().out == f"File downloaded and saved as {data_file_path}\n"
    df = pd.read_csv(data_file_path, sep="\t", header=None, names=["Label", "Text"])
    assert df["Label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}

    data_file_path.write_text("kept\n")  # an existing file is never replaced
    download_and_unzip_spam_data(url, tmp_path / "x.zip", str(extracted_path), str(data_file_path))
    assert data_file_path.read_text() == "kept\n"
    assert capsys.readouterr().out == f"{data_file_path} already exists. Skipping download and extraction.\n"


