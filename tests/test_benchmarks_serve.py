"""benchmarks.serve runs end to end on a tiny model and reports requests/s and time to first token.

No timing assertions: speed is reported by the benchmark itself, not tested.
"""

import json
import re

from benchmarks import serve


def test_quick_serve_benchmark(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert serve.main(["--quick", "--requests", "2", "--clients", "1", "3", "--rounds", "1", "--tokens", "4",
                       "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"CPU: .+ \(\d+ cores", table)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["direct", "served", "served"]
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"direct", "served x1", "served x3"}
    assert data["summary"]["served x3"]["requests"] == 3
    for s in data["summary"].values():
        assert s["requests_per_s"] > 0 and 0 < s["ttft_ms_median"] <= s["ttft_ms_max"]
