"""The benchmark harness runs end to end on a tiny config and writes a well-formed report.

No timing assertions: speed is reported by the benchmark itself, not tested.
"""

import json
import re

from benchmarks import run


def test_quick_benchmark_writes_table_and_json(tmp_path):
    assert run.main(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    for heading in ("## Training step", "## Generation", "## Scaling", "## Mixed precision", "## Goals"):
        assert heading in table
    # Every table row has as many cells as its header.
    for block in re.findall(r"(\|[^\n]+\|\n\|[-:| ]+\|\n(?:\|[^\n]+\|\n)+)", table):
        rows = block.strip().splitlines()
        widths = {row.count("|") for row in rows}
        assert len(widths) == 1, block
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"]["torch"]
    train = data["results"]["train"]
    assert {r["impl"] for r in train} == {"ours", "hf", "ours-untied", "ours-explicit"}
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in train)
    gen = {(r["impl"], r["cache"]): r for r in data["results"]["generate"]}
    # Same seed, same weights: cached and uncached greedy decoding agree token for token.
    assert gen[("ours", True)]["tokens"] == gen[("ours", False)]["tokens"]
    assert len(gen[("hf", True)]["latency_ms"]) == gen[("hf", True)]["new_tokens"]
    assert (tmp_path / "scaling_train.png").stat().st_size > 0
    assert (tmp_path / "scaling_generate.png").stat().st_size > 0
