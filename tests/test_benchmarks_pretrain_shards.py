"""benchmarks/pretrain_shards.py runs end to end on a tiny model and writes a well-formed report.

No timing assertions (speed is what the benchmark reports); the correctness check it makes is asserted:
the shard loader and the in-memory loader give the same batches, so the two runs have the same losses.
"""

import json
import re

import pytest

from benchmarks import pretrain_shards


def test_quick_pretrain_shards_benchmark_writes_table_and_json(tmp_path, capsys):
    assert pretrain_shards.main(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "## Goals" in table and "Machine: " in table and "shared with other work" in table
    blocks = re.findall(r"(\|[^\n]+\|\n\|[-:| ]+\|\n(?:\|[^\n]+\|\n)+)", table)
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) == 2 + len(pretrain_shards.NAMES)
    data = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    results = data["results"]
    assert data["quick"] and data["machine"]["cpu"] and data["device"] == "cpu"
    assert results["same_batches"] and results["same_losses"]
    steps = pretrain_shards.QUICK["steps"]
    for name in pretrain_shards.NAMES:
        assert results["tokens_per_s"][name] > 0 and results["read_tokens_per_s"][name] > 0
        assert f"| {name} |" in table
        runs = results["runs"][name]
        assert len(runs) == pretrain_shards.QUICK["rounds"] and all(len(r["losses"]) == steps for r in runs)
    # The same batches, and the run trained: the losses are the book's starting ~ln(50257) = 10.8, falling.
    losses = results["runs"][pretrain_shards.NAMES[0]][0]["losses"]
    assert losses == results["runs"][pretrain_shards.NAMES[1]][0]["losses"] and 10 < losses[0] < 11.5
    assert results["steps_per_epoch"] >= steps
    assert "goals met" in capsys.readouterr().out


def test_steps_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        pretrain_shards.main(["--quick", "--steps", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument --steps: ")
