"""benchmarks.serve runs end to end on a tiny model and reports requests/s and time to first token.

No timing assertions: speed is reported by the benchmark itself, not tested.
"""

import json
import re

import pytest

from benchmarks import serve


def test_quick_serve_benchmark(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert serve.main(["--quick", "--requests", "2", "--clients", "1", "8", "--rounds", "1",
                       "--max-new-tokens", "4", "--max-batch-size", "1", "4", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"CPU: .+ \(\d+ cores", table)
    rows = [[cell.strip() for cell in line.split("|")[1:4]] for line in table.splitlines() if line.startswith("| ")]
    assert rows[1:] == [["direct", "-", "-"], ["direct", "8", "8"]] + [["served", b, c] for b in "14" for c in "18"]
    assert re.search(r"8 streams with --max-batch-size 4: [\d.]+x the tokens/s of one stream", table)
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"direct", "direct b8 x8", *(f"served b{b} x{c}" for b in (1, 4) for c in (1, 8))}
    assert data["summary"]["served b4 x8"]["requests"] == 8 and data["max_batch_sizes"] == [1, 4]
    for s in data["summary"].values():
        assert s["requests_per_s"] > 0 and 0 < s["ttft_ms_median"] <= s["ttft_ms_max"]
        assert s["tokens_per_s"] == pytest.approx(4 * s["requests_per_s"])  # greedy: every answer has 4 tokens


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    for argv, message in ((["--clients", "1", "0"], "argument --clients: must be a whole number >= 1, got 0"),
                          (["--tokens", "4"], "unrecognized arguments: --tokens 4"),
                          (["--out", str(tmp_path)], f"argument --out: {tmp_path} is a folder; give a file name")):
        with pytest.raises(SystemExit) as exc:
            serve.main(["--quick", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_more_new_tokens_than_the_context_is_refused_before_the_server_starts(capsys, monkeypatch):
    from benchmarks import serve as bench_serve

    monkeypatch.setattr(bench_serve, "start_server", lambda *a, **k: pytest.fail("started a server"))
    assert bench_serve.main(["--quick", "--max-new-tokens", "65"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("error: --max-new-tokens 65 is more than the 64-token context of the tiny "
                                            "model; give at most 64")


def test_quick_serve_benchmark_with_onednn(tmp_path, capsys, onednn_products):
    """`--onednn`: the servers run with --onednn and the direct side routes as they do (products of 2+ rows)."""
    out = tmp_path / "serve.json"
    assert serve.main(["--quick", "--requests", "2", "--clients", "1", "4", "--max-new-tokens", "4",
                       "--max-batch-size", "4", "--onednn", "--out", str(out)]) == 0
    assert re.search(r"CPU: .+ threads, oneDNN linear layers\)", capsys.readouterr().out)
    assert json.loads(out.read_text())["onednn"] is True
    assert onednn_products  # the direct side's prompts and batched steps (the servers are other processes)


def test_onednn_is_refused_where_it_cannot_run(monkeypatch, capsys):
    import llmfs.onednn_linear as ol

    monkeypatch.setattr(ol, "onednn_linear_supported", lambda: False)
    monkeypatch.setattr(serve, "start_server", lambda *a, **k: pytest.fail("started a server"))
    assert serve.main(["--quick", "--onednn"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --onednn needs an x86 CPU")
