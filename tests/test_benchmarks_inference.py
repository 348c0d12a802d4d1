"""benchmarks.inference joins our decoding rows, llama.cpp's on the exported files and the served throughput
into one report (tiny models; no timing assertions); the llama.cpp part skips, saying why, where
llama-cpp-python is not installed."""

import json
import os
import re

import pytest

from benchmarks import inference, int8_decode


def served_summary(one: float, eight: float) -> dict:
    row = {"tokens_per_s": 1.0, "requests": 4, "requests_per_s": 0.1, "ttft_ms_median": 1.0, "ttft_ms_max": 1.0,
           "latency_ms_median": 1.0}
    summary = {"direct": {**row, "tokens_per_s": 2.0}}
    for b in (1, 8):
        for c in inference.SERVE_STREAMS:
            summary[f"served b{b} x{c}"] = {**row, "tokens_per_s": (eight if c == 8 else one) if b == 8 else 2.0}
    return {"summary": summary, "max_batch_sizes": [1, 8], "tokens": 32, "threads": 2}


@pytest.mark.parametrize("one, eight, met", [(10.0, 45.0, True), (10.0, 25.0, False)])
def test_serve_table_shows_every_stream_count_and_the_batching_goal(one, eight, met):
    lines, goals = inference.serve_table(served_summary(one, eight))
    rows = [line for line in lines if re.match(r"^\| \d+ \|", line)]
    assert [int(r.split("|")[1]) for r in rows] == list(inference.SERVE_STREAMS)
    assert rows[2].split("|")[3].strip() == f"{eight:.1f}"  # 8 streams, batched
    assert goals == [(f"served, 8 streams >= 4x one stream with batching ({eight / one:.2f}x)", met)]


def test_serve_table_adds_the_onednn_column_and_its_goal():
    serve = {**served_summary(10.0, 25.0), "onednn": {**served_summary(9.0, 54.0), "max_batch_sizes": [8]}}
    lines, goals = inference.serve_table(serve)
    assert lines[3] == "| streams | --max-batch-size 1 | --max-batch-size 8 | --max-batch-size 8 --onednn |"
    rows = [line.split("|")[1:-1] for line in lines if re.match(r"^\| \d+ \|", line)]
    assert [[c.strip() for c in r] for r in rows if r[0].strip() in ("1", "8")] == [["1", "2.0", "10.0", "9.0"],
                                                                                ["8", "2.0", "25.0", "54.0"]]
    assert goals == [("served, 8 streams >= 4x one stream with batching (2.50x)", False),
                     ("served, 8 streams >= 4x one stream with batching and --onednn (6.00x)", True)]


if os.environ.get("LLMFS_REQUIRE_LLAMA_CPP"):  # .ci/run builds llama.cpp: there a missing one fails
    import llama_cpp  # noqa: F401


def test_quick_run_puts_llama_cpp_beside_ours_on_the_same_weights(tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python; "
                                            "CI builds it)")
    # Every row measured in this process (the harness is under test, not the speed).
    monkeypatch.setattr(int8_decode, "run_worker", lambda spec: json.loads(json.dumps(int8_decode.worker(spec))))
    monkeypatch.setattr(inference, "run_llamacpp_worker",
                        lambda spec: json.loads(json.dumps(inference.llamacpp_worker(spec))))
    monkeypatch.setattr(inference, "serve_rows", lambda out, quick, threads: served_summary(3.0, 13.0))
    assert inference.main(["--quick", "--max-new-tokens", "4", "--workdir", str(tmp_path / "work"),
                           "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "inference.json").read_text())
    rows = {(r["model"], r["impl"]): r for r in data["rows"]}
    impls = [*int8_decode.available_impls(inference.OUR_IMPLS), "llama.cpp-f32", "llama.cpp-q8_0"]
    assert sorted(rows) == sorted((m, i) for m in ("gpt2-124m", "qwen3-0.6b") for i in impls)
    for model in ("gpt2-124m", "qwen3-0.6b"):
        ours, f32, q8 = (rows[(model, i)] for i in ("ours-float32", "llama.cpp-f32", "llama.cpp-q8_0"))
        assert f32["tokens"] == ours["tokens"] and f32["equal_tokens"] == 4  # the same weights, greedy
        assert f32["bytes_per_token"] == ours["bytes_per_token"]
        assert q8["bytes_per_token"] == pytest.approx(ours["bytes_per_token"] * 34 / 128)
    table = (tmp_path / "inference.md").read_text()
    for block in re.findall(r"(\|[^\n]+\|\n\|[-:| ]+\|\n(?:\|[^\n]+\|\n)+)", table):
        assert len({row.count("|") for row in block.strip().splitlines()}) == 1, block
    assert "qwen3-0.6b: int8 >= 0.7x llama.cpp q8_0" in table
    assert "served, 8 streams >= 4x one stream with batching (4.33x)" in table


def test_an_unwritable_out_is_one_line_before_any_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(int8_decode, "prepare_folders", lambda *a: pytest.fail("measured before --out was checked"))
    (tmp_path / "file").write_text("not a folder")
    assert inference.main(["--quick", "--out", str(tmp_path / "file" / "results")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and err.count("\n") == 1
