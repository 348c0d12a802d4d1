"""benchmarks/bpe.py runs end to end on a slice of tinyshakespeare and writes a well-formed report.

No timing assertions (speed is what the benchmark reports); the correctness checks it makes are asserted.
"""

import json
import re

import pytest

from benchmarks import bpe


def test_quick_bpe_benchmark_writes_table_and_json(tmp_path, capsys):
    assert bpe.main(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    for heading in ("## Training", "## Against the book's naive trainer", "## Encoding with GPT-2's ranks",
                    "## Goals"):
        assert heading in table
    for block in re.findall(r"(\|[^\n]+\|\n\|[-:| ]+\|\n(?:\|[^\n]+\|\n)+)", table):
        assert len({row.count("|") for row in block.strip().splitlines()}) == 1, block
    data = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    results = data["results"]
    assert data["quick"] and data["machine"]["tokenizers"] and data["machine"]["tiktoken"]
    assert [r["vocab_size"] for r in results["train"]] == bpe.QUICK["vocab_sizes"]
    for row in results["train"]:
        # Same vocabulary size as Hugging Face's trainer, and a mostly shared vocabulary.
        assert row["ours_vocab_size"] == row["hf_vocab_size"] == row["vocab_size"]
        assert row["shared_tokens"] > 0.8 * (row["vocab_size"] - 1)
        assert all(s["wall"] > 0 and s["cpu"] >= 0 for s in row["seconds"].values())
    assert all(r["same_merges"] for r in results["naive"])
    assert results["encode"]["identical_ids"]
    assert results["encode"]["tokens"] > 0
    assert "goals met" in capsys.readouterr().out


def test_naive_chars_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bpe.main(["--quick", "--naive-chars", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("error: argument --naive-chars: must be a whole number >= 1, got 0 "
                                       "(see --help)\n")
