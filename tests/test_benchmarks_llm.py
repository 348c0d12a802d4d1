"""benchmarks.llm runs end to end on a tiny Qwen3 and writes a well-formed report (no timing assertions)."""

import json
import re

import pytest

from benchmarks import llm


def test_quick_llm_benchmark_writes_tables_and_json(tmp_path, monkeypatch):
    # Measurements in this process (the harness is under test, not the speed); one real worker below.
    monkeypatch.setattr(llm, "run_worker", lambda spec: json.loads(json.dumps(llm.worker(spec))))
    assert llm.main(["--quick", "--max-new-tokens", "5", "--workdir", str(tmp_path / "work"),
                     "--out", str(tmp_path)]) == 0
    table = (tmp_path / "llm.md").read_text()
    for heading in ("## Cached greedy decoding", "## Loading", "## Goals"):
        assert heading in table
    for block in re.findall(r"(\|[^\n]+\|\n\|[-:| ]+\|\n(?:\|[^\n]+\|\n)+)", table):
        assert len({row.count("|") for row in block.strip().splitlines()}) == 1, block
    data = json.loads((tmp_path / "llm.json").read_text())
    gen = {(r["impl"], r["dtype"]): r for r in data["results"]["generate"]}
    assert len(gen) == 7 and all(len(r["tokens"]) == 5 and r["tokens_per_s"] > 0 for r in gen.values())
    # Same random weights, greedy: our two loops (with and without the decoding layout) and
    # transformers pick the same float32 tokens.
    assert gen[("ours", "float32")]["tokens"] == gen[("ours-stream", "float32")]["tokens"] \
        == gen[("ours-stored-layout", "float32")]["tokens"] == gen[("hf", "float32")]["tokens"]
    loads = data["results"]["load"]
    assert [(r["impl"], r["file_dtype"], r["dtype"]) for r in loads][-1] == ("ours", "float32", "bfloat16")

    # One measurement the real way: a fresh process, whose peak RSS includes the loaded model.
    spec = {**loads[0], "dir": str(tmp_path / "work" / "qwen3-tiny-float32")}
    real = llm.run_worker({k: spec[k] for k in ("vocab_size", "new_tokens", "kind", "impl", "dtype", "file_dtype",
                                                  "dir")})
    assert real["peak_rss_mib"] >= real["rss_before_mib"] > 0 and real["weights_mib"] > 0


def test_bad_arguments_are_one_line_errors(capsys):
    for argv, message in ((["--max-new-tokens", "0"], "argument --max-new-tokens: must be a whole number >= 1"),
                          (["--new-tokens", "5"], "unrecognized arguments: --new-tokens 5"),
                          (["--only", "decode"], "argument --only: invalid choice: 'decode'")):
        with pytest.raises(SystemExit) as exc:
            llm.main(["--quick", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
