"""benchmarks/bpe.py runs end to end on a slice of tinyshakespeare and writes a well-formed report.

No timing assertions (speed is what the benchmark reports); the correctness checks it makes are asserted
(identical ids from every encoder and every tokenizer loaded in a fresh process), and `last_merge`, which
writes GPT-2's merges.txt from the ranks, on a tiny vocabulary.
"""

import json
import re

import pytest

from benchmarks import bpe


def test_quick_bpe_benchmark_writes_table_and_json(tmp_path, capsys):
    assert bpe.main(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    for heading in ("## Training", "## Against the book's naive trainer", "## Encoding with GPT-2's ranks",
                    "## Loading (each in a fresh process)", "## Goals"):
        assert heading in table
    for block in re.findall(r"(\|[^\n]+\|\n\|[-:| ]+\|\n(?:\|[^\n]+\|\n)+)", table):
        assert len({row.count("|") for row in block.strip().splitlines()}) == 1, block
    data = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    results = data["results"]
    assert data["quick"] and data["machine"]["tokenizers"] and data["machine"]["tiktoken"]
    assert data["machine"]["transformers"]
    assert [r["vocab_size"] for r in results["train"]] == bpe.QUICK["vocab_sizes"]
    for row in results["train"]:
        # Same vocabulary size as Hugging Face's trainer, and a mostly shared vocabulary.
        assert row["ours_vocab_size"] == row["hf_vocab_size"] == row["vocab_size"]
        assert row["shared_tokens"] > 0.8 * (row["vocab_size"] - 1)
        assert all(s["wall"] > 0 and s["cpu"] >= 0 for s in row["seconds"].values())
    assert all(r["same_merges"] for r in results["naive"])
    assert results["encode"]["identical_ids"]
    assert results["encode"]["identical_ids_with_tiktoken"] == {
        "hf tokenizers": True, "transformers": True, "ours": True, "batches": True}
    assert results["encode"]["tokens"] > 0
    assert set(results["encode"]["chars_per_cpu_s"]) == set(results["encode"]["runs"])
    assert any(name.startswith("transformers") for name in results["encode"]["runs"])
    # Loading: every tokenizer, in its own process, with tiktoken's ids for the book's sample.
    load = {row["name"]: row for row in results["load"]}
    assert list(load) == list(bpe.LOADERS)
    assert {"tiktoken", "ours", "hf tokenizers", "transformers GPT2Tokenizer"} <= load.keys()
    for row in load.values():
        assert row["same_ids"] and row["import_s"] > 0 and row["load_s"] > 0 and row["modules"] > 0, row
        assert len(row["runs"]) == bpe.QUICK["load_rounds"]
        assert f"| {row['name']} | {row['reads']} |" in table
    # Robust on any machine: transformers' import is hundreds of modules, tiktoken's a few dozen.
    assert load["transformers GPT2Tokenizer"]["modules"] > 3 * load["tiktoken"]["modules"]
    assert "goals met" in capsys.readouterr().out


def test_last_merge_finds_the_pair_that_made_a_token():
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"bc": 257, b"abc": 258, b"ca": 259}
    assert bpe.last_merge(b"ab", ranks) == (b"a", b"b")
    # "ab" has the lower rank, so it formed first: "abc" was made of "ab" + "c", not "a" + "bc".
    assert bpe.last_merge(b"abc", ranks) == (b"ab", b"c")
    with pytest.raises(ValueError, match="not the merge of two tokens of lower rank"):  # no "ab" or "bc" below it
        bpe.last_merge(b"abc", {bytes([b]): b for b in range(256)} | {b"abc": 256})


def test_naive_chars_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bpe.main(["--quick", "--naive-chars", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("error: argument --naive-chars: must be a whole number >= 1, got 0 "
                                       "(see --help)\n")
