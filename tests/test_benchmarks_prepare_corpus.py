"""benchmarks/prepare_corpus.py runs end to end on a slice of tinyshakespeare and writes a well-formed report.

No timing assertions (speed is what the benchmark reports); the correctness check it makes is asserted:
the prepared ids, 1 and 2 workers, are tiktoken's for each whole document with <|endoftext|> after each.
"""

import json
import re

from benchmarks import prepare_corpus


def test_quick_prepare_corpus_benchmark_writes_table_and_json(tmp_path, capsys):
    assert prepare_corpus.main(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "## Goals" in table and "Machine: " in table
    for block in re.findall(r"(\|[^\n]+\|\n\|[-:| ]+\|\n(?:\|[^\n]+\|\n)+)", table):
        assert len({row.count("|") for row in block.strip().splitlines()}) == 1, block
    data = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    results = data["results"]
    assert data["quick"] and data["machine"]["tiktoken"] and data["machine"]["cpu"]
    assert results["identical_ids"] == {"prepare, 1 worker": True, "prepare, 2 workers": True,
                                        "encode_ordinary_batch": True}
    # Every run counted the same tokens, and every run has a positive throughput, in the table too.
    assert len(set(results["tokens"].values())) == 1 and results["tokens"]["prepare, 1 worker"] > 1000
    assert results["documents"] == results["files"] == 2 * len(prepare_corpus.make_documents(5_000, 20_000))
    for name in results["names"]:
        assert results["mb_per_s"][name] > 0 and f"| {name} |" in table
        assert len(results["runs"][name]) == prepare_corpus.QUICK["rounds"]
    assert "goals met" in capsys.readouterr().out


def test_documents_are_already_normalized():
    docs = prepare_corpus.make_documents(5_000, 20_000)
    assert len(docs) >= 3 and all(prepare_corpus.normalized(d) == d for d in docs)
    assert docs[-1].startswith("I HAD always thought Jack Gisburn")  # the-verdict comes last


def test_workers_must_be_at_least_two(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        prepare_corpus.main(["--quick", "--workers", "1", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: argument --workers: must be a whole number >= 2, got 1 (see --help)\n"
