"""ch05/gutenberg/prepare_dataset.py: a folder of books in, exact uint16 shards out.

A small corpus with every kind of file the preparation meets (UTF-8 with and without a byte-order mark,
cp1252 and latin-1, a Project Gutenberg book with its header and footer and Windows line ends, nested
folders, binary files with and without NUL bytes, empty and whitespace-only files, a hidden file) is
prepared and the shards decoded: they must be the expected documents, each followed by <|endoftext|>,
computed here without the streaming code. Then: the same bytes for 1 and 2 workers, after an
interruption (an exception, and a SIGKILL) and a rerun; memory that does not grow with the corpus; one-line
errors before any work.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ch02.tokenizer import get_gpt2_tokenizer
from ch05.gutenberg import prepare_dataset as pd
from llmfs.download import get_data_file

REPO = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"

PLAIN = "It was a dark and stormy night;   \nthe rain fell in torrents.\n\n\n  \nExcept at occasional intervals.\n\n"
GUTENBERG_BODY = ("CHAPTER I.\n\nCall me Ishmael. Some years ago--never mind how long precisely--having little\n"
                  "or no money in my purse, and nothing particular to interest me on shore,\n \n\n"
                  "I thought I would sail about a little and see the watery part of the world.\n")
GUTENBERG = ("The Project Gutenberg eBook of Moby Dick; Or, The Whale\n\nThis eBook is for the use of anyone anywhere.\n"
             "Title: Moby Dick\n\n*** START OF THE PROJECT GUTENBERG EBOOK MOBY DICK; OR, THE WHALE ***\n\n\n"
             + GUTENBERG_BODY + "\n\n*** END OF THE PROJECT GUTENBERG EBOOK MOBY DICK; OR, THE WHALE ***\n"
             "Updated editions will replace the previous one.\n")
CP1252 = ("“Café” – the naïve façade, déjà vu… Señor Müller’s résumé was très élégant; the “œuvre” cost 5 €.\n"
          "Die Straße war naß, und Jürgen aß Brötchen.\n") * 3
LATIN1 = "Café naïve façade, déjà vu. Señor Müller was très élégant and the garçon said « oui ».\n" * 3


def normalized(text: str) -> str:
    """The expected document, computed the plain way: whole text, universal newlines, markers, the book's
    blank-line regex, strip."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("*** START OF THE PROJECT")), None)
    if start is not None:
        lines = lines[start + 1:]
    end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF THE PROJECT")), None)
    if end is not None:
        lines = lines[:end]
    return re.sub(r"\n\s*\n", "\n\n", "\n".join(lines)).strip()


def make_corpus(root: Path) -> list[str]:
    """Write the corpus; return the expected documents in the order of their sorted relative paths."""
    rng = random.Random(1)
    files = {
        "a_plain.txt": PLAIN.encode("utf-8"),
        "b_bom.txt": ("\ufeff" + "With a byte-order mark.\nÜber alles.\n").encode("utf-8"),
        "c_utf16.txt": "Windows’ “Unicode” text: UTF-16 with a byte-order mark.\r\n".encode("utf-16"),
        "books/1/pg2701.txt": GUTENBERG.replace("\n", "\r\n").encode("utf-8"),
        "books/2/only_header.txt": ("*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n  \n"
                                    "*** END OF THE PROJECT GUTENBERG EBOOK X ***\n").encode("utf-8"),
        "latin/cp1252.txt": CP1252.encode("cp1252"),
        "latin/latin1.txt": LATIN1.encode("latin-1"),
        "z/empty.txt": b"",
        "z/blank.txt": b"  \n\n\t\n",
        "z/image.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
        "z/noise.dat": bytes(rng.randrange(1, 256) for _ in range(4000)),
        ".hidden.txt": b"not listed",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    texts = {"a_plain.txt": PLAIN, "b_bom.txt": "With a byte-order mark.\nÜber alles.\n",
             "c_utf16.txt": "Windows’ “Unicode” text: UTF-16 with a byte-order mark.\n",
        "books/1/pg2701.txt": GUTENBERG, "latin/cp1252.txt": CP1252, "latin/latin1.txt": LATIN1}
    return [normalized(texts[name]) for name in sorted(texts)]


def all_ids(out: Path, split: str | None = None) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    arrays = [np.fromfile(out / s["file"], dtype="<u2") for s in manifest["shards"]
              if split is None or s["split"] == split]
    return np.concatenate(arrays)


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    return root, make_corpus(root)


def test_strip_headers_and_markers():
    body = ["a\n", "b\n"]
    assert list(pd.strip_headers(["head\n", "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n", *body,
                                  "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\n", "license\n"])) == body
    assert list(pd.strip_headers(body)) == body  # no markers: unchanged
    assert list(pd.strip_headers([*body, "End of the Project Gutenberg EBook of X\n", "tail\n"])) == body
    assert list(pd.strip_headers(["*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*\n", *body])) == body
    # A start marker after the first HEADER_LINES lines is text, as in the gutenberg package.
    late = ["x\n"] * pd.HEADER_LINES + ["*** START OF THE PROJECT GUTENBERG EBOOK X ***\n", "y\n"]
    assert list(pd.strip_headers(late)) == late


def test_chunks_are_the_normalized_text_and_tokenize_as_the_whole():
    enc = get_gpt2_tokenizer()
    rng = random.Random(123)
    words = "the whale sea Ishmael , . ; -- 's don't 42 ü é".split()
    lines = []
    for _ in range(400):
        line = " ".join(rng.choice(words) for _ in range(rng.randrange(0, 12)))
        lines.append(rng.choice(["", " ", "  ", "\t"]) + line + rng.choice(["", " ", "   "]) + "\n")
    text = "".join(lines)
    expected = re.sub(r"\n\s*\n", "\n\n", text).strip()
    pieces = list(pd.document_chunks(lines, chunk_chars=200))
    assert len(pieces) > 5 and "".join(pieces) == expected
    assert [t for p in pieces for t in enc.encode_ordinary(p)] == enc.encode_ordinary(expected)


def test_encoding_detection_and_skips(corpus):
    root, _ = corpus
    assert pd.detect_encoding(root / "a_plain.txt") == ("utf-8-sig", "utf-8")
    assert pd.detect_encoding(root / "latin/cp1252.txt") == ("cp1252", "cp1252 (charset_normalizer)")
    assert pd.detect_encoding(root / "latin/latin1.txt")[0] in ("cp1252", "latin_1")
    assert pd.detect_encoding(root / "z/empty.txt") == (None, "empty")
    assert pd.detect_encoding(root / "z/blank.txt") == (None, "empty")
    assert pd.detect_encoding(root / "z/image.png") == (None, "binary")
    assert pd.detect_encoding(root / "z/noise.dat") == (None, "binary")  # no NUL byte, but not text


def test_prepare_is_exact(corpus, tmp_path):
    root, docs = corpus
    manifest = pd.prepare(root, tmp_path / "out", workers=1, shard_tokens=40, val_fraction=0.0, progress=False)
    enc = get_gpt2_tokenizer()
    ids = all_ids(tmp_path / "out")
    assert enc.decode(ids.tolist()) == EOT.join(docs) + EOT
    assert ids.tolist() == [t for d in docs for t in enc.encode_ordinary(d) + [pd.EOT_ID]]
    assert manifest["documents"] == len(docs) == 6
    assert manifest["skipped"] == {"empty": 3, "binary": 2}
    assert manifest["tokens"] == {"train": len(ids), "val": 0}
    assert len(manifest["shards"]) > 2 and all(s["tokens"] >= 40 for s in manifest["shards"][:-1])
    assert sum(s["documents"] for s in manifest["shards"]) == 6
    by_path = {r["path"]: r for r in manifest["files"]}
    assert ".hidden.txt" not in by_path and len(by_path) == 11
    assert by_path["c_utf16.txt"]["encoding"] == "utf-16 (byte-order mark)"
    assert by_path["books/2/only_header.txt"]["reason"] == "empty"
    assert by_path["latin/cp1252.txt"]["encoding"] == "cp1252 (charset_normalizer)"
    assert not (tmp_path / "out" / "progress.json").exists()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    # The reader: memory maps of exactly these ids.
    shards = pd.ShardSet(tmp_path / "out")
    assert np.concatenate(shards.memmaps("train")).tolist() == ids.tolist()
    assert shards.num_tokens("train") == len(ids) and shards.memmaps("val") == []
    assert all(isinstance(m, np.memmap) for m in pd.open_shards(tmp_path / "out" / "manifest.json"))


def test_val_split_by_path_and_workers_give_the_same_bytes(corpus, tmp_path):
    root, docs = corpus
    one = pd.prepare(root, tmp_path / "one", workers=1, shard_tokens=30, val_fraction=0.5, progress=False)
    two = pd.prepare(root, tmp_path / "two", workers=2, shard_tokens=30, val_fraction=0.5, progress=False)
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")
    assert one == two
    paths = sorted(r["path"] for r in one["files"] if r["status"] == "document")
    splits = [pd.split_of(p, 0.5) for p in paths]
    assert {"train", "val"} == set(splits)  # this corpus has both at 0.5
    enc = get_gpt2_tokenizer()
    for split in ("train", "val"):
        expected = "".join(d + EOT for d, s in zip(docs, splits) if s == split)
        assert enc.decode(all_ids(tmp_path / "one", split).tolist()) == expected
        assert len(pd.open_shards(tmp_path / "one", split)) == sum(s["split"] == split for s in one["shards"])


def test_interrupted_preparation_resumes_to_the_same_bytes(corpus, tmp_path, capsys):
    root, _ = corpus
    pd.prepare(root, tmp_path / "ref", workers=1, shard_tokens=30, val_fraction=0.5, progress=False)
    seen = []

    def stop_after_two(shard):
        seen.append(shard)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="2 finished shards kept in .*run the same command again"):
        pd.prepare(root, tmp_path / "out", workers=2, shard_tokens=30, val_fraction=0.5, progress=False,
                   on_shard=stop_after_two)
    assert (tmp_path / "out" / "progress.json").exists() and not (tmp_path / "out" / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.bin")}
    assert len(kept) == 2 and not list((tmp_path / "out").glob(".*partial*"))
    capsys.readouterr()
    pd.prepare(root, tmp_path / "out", workers=1, shard_tokens=30, val_fraction=0.5, progress=False)
    assert "resuming: 2 finished shards kept" in capsys.readouterr().err
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "ref")
    assert {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in kept} == kept  # not written again
    # A finished preparation says so and does nothing.
    again = pd.prepare(root, tmp_path / "out", workers=1, shard_tokens=30, val_fraction=0.5, progress=False)
    assert "nothing to do" in capsys.readouterr().err
    assert again == json.loads((tmp_path / "out" / "manifest.json").read_text())


KILL_CHILD = """
import os, signal, sys
from ch05.gutenberg import prepare_dataset as pd
count = []
def kill(shard):
    count.append(shard)
    if len(count) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
pd.prepare(sys.argv[1], sys.argv[2], workers=1, shard_tokens=30, val_fraction=0.5, progress=False, on_shard=kill)
"""


def test_killed_preparation_resumes_to_the_same_bytes(corpus, tmp_path):
    root, _ = corpus
    pd.prepare(root, tmp_path / "ref", workers=1, shard_tokens=30, val_fraction=0.5, progress=False)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILL_CHILD, str(root), str(tmp_path / "out"), "3"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert len(list((tmp_path / "out").glob("*.bin"))) == 3
    pd.prepare(root, tmp_path / "out", workers=1, shard_tokens=30, val_fraction=0.5, progress=False)
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "ref")
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # temp files and spool gone


MEMORY_CHILD = """
import json, sys
from ch05.gutenberg import prepare_dataset as pd
from llmfs.bench import proc_status_mib
pd.SPOOL_TOKENS = 1 << 16  # long documents go through the spool file sooner (the rest as in a real run)
pd.prepare(sys.argv[1], sys.argv[3], workers=1, shard_tokens=1 << 20, val_fraction=0.1, progress=False)
before = proc_status_mib("VmHWM")
m = pd.prepare(sys.argv[2], sys.argv[4], workers=1, shard_tokens=1 << 20, val_fraction=0.1, progress=False)
print(json.dumps({"before": before, "after": proc_status_mib("VmHWM"), "tokens": sum(m["tokens"].values())}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from /proc (Linux)")
def test_memory_does_not_grow_with_the_corpus(tmp_path):
    """21 MiB of text (150 books of 120 KB and one of 4 MB) prepared with a peak memory at most 1 MiB above
    that of preparing a 2.3 MB warm-up corpus first (which has a long book too, so the fixed-size read and
    tokenizer buffers are in the baseline): the corpus is 20x the allowed growth. What does grow is the
    record kept per file (a few hundred bytes); measured here: about 0.4 MiB."""
    rng = random.Random(123)
    lines = get_data_file("tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()

    def book(size):
        out, n = [], 0
        while n < size:
            start = rng.randrange(len(lines) - 40)
            block = "\n".join(lines[start:start + 40]) + "\n\n"
            out.append(block)
            n += len(block)
        return "".join(out)

    warm, big = tmp_path / "warm", tmp_path / "big"
    for i, size in enumerate([100_000, 100_000, 2_000_000]):
        (warm / f"{i}").mkdir(parents=True, exist_ok=True)
        (warm / f"{i}" / "w.txt").write_text(book(size), encoding="utf-8")
    big.mkdir()
    for i in range(150):
        (big / f"{i // 50:02d}").mkdir(exist_ok=True)
        (big / f"{i // 50:02d}" / f"pg{i}.txt").write_text(book(120_000), encoding="utf-8")
    (big / "long.txt").write_text(book(4_000_000), encoding="utf-8")
    corpus_mib = sum(p.stat().st_size for p in big.rglob("*.txt")) / 2**20
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(warm), str(big), str(tmp_path / "o1"),
                           str(tmp_path / "o2")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    growth, bound = m["after"] - m["before"], 1.0
    assert corpus_mib >= 20 * bound
    assert m["tokens"] > 6_000_000
    assert growth < bound, f"peak memory grew {growth:.2f} MiB preparing {corpus_mib:.1f} MiB"


def cli(argv, capsys):
    try:
        code = pd.main(argv)
    except SystemExit as exc:  # the parser's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


def test_command_prepares_and_reports(corpus, tmp_path, capsys):
    root, _ = corpus
    code, err = cli(["prepare", "--data-dir", str(root), "--output-dir", str(tmp_path / "out"), "--workers", "1",
                     "--no-progress"], capsys)
    assert code == 0
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("prepared 6 documents") and "skipped 5 files (binary 2, empty 3)" in summary
    assert "MB/s" in summary and "tokens/s)" in summary and "cp1252 (charset_normalizer) " in summary


def one_error(code, err, expected_code=2):
    assert code == expected_code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_line_before_any_work(corpus, tmp_path, capsys):
    root, _ = corpus
    out = tmp_path / "out"
    line = one_error(*cli(["prepare", "--data-dir", str(tmp_path / "missing"), "--output-dir", str(out)], capsys))
    assert "does not exist" in line and not out.exists()
    junk = tmp_path / "junk"
    (junk / "x").mkdir(parents=True)
    (junk / "x" / "a.bin").write_bytes(b"\x00\x01\x02")
    (junk / "b.txt").write_bytes(b"")
    line = one_error(*cli(["prepare", "--data-dir", str(junk), "--output-dir", str(out)], capsys))
    assert "holds no text files (2 files" in line and not out.exists()
    (tmp_path / "file").write_text("x")
    line = one_error(*cli(["prepare", "--data-dir", str(root), "--output-dir", str(tmp_path / "file" / "out")],
                          capsys))
    assert "cannot be written" in line
    assert "must be from 0 to below 1" in one_error(*cli(["prepare", "--data-dir", str(root), "--val-fraction", "1"],
                                                          capsys))
    assert "--workers" in one_error(*cli(["prepare", "--data-dir", str(root), "--workers", "0"], capsys))
    # Another corpus's preparation, finished or not, is refused and left alone.
    pd.prepare(junk.parent / "data", out, workers=1, shard_tokens=1000, progress=False)
    capsys.readouterr()
    before = folder_bytes(out)
    (junk / "c.txt").write_text("some text", encoding="utf-8")
    line = one_error(*cli(["prepare", "--data-dir", str(junk), "--output-dir", str(out)], capsys))
    assert "holds a finished preparation of another corpus" in line and folder_bytes(out) == before
    line = one_error(*cli(["prepare", "--data-dir", str(root), "--output-dir", str(out), "--shard-tokens", "7"],
                          capsys))
    assert "shard_tokens" in line and folder_bytes(out) == before
    line = one_error(*cli(["prepare", "--data-dir", str(root), "--output-dir", str(root)], capsys))
    assert "--output-dir is --data-dir" in line
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "train-00000.bin").write_bytes(b"\x01\x00")
    line = one_error(*cli(["prepare", "--data-dir", str(root), "--output-dir", str(stray)], capsys))
    assert "holds shards (train-00000.bin, ...) but no manifest.json" in line
    # --overwrite replaces it.
    assert cli(["prepare", "--data-dir", str(junk), "--output-dir", str(out), "--overwrite", "--no-progress",
                "--workers", "1"], capsys)[0] == 0
    assert json.loads((out / "manifest.json").read_text())["documents"] == 1


def test_truncated_shard_is_refused_by_the_reader(corpus, tmp_path):
    root, _ = corpus
    pd.prepare(root, tmp_path / "out", workers=1, shard_tokens=10_000, val_fraction=0.0, progress=False)
    shard = tmp_path / "out" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(pd.InvalidInput, match="the manifest says"):
        pd.open_shards(tmp_path / "out")


def test_download_offline_is_one_line_and_online_prints_the_book_steps(tmp_path, capsys, monkeypatch):
    import llmfs.download

    monkeypatch.setattr(llmfs.download, "reachable", lambda url, timeout: False)
    line = one_error(*cli(["download", "--output-dir", str(tmp_path / "g")], capsys), expected_code=1)
    assert "github.com cannot be reached" in line and "get_data.py" in line and not (tmp_path / "g").exists()
    monkeypatch.setattr(llmfs.download, "reachable", lambda url, timeout: True)
    code = pd.main(["download", "--output-dir", str(tmp_path / "g")])
    out = capsys.readouterr().out
    assert code == 0 and "git clone https://github.com/pgcorpus/gutenberg.git" in out
    assert "python get_data.py" in out and "prepare --data-dir" in out and "add --run" in out
    monkeypatch.setattr(pd.shutil, "which", lambda name: None)
    assert "git is not installed" in one_error(*cli(["download", "--output-dir", str(tmp_path / "g")], capsys))


def test_module_docstring_commands_parse():
    text = textwrap.dedent(pd.__doc__)
    assert "python -m ch05.gutenberg.prepare_dataset prepare --data-dir" in text
    assert pd.parser().parse_args(["prepare", "--data-dir", "x"]).workers >= 1


def test_workers_do_not_import_pytorch():
    """A spawned worker imports this module: it must stay light (llmfs.cli, which imports PyTorch, is
    imported only by the command)."""
    code = "import sys, ch05.gutenberg.prepare_dataset as m; m._tokenizer(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr


def test_a_file_gone_since_the_listing_is_skipped_and_counted(corpus, tmp_path, monkeypatch):
    root, docs = corpus
    listing = pd.list_files
    monkeypatch.setattr(pd, "list_files", lambda *a, **k: [*listing(*a, **k), ("zz.txt", root / "zz.txt", 9, 0)])
    manifest = pd.prepare(root, tmp_path / "out", workers=1, val_fraction=0.0, progress=False)
    assert manifest["skipped"] == {"empty": 3, "binary": 2, "unreadable": 1}
    assert get_gpt2_tokenizer().decode(all_ids(tmp_path / "out").tolist()) == EOT.join(docs) + EOT


def test_an_output_folder_inside_the_data_folder_is_not_read_as_input(corpus, tmp_path, capsys):
    root, docs = corpus
    first = pd.prepare(root, root / "prepared", workers=1, val_fraction=0.0, progress=False)
    assert first["documents"] == len(docs) and not any(r["path"].startswith("prepared/") for r in first["files"])
    capsys.readouterr()
    assert pd.prepare(root, root / "prepared", workers=1, val_fraction=0.0, progress=False) == first
    assert "nothing to do" in capsys.readouterr().err
