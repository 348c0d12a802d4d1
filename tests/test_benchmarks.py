"""The benchmark harness runs end to end on a tiny config and writes a well-formed report.

No timing assertions: speed is reported by the benchmark itself, not tested.
"""

import json
import re

import pytest

from benchmarks import run


def test_quick_benchmark_writes_table_and_json(tmp_path, monkeypatch):
    # A second training shape "too big for this machine" is skipped and reported, not fatal.
    estimate = run.train_memory_gib
    monkeypatch.setattr(run, "train_memory_gib", lambda spec: 1e6 if spec["batch"] == 8 else estimate(spec))
    assert run.main(["--quick", "--train-shapes", "2x32,8x32", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| ours | 8 x 32 | | skipped: needs ~" in table
    assert "the fastest of 1 separate processes; freed memory kept for reuse" in table
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
    assert {r["impl"] for r in train} == {"ours", "hf", "ours-onednn", "ours-untied", "ours-explicit"}
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
    assert {r["impl"] for r in train} == {"ours", "hf", "ours-onednn", "ours-untied", "ours-explicit"}
    assert all("needs ~" in r["skipped"] for r in train)


def test_memory_estimate_grows_with_context_squared():
    cfg = run.GPT_CONFIG_124M
    small = run.train_memory_gib({"cfg": cfg, "batch": 2, "ctx": 256})
    big = run.train_memory_gib({"cfg": cfg, "batch": 8, "ctx": 1024})
    assert 2 < small < 6  # measured peak at 2 x 256: ~3.2-3.8 GiB
    assert big > 20  # 8 x 1024 was killed for lack of memory on a 24 GiB machine


def test_repeated_measurements_run_in_rounds_and_keep_the_fastest(monkeypatch):
    calls = []
    speeds = iter([100.0, 50.0, 90.0, 70.0])  # A1, B1, A2, B2

    def fake_worker(spec):
        calls.append(spec["impl"])
        return {**spec, "tokens_per_s": next(speeds)}

    monkeypatch.setattr(run, "run_worker", fake_worker)
    specs = [{"kind": "generate", "impl": "ours"}, {"kind": "generate", "impl": "hf"}]
    results = run.measure_section("generate", specs, repeats=2, keep_freed_memory=False)
    assert calls == ["ours", "hf", "ours", "hf"]  # rounds, not one model twice in a row
    assert [r["tokens_per_s"] for r in results] == [100.0, 70.0]
    assert results[1]["runs_tokens_per_s"] == [50.0, 70.0]
    assert all(r["keep_freed_memory"] is False for r in results)


def test_worker_applies_the_trainers_memory_setting_only_when_asked():
    import subprocess
    import sys

    spec = {"kind": "train", "impl": "ours", "cfg": run.TINY_CONFIG, "dtype": "float32", "warmup": 1, "steps": 1,
            "batch": 1, "ctx": 8}
    kept = {}
    for flag in (True, False):
        out = subprocess.run([sys.executable, "-m", "benchmarks.worker", json.dumps({**spec, "keep_freed_memory": flag})],
                             capture_output=True, text=True, check=True).stdout
        kept[flag] = json.loads(out.split("RESULT ", 1)[1])["freed_memory_kept"]
    assert kept[False] is False
    assert kept[True] is (sys.platform.startswith("linux"))  # mallopt exists with glibc (the CI machine)


def test_our_models_train_as_the_trainer_does_and_hf_as_it_comes():
    import torch

    import llmfs.onednn_linear as ol
    from benchmarks.worker import train_context

    def ctx(impl, dtype="float32"):
        return train_context({"impl": impl, "dtype": dtype})

    assert isinstance(ctx("ours-onednn"), ol._LinearToOneDNN) == ol.onednn_linear_supported()
    for impl in ("ours", "ours-untied", "hf"):  # PyTorch's default path unless asked for
        assert not isinstance(ctx(impl), ol._LinearToOneDNN)
    for impl in ("ours", "hf"):
        with ctx(impl, "bfloat16"):
            assert torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("argv, message", [
    (["--only", "bogus"], "argument --only: unknown section(s) 'bogus'; choose from train, generate, scaling, amp"),
    (["--only", "train,amp,trian"], "argument --only: unknown section(s) 'trian'"),
    (["--train-shapes", "2x256,8y1024"], "argument --train-shapes: '8y1024' is not BATCHxCONTEXT"),
    (["--train-shapes", "0x16"], "argument --train-shapes: '0x16' is not BATCHxCONTEXT"),
    (["--quick", "--train-shapes", "2x128"], "argument --train-shapes: a context longer than the model's 64 tokens"),
    (["--repeats", "0"], "argument --repeats: must be a whole number >= 1, got 0"),
])
def test_bad_arguments_are_one_line_errors_before_any_measurement(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run, "run_worker", lambda spec: pytest.fail("measured despite a bad argument"))
    with pytest.raises(SystemExit) as exc:
        run.main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_out_folder_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run, "run_worker", lambda spec: pytest.fail("measured before --out was checked"))
    (tmp_path / "file").write_text("not a folder")
    assert run.main(["--only", "train", "--out", str(tmp_path / "file" / "results")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "cannot be written" in err and err.count("\n") == 1


@pytest.mark.parametrize("module, argv", [
    ("benchmarks.run", ["--out", ""]), ("benchmarks.llm", ["--out", " "]), ("benchmarks.llm", ["--workdir", ""]),
    ("benchmarks.bpe", ["--out", ""]), ("benchmarks.serve", ["--out", ""]),
    ("benchmarks.inference", ["--out", ""]), ("benchmarks.inference", ["--workdir", ""]),
    ("benchmarks.int8_decode", ["--out", ""]), ("benchmarks.ch05_run", ["--out", ""]),
])
def test_an_empty_folder_or_file_option_is_refused_not_taken_as_the_current_folder(module, argv, capsys):
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err == f"error: argument {argv[0]}: is empty; name a file or folder (see --help)\n"
