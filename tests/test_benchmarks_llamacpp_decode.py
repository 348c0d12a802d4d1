"""benchmarks.llamacpp_decode runs end to end on a tiny exported GPTModel and writes a well-formed report
(no timing assertions); skipped, saying why, where llama-cpp-python is not installed."""

import json
import os

import pytest

pytest.importorskip("gguf", reason="the GGUF export needs llama.cpp's gguf package (pip install gguf)")
if os.environ.get("LLMFS_REQUIRE_LLAMA_CPP"):  # .ci/run builds llama.cpp: there a missing one fails
    import llama_cpp  # noqa: F401
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python; CI builds it)")

from benchmarks import llamacpp_decode as bench  # noqa: E402


def test_quick_benchmark_writes_the_table_and_json(tmp_path):
    assert bench.main(["--quick", "--max-new-tokens", "5", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "llamacpp_decode.json").read_text())
    rows = data["results"]
    assert [r["type"] for r in rows] == ["f32", "f16", "q8_0"]
    assert all(len(r["tokens"]) == 5 and r["tokens_per_s"] > 0 and r["n_threads"] == 1 for r in rows)
    assert rows[0]["tokens"] == data["our_tokens"] and rows[0]["same_as_ours"] == 5  # f32: chapter 5's tokens
    table = (tmp_path / "llamacpp_decode.md").read_text()
    assert table.count("\n| bench-") == 3 and data["machine"]["cpu"] in table


def test_decoding_gives_our_greedy_tokens(tmp_path):
    import torch

    from ch04.gpt import GPT_CONFIG_124M, GPTModel, generate_text_simple
    from ch07.export_gguf.export_gguf import export_gguf

    torch.manual_seed(123)
    model = GPTModel({**GPT_CONFIG_124M, "context_length": 32, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
                      "drop_rate": 0.0}).eval()
    path, _ = export_gguf(model, tmp_path / "m.gguf", "f32")
    ids = [464, 2068, 7586, 21831]
    result = bench.llamacpp_decode(path, 6, prompt_ids=ids, n_threads=1, repeats=1)
    ours = generate_text_simple(model, torch.tensor([ids]), 6, 32)[0, 4:].tolist()
    assert result["tokens"] == ours and result["prompt_tokens"] == 4


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert bench.main(["--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: --gguf {tmp_path / 'missing.gguf'} does not exist"
