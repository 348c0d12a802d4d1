"""benchmarks.int8_decode runs end to end on tiny models and writes a well-formed report (no timing assertions)."""

import json
import re

import pytest
import torch

from benchmarks import int8_decode
from ch04.gpt import GPT_CONFIG_124M, GPTModel
from llmfs.int8 import quantize_int8


def test_weights_read_per_token_counts_int8_bytes():
    torch.manual_seed(123)
    model = GPTModel({**GPT_CONFIG_124M, "n_layers": 2, "emb_dim": 64, "n_heads": 4, "vocab_size": 1000,
                      "context_length": 32, "tie_weights": True})
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    float_bytes = int8_decode.weights_read_per_token(model)
    assert float_bytes == sum(m.weight.numel() * 4 for m in linear)  # the tied head counts: it is read whole
    rows = sum(m.out_features for m in linear)
    assert int8_decode.weights_read_per_token(quantize_int8(model)) == float_bytes // 4 + 4 * rows


def test_quick_benchmark_writes_table_and_json(tmp_path, monkeypatch):
    # Measurements in this process (the harness is under test, not the speed); one real worker below.
    monkeypatch.setattr(int8_decode, "run_worker", lambda spec: json.loads(json.dumps(int8_decode.worker(spec))))
    assert int8_decode.main(["--quick", "--max-new-tokens", "4", "--workdir", str(tmp_path / "work"),
                             "--out", str(tmp_path)]) == 0
    table = (tmp_path / "int8_decode.md").read_text()
    assert "Memory bandwidth" in table and "## Goals" in table
    for block in re.findall(r"(\|[^\n]+\|\n\|[-:| ]+\|\n(?:\|[^\n]+\|\n)+)", table):
        assert len({row.count("|") for row in block.strip().splitlines()}) == 1, block
    data = json.loads((tmp_path / "int8_decode.json").read_text())
    assert data["bandwidth"]["read_gb_s"] > 0 and data["bandwidth"]["copy_gb_s"] > 0
    rows = {(r["model"], r["impl"]): r for r in data["rows"]}
    impls = int8_decode.available_impls(tuple(int8_decode.IMPLS))
    assert len(rows) == 2 * len(impls) and all(len(r["tokens"]) == 4 and r["tokens_per_s"] > 0 for r in rows.values())
    for model in ("gpt2-124m", "qwen3-0.6b"):
        # Same random weights, greedy: our float32 loop and transformers pick the same tokens.
        assert rows[(model, "ours-float32")]["tokens"] == rows[(model, "hf-float32")]["tokens"]
        assert rows[(model, "hf-float32")]["bytes_per_token"] == rows[(model, "ours-float32")]["bytes_per_token"]
        assert rows[(model, "ours-int8")]["bytes_per_token"] < rows[(model, "ours-float32")]["bytes_per_token"] / 3
        if "ours-int8-dynamic" in impls:  # the same int8 bytes, and activations rounded too
            dynamic = rows[(model, "ours-int8-dynamic")]
            assert dynamic["bytes_per_token"] == rows[(model, "ours-int8")]["bytes_per_token"]
    assert len(re.findall(r"^- \[[ x]\] ", table, flags=re.M)) == (4 if "ours-int8-dynamic" in impls else 2)

    for impl, layer in (("ours-int8", "Int8Linear"), ("ours-int8-dynamic", "DynamicInt8Linear")):
        for model in ("gpt2-124m", "qwen3-0.6b"):  # each row loads its own kind of layer
            if impl in impls:
                assert type(int8_decode._load(impl, rows[(model, "ours-int8")]["dir"]).out_head).__name__ == layer

    # One measurement the real way: a fresh process, whose peak RSS includes the loaded model.
    spec = {k: rows[("gpt2-124m", "ours-int8")][k] for k in ("model", "impl", "dir", "vocab_size", "new_tokens")}
    real = int8_decode.run_worker(spec)
    assert real["peak_rss_mib"] >= real["rss_after_mib"] > 0 and real["tokens"] == rows[("gpt2-124m", "ours-int8")]["tokens"]


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        int8_decode.main(["--max-new-tokens", "0"])
    assert exc.value.code == 2
    assert "argument --max-new-tokens: must be a whole number >= 1" in capsys.readouterr().err
