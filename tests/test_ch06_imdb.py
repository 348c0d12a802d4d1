"""Chapter 6 bonus (ch06/imdb): labelled text files, the three classifiers, the table, the IMDb archive.

Everything offline: the encoders are tiny random models written to tmp folders with their own
tokenizers, the GPT model is a tiny random GPTModel, the IMDb archive is a small fake with the real
layout, and the offline message is produced with the network check answering "unreachable".
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from ch06.imdb import compare, download_prepare_dataset, labeled_data, report, train_bert_hf, train_gpt
from ch06.imdb import train_sklearn_logreg as logreg
from ch06.imdb.labeled_data import load_labeled_data, read_labeled_file, synthetic_reviews

REPO = Path(__file__).resolve().parents[1]
try:
    import sklearn  # noqa: F401
except ImportError:
    sklearn = None
needs_sklearn = pytest.mark.skipif(sklearn is None, reason="scikit-learn is not installed (pip install scikit-learn)")
NOTEBOOK = REPO / "ch06" / "imdb" / "imdb-classification.ipynb"
TINY_GPT = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 1,
            "drop_rate": 0.0, "qkv_bias": False}
FAST = {"num_epochs": 3, "eval_freq": 1000, "eval_iter": 2, "num_threads": 1}
GPT_FAST = {**FAST, "num_epochs": 4, "learning_rate": 3e-3, "context_length": 32}


def write_all_formats(df: pd.DataFrame, folder: Path, stem: str = "reviews", text: str = "review",
                      label: str = "stars") -> dict[str, Path]:
    renamed = df.rename(columns={"text": text, "label": label})
    paths = {"csv": folder / f"{stem}.csv", "tsv": folder / f"{stem}.tsv", "jsonl": folder / f"{stem}.jsonl"}
    renamed.to_csv(paths["csv"], index=False)
    renamed.to_csv(paths["tsv"], sep="\t", index=False)
    renamed.to_json(paths["jsonl"], orient="records", lines=True)
    return paths


@pytest.fixture(scope="module")
def easy(tmp_path_factory) -> labeled_data.LabeledData:
    """A planted signal (opinion words), no negations: every classifier should learn it."""
    path = tmp_path_factory.mktemp("easy") / "easy.jsonl"
    synthetic_reviews(240, seed=1, negated=0.0).to_json(path, orient="records", lines=True)
    return load_labeled_data(data=path, seed=123)


# --- Reading labelled files --------------------------------------------------------------------------

def test_csv_tsv_and_jsonl_read_the_same_rows_with_string_labels(tmp_path):
    df = synthetic_reviews(30, seed=3)
    df.loc[0, "text"] = 'A "quoted", comma-laden review\twith a tab'
    df.loc[1, "text"] = "NA"  # stays a review, not a missing value
    paths = write_all_formats(df, tmp_path)
    frames = [read_labeled_file(p, "review", "stars") for p in paths.values()]
    for frame in frames:
        assert frame["text"].tolist() == df["text"].tolist()
        assert frame["label"].tolist() == df["label"].tolist()
    data = load_labeled_data(paths["csv"], paths["tsv"], paths["jsonl"], text_column="review", label_column="stars")
    assert data.classes == ["negative", "positive"]
    assert data.train["label"].tolist() == [data.classes.index(v) for v in df["label"]]


def test_number_labels_sort_by_value_and_json_numbers_read(tmp_path):
    rows = [{"text": f"t{i}", "label": [10, 2, 1][i % 3]} for i in range(30)]
    path = tmp_path / "n.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_labeled_data(data=path)
    assert data.classes == ["1", "2", "10"] and data.num_classes == 3
    df = pd.concat([data.train, data.validation, data.test])
    assert sorted(df["label"].unique().tolist()) == [0, 1, 2]


def test_split_is_deterministic_and_follows_the_fractions(tmp_path):
    path = write_all_formats(synthetic_reviews(100, seed=5), tmp_path, text="text", label="label")["csv"]
    a, b = load_labeled_data(data=path, seed=7), load_labeled_data(data=path, seed=7)
    c = load_labeled_data(data=path, seed=8)
    for name in ("train", "validation", "test"):
        pd.testing.assert_frame_equal(a.splits()[name], b.splits()[name])
    assert (len(a.train), len(a.validation), len(a.test)) == (70, 10, 20)
    assert a.train["text"].tolist() != c.train["text"].tolist()
    together = pd.concat([a.train, a.validation, a.test])["text"]
    assert sorted(together) == sorted(pd.read_csv(path)["text"])  # every row once


@pytest.mark.parametrize("case, expected", [
    ("suffix", r"unknown file format '\.txt'"),
    ("column", r"no column 'review' \(--text-column\); the file has the columns \['text', 'label'\]"),
    ("single", r"has a single class \['positive'\]"),
    ("empty_split", r"the validation split is empty"),
    ("bad_jsonl", r"line 2 is not JSON"),
    ("missing", r"does not exist"),
    ("empty_text", r"row 2: the text \('text'\) is empty"),
    ("unseen", r"label\(s\) \['neutral'\] that the training data never shows"),
    ("no_files", r"holds no train\.csv, validation\.csv and test\.csv"),
    ("empty_file", r"is empty \(0 bytes\)"),
])
@pytest.mark.parametrize("command", [train_gpt, train_bert_hf, pytest.param(logreg, marks=needs_sklearn),
                                     pytest.param(compare, marks=needs_sklearn)])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, case, expected, command):
    ok = synthetic_reviews(20, seed=2)
    args = []
    if case == "suffix":
        (tmp_path / "d.txt").write_text("text,label\na,b\n")
        args = ["--data", str(tmp_path / "d.txt")]
    elif case == "column":
        ok.to_csv(tmp_path / "d.csv", index=False)
        args = ["--data", str(tmp_path / "d.csv"), "--text-column", "review"]
    elif case == "single":
        ok.assign(label="positive").to_csv(tmp_path / "d.csv", index=False)
        args = ["--data", str(tmp_path / "d.csv")]
    elif case == "empty_split":
        ok.head(5).to_csv(tmp_path / "d.csv", index=False)
        args = ["--data", str(tmp_path / "d.csv")]
    elif case == "bad_jsonl":
        (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": \n')
        args = ["--data", str(tmp_path / "d.jsonl")]
    elif case == "missing":
        args = ["--data", str(tmp_path / "absent.csv")]
    elif case == "empty_text":
        ok.assign(text=["fine", " "] + ok["text"].tolist()[2:]).to_csv(tmp_path / "d.csv", index=False)
        args = ["--data", str(tmp_path / "d.csv")]
    elif case == "unseen":
        for name in ("train", "validation", "test"):
            (ok.assign(label="neutral") if name == "test" else ok).to_csv(tmp_path / f"{name}.csv", index=False)
        args = [arg for name in ("train", "validation", "test") for arg in (f"--{name}", str(tmp_path / f"{name}.csv"))]
    elif case == "no_files":
        args = ["--data-dir", str(tmp_path)]
    elif case == "empty_file":
        (tmp_path / "d.jsonl").write_text("")
        args = ["--data", str(tmp_path / "d.jsonl")]
    if command is train_bert_hf:
        args += ["--model", str(tmp_path / "no-model")]
    called = []
    monkeypatch.setattr(train_gpt, "instantiate_model", lambda *a, **k: called.append(1))
    monkeypatch.setattr(train_bert_hf, "load_encoder", lambda *a, **k: called.append(1))
    assert command.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err[-1:]) == 1 and err[-1].startswith("error: ") and re.search(expected, err[-1]), err
    assert not any("Traceback" in line for line in err) and not called


def test_without_scikit_learn_the_baseline_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    path = tmp_path / "d.csv"
    synthetic_reviews(40).to_csv(path, index=False)
    monkeypatch.setitem(__import__("sys").modules, "sklearn", None)  # `import sklearn` raises ImportError
    for command in (logreg, compare):
        assert command.main(["--data", str(path)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "error: the logistic-regression baseline needs scikit-learn: pip install scikit-learn")


@needs_sklearn
def test_options_that_conflict_or_are_out_of_range(tmp_path, capsys):
    path = tmp_path / "d.csv"
    synthetic_reviews(40).to_csv(path, index=False)
    assert logreg.main(["--data", str(path), "--train", str(path)]) == 2
    assert "either one data file" in capsys.readouterr().err
    assert logreg.main(["--data", str(path), "--train-frac", "0.95"]) == 2
    assert "leave a test part" in capsys.readouterr().err
    assert train_bert_hf.main(["--data", str(path), "--model", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: no model folder at")
    with pytest.raises(SystemExit) as exit_info:
        train_gpt.main(["--quick", "--data", str(path), "--context-length", "abc"])
    assert exit_info.value.code == 2
    assert "longest_training_example or model_context_length; got abc" in capsys.readouterr().err
    assert train_gpt.main(["--quick", "--data", str(path), "--context-length", "500"]) == 2
    assert "--context-length 500 exceeds the model's context length 128" in capsys.readouterr().err


# --- The classifiers --------------------------------------------------------------------------------------

def test_gpt_learns_a_planted_signal(easy):
    row = train_gpt.train_gpt(easy, GPT_FAST, mode="quick", cfg=TINY_GPT,
                              device="cpu")
    assert row["test_acc"] > 0.75 and row["train_acc"] > 0.75, row
    model = row["classifier"]
    assert model.out_head.out_features == 2 and row["max_length"] <= 32
    assert row["parameters"] == sum(p.numel() for p in model.parameters()) == row["trainable"]
    assert row["train_seconds"] > 0 and (row["peak_mib"] is None or row["peak_mib"] > 0)


def test_gpt_dataset_pads_on_the_right_and_never_uses_the_pad_id_for_text():
    from ch02.tokenizer import get_gpt2_tokenizer

    df = pd.DataFrame({"text": ["short", "a somewhat longer text <|endoftext|> here"], "label": [0, 1]})
    ds = train_gpt.IMDBDataset(df, get_gpt2_tokenizer())
    ids, label = ds[0]
    assert ids.shape == (ds.max_length,) and int(label) == 0
    assert (ids[1:] == train_gpt.PAD_TOKEN_ID).all() and train_gpt.PAD_TOKEN_ID not in ds[1][0].tolist()


@pytest.mark.parametrize("family", ["bert", "roberta", "modernbert"])
def test_encoder_from_a_local_folder_learns_a_planted_signal(tmp_path, easy, family):
    folder = train_bert_hf.write_tiny_encoder(tmp_path / family, family, list(easy.train["text"]))
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    row = train_bert_hf.train_bert_hf(easy, folder, {**FAST, "num_epochs": 8}, quick=True, device="cpu")
    assert row["test_acc"] > 0.75 and row["train_acc"] > 0.75, row
    assert row["classifier"].config.model_type == family
    assert row["model"].startswith(family)


@pytest.mark.parametrize("family", ["bert", "distilbert", "modernbert"])
def test_trainable_choices_grow_head_last_block_all(tmp_path, easy, family):
    folder = train_bert_hf.write_tiny_encoder(tmp_path / family, family, list(easy.train["text"]))
    counts = {}
    for choice in ("head", "last_block", "all"):
        model, _ = train_bert_hf.load_encoder(folder, num_classes=3)
        train_bert_hf.set_trainable(model, choice)
        counts[choice] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert model.classifier.out_features == 3  # the folder's 2-class head replaced
    assert 0 < counts["head"] < counts["last_block"] < counts["all"]
    layer = train_bert_hf.encoder_layers(model)[-1]
    assert counts["last_block"] - counts["head"] >= sum(p.numel() for p in layer.parameters())


def test_attention_mask_hides_exactly_the_padding(tmp_path, easy):
    folder = train_bert_hf.write_tiny_encoder(tmp_path / "bert", "bert", list(easy.train["text"]))
    _, tokenizer = train_bert_hf.load_encoder(folder, 2)
    df = pd.DataFrame({"text": ["the plot", "the plot was wonderful and the cast superb"], "label": [0, 1]})
    ds = train_bert_hf.IMDBDataset(df, tokenizer, max_length=16, pad_token_id=tokenizer.pad_token_id,
                                   use_attention_mask=True)
    ids, mask, _ = ds[0]
    n = len(tokenizer.encode("the plot"))
    assert mask.tolist() == [1] * n + [0] * (16 - n)
    assert ids[:n].tolist() == tokenizer.encode("the plot") and (ids[n:] == tokenizer.pad_token_id).all()


@needs_sklearn
@pytest.mark.parametrize("vectorizer", ["count", "tfidf"])
def test_logistic_regression_baseline(easy, vectorizer, capsys):
    row = logreg.train_sklearn_logreg(easy, vectorizer)
    assert row["test_acc"] > 0.9 and row["val_acc"] > 0.9, row
    out = capsys.readouterr().out
    assert "Dummy classifier:" in out and "Logistic regression classifier:" in out
    assert row["features"] > 10 and row["parameters"] == row["features"] + 1  # binary: one weight per word + bias


@needs_sklearn
def test_word_counts_cannot_read_negations():
    """The planted trap: in a negated review the opinion word belongs to the other class, so a model of
    word counts trained on plain reviews gets negated ones wrong."""
    plain, negated = synthetic_reviews(300, seed=4, negated=0.0), synthetic_reviews(100, seed=5, negated=1.0)
    assert negated["text"].str.contains(r"\bnot\b|\bnever\b").all()
    assert not plain["text"].str.contains(r"\bnot\b|\bnever\b").any()
    data = labeled_data.encode_labels({"train": plain[:250], "validation": plain[250:], "test": negated},
                                      dict.fromkeys(("train", "validation", "test"), "synthetic"))
    row = logreg.train_sklearn_logreg(data, "count", dummy=False)
    assert row["val_acc"] > 0.9 and row["test_acc"] < 0.2, row  # right on plain reviews, wrong on negated ones


@needs_sklearn
def test_table_and_compare(easy):
    rows = compare.compare(easy, quick=True, gpt_cfg=TINY_GPT, gpt_settings=GPT_FAST,
                           encoder_settings={**FAST, "num_epochs": 4}, kinds=("gpt", "encoder", "logreg"),
                           device="cpu")
    assert [r["kind"] for r in rows] == ["decoder (our GPTModel)", "encoder (transformers)", "bag of words"]
    text = report.table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    for r, line in zip(rows, lines[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == r["model"]
        assert cells[3:6] == [f"{r[k] * 100:.2f}%" for k in ("train_acc", "val_acc", "test_acc")]
    assert all(r["test_acc"] > 0.6 for r in rows)


def test_track_resources_sees_a_large_allocation():
    """In a fresh process: in this one, memory that earlier tests freed may be reused without the
    resident size (and its peak) growing."""
    code = """
import json, torch
from ch06.imdb import report
with report.track_resources() as small:
    pass
with report.track_resources() as big:
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
print(json.dumps([small["peak_mib"], big["peak_mib"]]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    small, big = json.loads(out.stdout.strip().splitlines()[-1])
    if small is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert big - small > 40


# --- The IMDb archive ------------------------------------------------------------------------------------

def fake_imdb_archive(path: Path, per_folder: int = 6) -> Path:
    """A .tar.gz with aclImdb's layout: train|test/pos|neg/<id>_<rating>.txt, plus unsup and README."""
    def add(tar, name, text):
        data = text.encode("utf-8")
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w:gz") as tar:
        add(tar, "aclImdb/README", "Large Movie Review Dataset v1.0")
        for subset in ("train", "test"):
            for label in ("pos", "neg"):
                for i in range(per_folder):
                    add(tar, f"aclImdb/{subset}/{label}/{i}_{7 if label == 'pos' else 2}.txt",
                        f"{subset} {label} review {i}, with a comma and \"quotes\"")
        add(tar, "aclImdb/train/unsup/0_0.txt", "unlabelled")
        add(tar, "aclImdb/train/labeledBow.feat", "0:1")
    return path


@pytest.fixture
def fake_archive(tmp_path, monkeypatch):
    from llmfs import download

    path = fake_imdb_archive(tmp_path / "aclImdb_v1.tar.gz")
    spec = download.DATA_FILES["aclImdb_v1.tar.gz"]
    monkeypatch.setitem(download.DATA_FILES, spec.name, replace(spec, sha256=download.sha256sum(path)))
    return path


def check_csv_splits(folder: Path, sizes=(12, 4)) -> pd.DataFrame:
    frames = {n: pd.read_csv(folder / f"{n}.csv") for n in ("train", "validation", "test")}
    assert [len(frames["train"]), len(frames["validation"])] == list(sizes) and len(frames["test"]) == 24 - sum(sizes)
    df = pd.concat(frames.values())
    assert list(df.columns) == ["text", "label"] and len(df) == 24
    assert all(int(label) == (1 if " pos " in text else 0) for text, label in zip(df["text"], df["label"]))
    assert not df["text"].str.contains("unlabelled").any()
    return df


def test_archive_to_csv_splits_from_the_mirror(tmp_path, fake_archive, monkeypatch, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    fake_archive.rename(mirror / fake_archive.name)
    monkeypatch.setenv("LLMFS_DATA_MIRROR", str(mirror))
    out = tmp_path / "out"
    assert download_prepare_dataset.main(["--output-dir", str(out), "--sizes", "12,4,8"]) == 0
    first = check_csv_splits(out)
    assert not (out / "aclImdb").exists()  # the extracted reviews are not kept
    # Deterministic, and the files are not overwritten without --overwrite.
    assert download_prepare_dataset.main(["--output-dir", str(out), "--sizes", "12,4,8"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert download_prepare_dataset.main(["--output-dir", str(out), "--sizes", "12,4,8", "--overwrite"]) == 0
    pd.testing.assert_frame_equal(first, check_csv_splits(out))
    # The splits are what the classifiers read by default.
    data = load_labeled_data(*(out / f"{n}.csv" for n in ("train", "validation", "test")))
    assert data.classes == ["0", "1"]


def test_archive_given_on_the_command_line_is_checked(tmp_path, fake_archive, capsys):
    out = tmp_path / "out"
    paths = download_prepare_dataset.prepare_imdb(out, fake_archive, sizes=(12, 4, 8), keep_extracted=True)
    assert set(paths) == {"train", "validation", "test"}
    check_csv_splits(out)
    assert sorted(p.name for p in (out / "aclImdb").iterdir()) == ["test", "train"]
    assert not (out / "aclImdb" / "train" / "unsup").exists()
    other = tmp_path / "other.tar.gz"
    other.write_bytes(b"not the archive")
    assert download_prepare_dataset.main(["--archive", str(other), "--output-dir", str(tmp_path / "o2")]) == 2
    assert re.match(r"error: --archive .* is not aclImdb_v1\.tar\.gz from https://ai\.stanford\.edu/",
                    capsys.readouterr().err.strip().splitlines()[-1])
    assert not (tmp_path / "o2").exists()  # checked before the output folder is made


def test_offline_message_says_where_to_put_the_archive(tmp_path, monkeypatch, capsys):
    from llmfs import download

    monkeypatch.setenv("LLMFS_DATA_MIRROR", str(tmp_path / "empty-mirror"))
    (tmp_path / "empty-mirror").mkdir()
    monkeypatch.setenv("LLMFS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(download, "reachable", lambda *a, **k: False)  # never the network
    assert download_prepare_dataset.main(["--output-dir", str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert f"put a copy at {tmp_path / 'cache' / 'aclImdb_v1.tar.gz'}" in err[0]
    assert "LLMFS_DATA_MIRROR" in err[0] and "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz" in err[0]


def test_the_recorded_archive_is_the_one_tensorflow_datasets_records():
    from llmfs.download import DATA_FILES

    spec = DATA_FILES["aclImdb_v1.tar.gz"]
    assert spec.url == "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
    assert spec.sha256 == "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
    assert spec.archive_member is None  # the whole archive is verified, then the reviews are extracted


# --- The notebook's stored outputs -------------------------------------------------------------------------

@needs_sklearn
def test_notebook_stored_table_matches_a_recomputed_baseline():
    """The baseline row (deterministic) of the stored quick-mode table is what the module computes now."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    outputs = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                      for o in c.get("outputs", []))
    settings = json.loads(re.search(r"quick data: (\{.*\})", outputs).group(1))
    df = synthetic_reviews(settings["n"], seed=settings["seed"], negated=settings["negated"])
    data = labeled_data.encode_labels(dict(zip(("train", "validation", "test"), labeled_data.random_split(
        df, 0.7, 0.1, seed=settings["seed"]))), dict.fromkeys(("train", "validation", "test"), "synthetic"))
    row = logreg.train_sklearn_logreg(data, settings["vectorizer"], dummy=False)
    line = next(line for line in outputs.splitlines() if line.startswith(f"| {row['model']} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:6] == [f"{row[k] * 100:.2f}%" for k in ("train_acc", "val_acc", "test_acc")]
    # Section 7: the baseline on the plain and the negated test reviews.
    negated = data.test["text"].str.contains(r"\b(?:not|never)\b")
    accuracy = {name: float((row["classifier"].predict(part["text"]) == part["label"].to_numpy()).mean())
                for name, part in (("plain", data.test[~negated]), ("negated", data.test[negated]))}
    assert (f"{row['model']}: plain {accuracy['plain'] * 100:.2f}%, negated {accuracy['negated'] * 100:.2f}%"
            in outputs.splitlines())
    assert accuracy["negated"] < 0.2 < 0.9 < accuracy["plain"]  # what the notebook's prose says
