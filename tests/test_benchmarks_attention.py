"""benchmarks/attention.py runs end to end on tiny sizes and writes a well-formed report.

No timing assertions (speed is what the benchmark reports); the equality checks it makes are asserted, every
implementation has its rows and its memory measurements, the GPU columns say "no GPU" without CUDA (and the
table code for a GPU run is exercised with a made-up GPU result), and bad arguments give one-line errors.
"""

import copy
import json
import re

import pytest
import torch

from benchmarks import attention


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention")
    assert attention.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))


def table_blocks(table: str) -> list[str]:
    return re.findall(r"(\|[^\n]+\|\n\|[-:| ]+\|\n(?:\|[^\n]+\|\n)+)", table)


def test_quick_attention_benchmark_writes_table_and_json(quick_run):
    out, data = quick_run
    table = (out / "results.md").read_text(encoding="utf-8")
    blocks = table_blocks(table)
    assert len(blocks) == 1
    rows = blocks[0].strip().splitlines()
    assert len({row.count("|") for row in rows}) == 1, blocks[0]
    assert len(rows) == 2 + len(attention.VARIANTS)
    assert data["machine"]["cpu"] in table and "## Goals" in table
    assert data["quick"] and data["config"] == attention.QUICK
    cpu = data["results"]["cpu"]
    assert set(cpu["rows"]) == set(attention.VARIANTS) and cpu["dtype"] == "float32"
    for key, row in cpu["rows"].items():
        if "skipped" in row:  # only FlexAttention may be skipped, with the reason
            assert key == "flex" and row["skipped"]
            continue
        assert row["equal"], (key, row)
        assert row["out_error"] <= attention.TOLERANCE["float32"]
        assert len(row["forward_s"]) == attention.QUICK["repeats"] and row["forward_median_s"] > 0
        if "train_skipped" in row:
            assert key == "flex" and "backward" in row["train_skipped"]
        else:
            assert row["grad_error"] <= attention.TOLERANCE["float32"] and row["train_median_s"] > 0
    memory = data["results"]["cpu_memory"]
    for key, row in cpu["rows"].items():
        modes = [] if "skipped" in row else ["forward"] + ([] if "train_skipped" in row else ["train"])
        for mode in modes:
            assert memory[f"{key}/{mode}"] >= 0
    assert all(r["peak_reset"] for r in data["results"]["cpu_memory_runs"])


def test_gpu_columns(quick_run):
    _, data = quick_run
    results = data["results"]
    assert results["gpu_name"] == ("not run" if torch.cuda.is_available() else "no GPU")
    assert "gpu" not in results
    # The GPU columns as a CUDA run fills them: the CPU's figures relabelled, in bfloat16.
    fake = {**results, "gpu_name": "Made-up GPU", "gpu": copy.deepcopy(results["cpu"])}
    fake["gpu"].update(device="cuda", dtype="bfloat16", tolerance=attention.TOLERANCE["bfloat16"])
    for row in fake["gpu"]["rows"].values():
        row["forward_peak_mib"] = row["train_peak_mib"] = 1.0
    table, goals = attention.summarize(fake, data["machine"], data["config"], quick=True)
    block = table_blocks(table)[0].strip().splitlines()
    assert len({row.count("|") for row in block}) == 1
    assert "Made-up GPU" in table and "no GPU" not in table and "; GPU: yes" in table
    assert any(text.startswith("GPU: every implementation") for text, _ in goals)
    plain, _ = attention.summarize(results, data["machine"], data["config"], quick=True)
    assert all(row.endswith(f"| {results['gpu_name']} | {results['gpu_name']} | {results['gpu_name']} |")
               for row in table_blocks(plain)[0].strip().splitlines()[2:])


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "error: argument --batch: must be a whole number >= 1, got 0 (see --help)\n"),
    (["--only", "nope"], "error: argument --only: unknown implementation(s) ['nope']; choose from "
                         + ", ".join(attention.VARIANTS) + " (see --help)\n"),
    (["--device", "tpu"], None),
])
def test_bad_arguments_give_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        attention.main(["--quick", "--out", str(tmp_path), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    if message:
        assert err == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys):
    assert attention.main(["--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith("error: --device cuda: CUDA is not available on this machine; use "
                                            "--device auto or cpu\n")
