"""benchmarks.lora_finetune runs end to end on a tiny Qwen3 and writes a well-formed report (no timing assertions)."""

import json
import re

import pytest

from benchmarks import lora_finetune as bench


def test_quick_benchmark_writes_table_and_json(tmp_path, monkeypatch):
    # Measurements in this process (the harness is under test, not the speed); one real worker below.
    monkeypatch.setattr(bench, "run_worker", lambda spec: json.loads(json.dumps(bench.worker(spec))))
    assert bench.main(["--quick", "--steps", "1", "--seq-len", "16", "--threads", "1", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "lora_finetune.md").read_text()
    block = re.search(r"(\|[^\n]+\|\n\|[-:| ]+\|\n(?:\|[^\n]+\|\n)+)", table).group(1)
    assert len({row.count("|") for row in block.strip().splitlines()}) == 1 and block.count("\n") == 4
    rows = json.loads((tmp_path / "lora_finetune.json").read_text())["results"]
    assert [r["gradient_checkpointing"] for r in rows] == [False, True]
    assert all(r["tokens_per_s"] > 0 and r["trainable"] < r["params"] for r in rows)
    # the same steps with and without checkpointing: the same losses
    assert rows[0]["losses"] == pytest.approx(rows[1]["losses"], abs=1e-4)
    goals = bench.summarize(rows, {"cpu": "x", "cores": 2, "torch": "t"}, quick=True)[1]
    assert goals == [(goals[0][0], True)] and goals[0][0].startswith("the same losses")


def test_one_row_in_a_fresh_process():
    spec = {"hf": bench.TINY_HF, "threads": 1, "rank": 2, "batch": 1, "seq_len": 8, "steps": 1,
            "gradient_checkpointing": True}
    real = bench.run_worker(spec)
    assert real["peak_rss_mib"] >= real["rss_model_mib"] > 0 and real["gradient_checkpointing"] is True


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--steps", "0"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: argument --steps") and err.count("\n") == 1
