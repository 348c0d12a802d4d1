"""The benchmark harness runs end to end on a tiny config and writes a well-formed report.

No timing assertions: speed is reported by the benchmark itself, not tested.
"""

import json
import re

from benchmarks import run


def test_quick_benchmark_writes_table_and_json(tmp_path, monkeypatch):
    # A second training shape "too big for this machine" is skipped and reported, not fatal.
    estimate = run.train_memory_gib
    monkeypatch.setattr(run, "train_memory_gib", lambda spec: 1e6 if spec["batch"] == 8 else estimate(spec))
    assert run.main(["--quick", "--train-shapes", "2x32,8x32", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| ours | 8 x 32 | | skipped: needs ~" in table
    for heading in ("## Training step", "## Generation", "## Scaling", "## Mixed precision", "## Goals"):
        assert heading in table
    # Every table row has as many cells as its header.
    for block in re.findall(r"(\|[^\n]+\|\n\|[-:| ]+\|\n(?:\|[^\n]+\|\n)+)", table):
        rows = block.strip().splitlines()
        widths = {row.count("|") for row in rows}
        assert len(widths) == 1, block
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"]["torch"]
    train = [r for r in data["results"]["train"] if r["batch"] == 2]
    assert {r["impl"] for r in train} == {"ours", "hf", "ours-untied", "ours-explicit"}
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in train)
    gen = {(r["impl"], r["cache"]): r for r in data["results"]["generate"]}
    # Same seed, same weights: cached and uncached greedy decoding agree token for token.
    assert gen[("ours", True)]["tokens"] == gen[("ours", False)]["tokens"]
    assert len(gen[("hf", True)]["latency_ms"]) == gen[("hf", True)]["new_tokens"]
    assert (tmp_path / "scaling_train.png").stat().st_size > 0
    assert (tmp_path / "scaling_generate.png").stat().st_size > 0


def test_shapes_too_big_for_the_machine_are_skipped_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "total_memory_gib", lambda: 2.0)  # pretend a 2 GiB machine
    launched = []
    monkeypatch.setattr(run, "run_worker", lambda spec: launched.append(spec) or {})
    assert run.main(["--only", "train", "--train-shapes", "8x1024", "--out", str(tmp_path)]) == 0
    assert launched == []  # nothing started that would be killed for lack of memory
    train = json.loads((tmp_path / "results.json").read_text())["results"]["train"]
    assert {r["impl"] for r in train} == {"ours", "hf", "ours-untied", "ours-explicit"}
    assert all("needs ~" in r["skipped"] for r in train)


def test_memory_estimate_grows_with_context_squared():
    cfg = run.GPT_CONFIG_124M
    small = run.train_memory_gib({"cfg": cfg, "batch": 2, "ctx": 256})
    big = run.train_memory_gib({"cfg": cfg, "batch": 8, "ctx": 1024})
    assert 2 < small < 6  # measured peak at 2 x 256: ~3.2-3.8 GiB
    assert big > 20  # 8 x 1024 was killed for lack of memory on a 24 GiB machine
