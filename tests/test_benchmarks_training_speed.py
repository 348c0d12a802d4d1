"""benchmarks/training_speed.py runs the ladder end to end on a tiny model and writes a well-formed report.

No timing assertions (speed is what the benchmark reports); the correctness checks it makes are asserted.
"""

import json
import re

import pytest

from benchmarks import training_speed as bench
from ch05.training_speed.training_speed import LADDER


def test_quick_benchmark_writes_table_and_json(tmp_path, capsys):
    assert bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "# Training-speed tricks, one at a time" in table and "## Goals" in table and "Machine: " in table
    blocks = re.findall(r"(\|[^\n]+\|\n\|[-:| ]+\|\n(?:\|[^\n]+\|\n)+)", table)
    assert len(blocks) == 1
    rows = blocks[0].strip().splitlines()
    assert len({row.count("|") for row in rows}) == 1, blocks[0]
    assert len(rows) == 2 + len(LADDER)
    assert all("no GPU" in row for row in rows[2:])
    data = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert data["quick"] and data["devices"] == ["cpu"] and data["machine"]["cpu"]
    results = data["results"]
    assert [r["rung"] for r in results] == list(range(len(LADDER)))
    compile_rung = next(r for r in results if r["added"] == "compile")
    assert "skipped" in compile_rung and "--quick" in compile_rung["skipped"]
    for r in results:
        if r["added"] == "bf16" and not data["machine"]["bf16_cpu"]:
            assert "skipped" in r
        elif r["added"] != "compile":
            res = r["result"]
            assert r["same_function"] and res["tokens_per_s"] > 0 and len(res["losses"]) == 3
            assert res["freed_memory_kept"] == ("keep_freed_memory" in r["spec"]["tricks"])
    book, fused = results[0]["result"]["losses"], results[1]["result"]["losses"]
    assert book == pytest.approx(fused, abs=1e-4)
    assert "goals met" in capsys.readouterr().out


def test_rung_selection_and_steps(tmp_path):
    assert bench.main(["--quick", "--device", "cpu", "--rungs", "0,4", "--steps", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert [r["rung"] for r in data["results"]] == [0, 4] and data["plan"]["steps"] == 1
    assert all(len(r["result"]["losses"]) == 2 for r in data["results"])


@pytest.mark.parametrize("value", ["9", "x", "", "-1"])
def test_bad_rungs_give_one_line(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--rungs", value, "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --rungs: must be rung numbers from 0 to 8") and err.count("\n") == 1


def test_steps_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--steps", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: argument --steps: must be a whole number >= 1, got 0 (see --help)\n"
