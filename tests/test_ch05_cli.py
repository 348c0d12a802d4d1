"""Tests for ch05/cli.py: the chapter-5 command lines (`python -m ch05.gpt_train`, `python -m
ch05.gpt_generate`), their one-line errors and the opt-in oneDNN path."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ch05 import gpt_download
from ch05.cli import download_main, generate_main, train_main, train_parser, train_settings
from ch05.gpt_generate import generate, load_model_for_generation

REPO = Path(__file__).resolve().parents[1]


# --- command line ----------------------------------------------------------------------------

TRAIN_CFG = {"vocab_size": 50257, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
             "drop_rate": 0.1, "qkv_bias": False}


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    from ch05.cli import pretrain
    from ch05.gpt_train import DEFAULT_SETTINGS
    from llmfs.download import get_data_file

    text = get_data_file("the-verdict.txt", download=False).read_text(encoding="utf-8")[:3000]
    out = tmp_path_factory.mktemp("trained")
    settings = {**DEFAULT_SETTINGS, "num_epochs": 1, "eval_freq": 5, "eval_iter": 1, "learning_rate": 1e-3}
    pretrain(TRAIN_CFG, settings, out, device="cpu", text=text, max_steps=8, progress=False)
    return out


def run_cli(capsys, *args, main=generate_main):
    try:
        rc = main(list(args))
    except SystemExit as exc:  # argparse's errors
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def reference_text(model, prompt="Every effort moves you", new=8):
    from ch02.tokenizer import get_gpt2_tokenizer
    from ch05.gpt_train import text_to_token_ids, token_ids_to_text

    tok = get_gpt2_tokenizer()
    out = generate(model, text_to_token_ids(prompt, tok), new, model.cfg["context_length"])
    return token_ids_to_text(out, tok)


def test_cli_generates_from_a_training_checkpoint(trained_dir, capsys):
    rc, out, err = run_cli(capsys, "--model", str(trained_dir / "checkpoint.pth"), "--max-new-tokens", "8",
                           "--device", "cpu")
    assert rc == 0, err
    model, _ = load_model_for_generation(trained_dir / "checkpoint.pth")
    assert model.cfg["emb_dim"] == 16 and not model.training
    assert out.rstrip("\n") == reference_text(model)
    assert out.startswith("Every effort moves you")


def test_cli_model_pth_with_and_without_config(trained_dir, capsys, tmp_path):
    rc, out_ckpt, err = run_cli(capsys, "--model", str(trained_dir / "checkpoint.pth"), "--max-new-tokens", "8")
    assert rc == 0, err
    # model.pth + config.json written by gpt_train.main; a folder works too
    for spec in (trained_dir / "model.pth", trained_dir):
        rc, out, err = run_cli(capsys, "--model", str(spec), "--max-new-tokens", "8", "--device", "cpu")
        assert rc == 0, err
        assert out == out_ckpt
    # a bare weights file: the config is inferred from the tensor shapes (n_heads given)
    bare = tmp_path / "weights.pth"
    bare.write_bytes((trained_dir / "model.pth").read_bytes())
    rc, out, err = run_cli(capsys, "--model", str(bare), "--max-new-tokens", "8", "--n-heads", "2")
    assert rc == 0, err
    assert out == out_ckpt


def test_cli_sampling_options_and_no_cache(trained_dir, capsys):
    common = ["--model", str(trained_dir / "checkpoint.pth"), "--max-new-tokens", "10",
              "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "5"]
    rc1, out1, _ = run_cli(capsys, *common)
    rc2, out2, _ = run_cli(capsys, *common, "--no-cache")
    rc3, out3, _ = run_cli(capsys, *common)
    assert rc1 == rc2 == rc3 == 0
    assert out1 == out2 == out3


def test_onednn_is_opt_in_and_keeps_the_tokens(trained_dir, capsys, onednn_products):
    common = ["--model", str(trained_dir / "checkpoint.pth"), "--max-new-tokens", "6", "--device", "cpu"]
    rc1, out1, _ = run_cli(capsys, *common)
    assert not onednn_products  # by default: PyTorch's own path
    rc2, out2, _ = run_cli(capsys, *common, "--onednn")
    assert onednn_products
    assert rc1 == rc2 == 0 and out1 == out2


def test_cli_reports_unavailable_weights_without_traceback(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = gpt_download.download_gpt2_safetensors
    monkeypatch.setattr(gpt_download, "download_gpt2_safetensors",
                        lambda name, cache_dir=None: real(name, cache_dir=tmp_path / "empty-cache"))
    rc, out, err = run_cli(capsys, "--model", "gpt2", "--max-new-tokens", "3")
    assert rc == 2
    assert "HF_ENDPOINT" in err and "Traceback" not in err
    rc, out, err = run_cli(capsys, "--model", str(tmp_path / "nowhere" / "model.safetensors"))
    assert rc == 2 and "not available" in err


def test_cli_rejects_bad_arguments(trained_dir, capsys):
    ckpt = str(trained_dir / "checkpoint.pth")
    for bad in (["--temperature", "-1"], ["--temperature", "1", "--top-k", "0"], ["--top-p", "1.5"],
                ["--max-new-tokens", "-1"], ["--prompt", ""], ["--temperature", "nan"]):
        rc, _, err = run_cli(capsys, "--model", ckpt, *bad)
        assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, (bad, err)


def test_cli_runs_as_a_module(trained_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "ch05.gpt_generate", "--model", str(trained_dir / "checkpoint.pth"),
         "--prompt", "Hello", "--max-new-tokens", "3", "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hello")


# --- python -m ch05.gpt_train ----------------------------------------------------------------------

def test_train_settings():
    from ch04.gpt import QUICK_CONFIG
    from ch05.gpt_train import QUICK_SETTINGS

    cfg, settings = train_settings(train_parser().parse_args(["--quick"]))
    assert cfg == QUICK_CONFIG and settings == QUICK_SETTINGS
    cfg, settings = train_settings(train_parser().parse_args([]))
    assert cfg["context_length"] == 256 and cfg["emb_dim"] == 768 and settings["num_epochs"] == 10
    cfg, settings = train_settings(train_parser().parse_args(["--quick", "--epochs", "2", "--lr", "0.01",
                                                              "--context-length", "32", "--seed", "1"]))
    assert (settings["num_epochs"], settings["learning_rate"], settings["seed"]) == (2, 0.01, 1)
    assert cfg["context_length"] == 32 and QUICK_CONFIG["context_length"] == 64  # no mutation
    assert train_parser().parse_args([]).release_freed_memory is False
    assert train_parser().parse_args([]).onednn is False


def test_drop_rate_and_warmup_steps():
    """--drop-rate sets the model's dropout; --warmup-steps raises the rate linearly to --lr (step k
    trains at lr * min(1, (k + 1) / (N + 1))), from the optimizer's own step count, so a resumed run
    (a new optimizer loaded with the old state) goes on where it stopped."""
    import torch

    from ch05.cli import add_warmup

    cfg, settings = train_settings(train_parser().parse_args(["--quick"]))
    assert "warmup_steps" not in settings  # a run without it keeps its settings (and its checkpoints resume)
    cfg, settings = train_settings(train_parser().parse_args(["--quick", "--drop-rate", "0", "--warmup-steps", "3"]))
    assert cfg["drop_rate"] == 0.0 and settings["warmup_steps"] == 3

    def rates(steps, state=None):
        w = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.AdamW([w], lr=0.123)
        if state is not None:
            opt.load_state_dict(state)
        add_warmup(opt, 0.01, 3)
        seen = []
        for _ in range(steps):
            w.sum().backward()
            opt.step()
            seen.append(opt.param_groups[0]["lr"])
        return seen, opt.state_dict()

    seen, state = rates(2)
    assert seen == [0.01 * 1 / 4, 0.01 * 2 / 4]
    more, _ = rates(3, state)
    assert more == [0.01 * 3 / 4, 0.01, 0.01]


@pytest.mark.parametrize("bad", [["--lr", "nan"], ["--lr", "inf"], ["--lr", "0"], ["--batch-size", "0"],
                                 ["--epochs", "0"], ["--eval-freq", "0"], ["--context-length", "0"],
                                 ["--context-length", "4096"], ["--max-steps", "0"], ["--epochs", "two"],
                                 ["--drop-rate", "-0.1"], ["--drop-rate", "1"], ["--warmup-steps", "-1"]])
def test_train_cli_rejects_bad_values_in_one_line(bad, capsys, tmp_path):
    rc, out, err = run_cli(capsys, "--quick", "--output-dir", str(tmp_path), *bad, main=train_main)
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_train_cli_with_onednn_routes_the_linear_layers(capsys, tmp_path, monkeypatch, onednn_products):
    import ch05.cli as tr

    seen = []
    real_train = tr.train

    def spy(*args, **kwargs):  # two steps are enough to see the routing
        seen.append(1)
        return real_train(*args, **{**kwargs, "max_steps": 2})

    monkeypatch.setattr(tr, "train", spy)
    rc, out, err = run_cli(capsys, "--quick", "--epochs", "1", "--output-dir", str(tmp_path / "a"),
                           "--no-progress", main=train_main)
    assert rc == 0, err
    assert seen and not onednn_products
    rc, out, err = run_cli(capsys, "--quick", "--epochs", "1", "--output-dir", str(tmp_path / "b"),
                           "--no-progress", "--onednn", main=train_main)
    assert rc == 0, err
    assert onednn_products


def test_train_cli_runs_as_a_module(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ch05.gpt_train", "--quick", "--epochs", "1", "--max-steps", "2",
         "--output-dir", str(tmp_path), "--no-progress", "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "model.pth").is_file() and "wrote" in proc.stdout


# --- checks before the work; never overwrite a finished run ------------------------------------

def one_error_line(rc, err):
    lines = [line for line in err.splitlines() if line.strip()]
    return rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err


def test_unwritable_output_dir_fails_in_seconds_before_training(tmp_path, capsys, monkeypatch):
    import ch05.cli

    calls = []
    monkeypatch.setattr(ch05.cli, "pretrain", lambda *a, **k: calls.append(a))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    targets = [blocker / "out"]
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder only stops other users
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        targets.append(locked / "out")
    for target in targets:
        start = time.perf_counter()
        rc, out, err = run_cli(capsys, "--quick", "--output-dir", str(target), main=train_main)
        assert one_error_line(rc, err), err
        assert "cannot be written" in err and str(target) in err and time.perf_counter() - start < 5
    assert calls == []


def test_epochs_0_refused_and_a_finished_model_needs_overwrite(trained_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_dir, run_dir)
    before = (run_dir / "model.pth").read_bytes()
    rc, out, err = run_cli(capsys, "--quick", "--epochs", "0", "--output-dir", str(run_dir), main=train_main)
    assert one_error_line(rc, err) and "--epochs" in err
    rc, out, err = run_cli(capsys, "--quick", "--epochs", "1", "--output-dir", str(run_dir), main=train_main)
    assert one_error_line(rc, err) and "already holds a trained model (model.pth)" in err and "--overwrite" in err
    assert (run_dir / "model.pth").read_bytes() == before
    rc, out, err = run_cli(capsys, "--quick", "--epochs", "1", "--max-steps", "1", "--output-dir", str(run_dir),
                           "--overwrite", "--no-progress", "--device", "cpu", main=train_main)
    assert rc == 0, err
    assert (run_dir / "model.pth").read_bytes() != before
    assert f"wrote {run_dir / 'model.pth'}" in out


def test_an_interrupted_run_needs_resume_or_overwrite(trained_dir, tmp_path, capsys):
    """A folder holding only checkpoint.pth (what Ctrl-C leaves) is not silently started over."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(trained_dir / "checkpoint.pth", run_dir / "checkpoint.pth")
    before = (run_dir / "checkpoint.pth").read_bytes()
    rc, out, err = run_cli(capsys, "--quick", "--max-steps", "1", "--output-dir", str(run_dir), main=train_main)
    assert one_error_line(rc, err) and "holds checkpoint.pth of an earlier run that did not finish" in err
    assert f"--resume {run_dir / 'checkpoint.pth'}" in err and "--overwrite" in err
    assert (run_dir / "checkpoint.pth").read_bytes() == before and not (run_dir / "model.pth").exists()
    rc, out, err = run_cli(capsys, "--quick", "--max-steps", "1", "--output-dir", str(run_dir), "--overwrite",
                           "--no-progress", "--device", "cpu", main=train_main)
    assert rc == 0, err
    assert (run_dir / "checkpoint.pth").read_bytes() != before and (run_dir / "model.pth").exists()


def test_an_empty_output_dir_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "--quick", "--output-dir", "", main=train_main)
    assert one_error_line(rc, err) and "--output-dir is empty" in err
    assert list(tmp_path.iterdir()) == []


def test_a_diverging_run_stops_in_one_line_and_writes_no_model(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc, out, err = run_cli(capsys, "--quick", "--lr", "1e30", "--max-steps", "6", "--checkpoint-every", "1",
                           "--output-dir", str(run_dir), "--no-progress", "--device", "cpu", main=train_main)
    assert one_error_line(rc, err) and "training diverged at step 2: the training loss is nan" in err
    assert "lower learning rate (this run used 1e+30)" in err
    assert f"the last checkpoint, {run_dir / 'checkpoint.pth'}, is kept" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pth"]  # no model.pth, config or plot
    import torch

    state = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert state["global_step"] == 0 and all(torch.isfinite(t).all() for t in state["model_state_dict"].values())


def test_onednn_and_bfloat16_together_are_refused(capsys):
    rc, out, err = run_cli(capsys, "--quick", "--onednn", "--dtype", "bfloat16", main=train_main)
    assert one_error_line(rc, err) and "--onednn" in err and "--dtype bfloat16" in err


def test_stale_temporary_files_are_removed_at_the_start(tmp_path, capsys):
    from llmfs.cli import check_output_dir

    dead = tmp_path / f".checkpoint.pth.{2 ** 22 + 99}.abc123.partial.pth"
    dead.write_bytes(b"1.5 GB of a killed write")
    mine = tmp_path / "keep.partial"
    mine.write_text("not ours")
    check_output_dir(tmp_path)
    assert not dead.exists() and mine.exists()
    assert "removed 1 temporary file" in capsys.readouterr().err


def test_resume_says_where_it_resumed_and_refuses_other_settings(trained_dir, tmp_path, capsys):
    from ch05.cli import pretrain
    from ch05.gpt_train import DEFAULT_SETTINGS
    from llmfs.checkpoint import CheckpointMismatchError
    from llmfs.download import get_data_file

    text = get_data_file("the-verdict.txt", download=False).read_text(encoding="utf-8")[:3000]
    settings = {**DEFAULT_SETTINGS, "num_epochs": 1, "eval_freq": 5, "eval_iter": 1, "learning_rate": 1e-3}
    ckpt = tmp_path / "checkpoint.pth"
    shutil.copy(trained_dir / "checkpoint.pth", ckpt)
    with pytest.raises(CheckpointMismatchError) as info:
        pretrain(TRAIN_CFG, {**settings, "learning_rate": 5e-4, "batch_size": 4}, tmp_path, device="cpu",
                 text=text, resume=ckpt, progress=False, sample_tokens=0)
    assert "batch_size: checkpoint 2, now 4" in str(info.value) and "learning_rate: checkpoint 0.001, now 0.0005" in str(info.value)
    with pytest.raises(CheckpointMismatchError, match="model emb_dim: checkpoint 16, now 32"):
        pretrain({**TRAIN_CFG, "emb_dim": 32}, settings, tmp_path, device="cpu", text=text, resume=ckpt,
                 progress=False, sample_tokens=0)
    capsys.readouterr()
    pretrain(TRAIN_CFG, settings, tmp_path, device="cpu", text=text, resume=ckpt, max_steps=9, progress=False,
             sample_tokens=0)
    out = capsys.readouterr().out
    assert f"resumed from {ckpt} at epoch 1, step 8 (8 of the epoch's 21 batches done)" in out
    assert f"checkpoints go to {ckpt}" in out and "wrote" in out


def test_resume_file_errors_are_one_line(tmp_path, capsys):
    for name, data in [("empty.pth", b""), ("notes.pth", b"my notes\n"), ("bad.safetensors", b"\xff" * 50)]:
        (tmp_path / name).write_bytes(data)
        rc, out, err = run_cli(capsys, "--quick", "--output-dir", str(tmp_path / "out"), "--resume",
                               str(tmp_path / name), main=train_main)
        assert one_error_line(rc, err) and name in err, err


# --- files that are not what they should be: one line from every command that reads them ----------------

class NotATensor:
    """An arbitrary object in a .pth: torch.load(weights_only=True) refuses to rebuild it."""


def write_bad_model_files(folder: Path) -> dict[str, Path]:
    """Files a user might pass as a model or checkpoint that cannot be one (name -> path, and what the
    error names). Shared with the chapter-6 tests."""
    import json

    import torch
    from safetensors.torch import save_file

    from ch04.gpt import GPTModel
    from llmfs.checkpoint import save_checkpoint, save_model

    tiny = {"vocab_size": 50257, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0,
            "qkv_bias": False}
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = GPTModel(tiny)
    files = {}

    def beside_config(name: str, cfg) -> None:
        save_model(model, folder / name / "model.pth")
        (folder / name / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        files[name] = folder / name / "model.pth"

    torch.save({"x": NotATensor()}, folder / "pickle-payload.pth")
    torch.save([torch.zeros(2)], folder / "a-list.pth")
    torch.save({"a": 1, "b": "x"}, folder / "not-tensors.pth")
    torch.save({"model_state_dict": [1, 2]}, folder / "weights-a-list.pth")
    save_model(model, folder / "whole.safetensors")
    raw = (folder / "whole.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(raw[:-100])
    save_model(model, folder / "whole.pth")
    raw = (folder / "whole.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(raw[:len(raw) // 2])
    save_file({"tok_emb.weight": torch.zeros(4, 8)}, str(folder / "meta-not-json.safetensors"),
              metadata={"config": "{oops"})
    files.update({p.name.replace(".", "-"): p for p in folder.glob("*.*") if not p.stem.startswith("whole")})
    beside_config("config-missing-key", {k: v for k, v in tiny.items() if k != "n_heads"})
    beside_config("config-string-size", {**tiny, "emb_dim": "8"})
    beside_config("config-heads-do-not-divide", {**tiny, "n_heads": 3})
    beside_config("config-not-json", "{not json")
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(folder / "checkpoint-bad-config.pth", model, opt, config={**tiny, "n_layers": "one"})
    files["checkpoint-bad-config"] = folder / "checkpoint-bad-config.pth"
    (folder / "hf-broken-config").mkdir()
    save_file({"wte.weight": torch.zeros(10, 8), "wpe.weight": torch.zeros(4, 8)},
              str(folder / "hf-broken-config" / "model.safetensors"))
    (folder / "hf-broken-config" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    files["hf-broken-config"] = folder / "hf-broken-config"
    return files


BAD_MODEL_FILES = ["pickle-payload-pth", "a-list-pth", "not-tensors-pth", "weights-a-list-pth", "truncated-pth",
                   "truncated-safetensors", "meta-not-json-safetensors",
                   "config-missing-key", "config-string-size", "config-heads-do-not-divide", "config-not-json",
                   "checkpoint-bad-config", "hf-broken-config"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return write_bad_model_files(tmp_path_factory.mktemp("bad-models"))


@pytest.mark.parametrize("name", BAD_MODEL_FILES)
def test_generate_model_that_cannot_be_one_is_one_line(name, bad_files, capsys):
    """Before, several of these were a TypeError, KeyError or UnpicklingError traceback from deep inside."""
    rc, out, err = run_cli(capsys, "--model", str(bad_files[name]), "--max-new-tokens", "1", "--device", "cpu")
    assert one_error_line(rc, err), err
    assert out == ""


def test_generate_errors_name_the_file(bad_files, capsys):
    for name in ("truncated-pth", "truncated-safetensors", "pickle-payload-pth", "config-string-size"):
        rc, _, err = run_cli(capsys, "--model", str(bad_files[name]), "--device", "cpu")
        assert one_error_line(rc, err) and str(bad_files[name]) in err, err


@pytest.mark.parametrize("name", ["pickle-payload-pth", "a-list-pth", "not-tensors-pth", "weights-a-list-pth",
                                  "truncated-pth", "truncated-safetensors", "config-string-size",
                                  "checkpoint-bad-config"])
def test_resume_from_what_cannot_be_a_checkpoint_is_one_line(name, bad_files, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "--quick", "--output-dir", str(tmp_path / "out"), "--resume",
                           str(bad_files[name]), "--no-progress", main=train_main)
    assert one_error_line(rc, err), err
    assert not (tmp_path / "out" / "model.pth").exists()


def test_resume_from_the_books_model_and_optimizer_file_is_one_line(tmp_path, capsys):
    """The book's chapter-5 file holds weights and optimizer state, not where training stopped."""
    import torch

    from ch04.gpt import QUICK_CONFIG, GPTModel

    model = GPTModel(QUICK_CONFIG)
    torch.save({"model_state_dict": model.state_dict(),
                "optimizer_state_dict": torch.optim.AdamW(model.parameters()).state_dict()},
               tmp_path / "model_and_optimizer.pth")
    rc, _, err = run_cli(capsys, "--quick", "--output-dir", str(tmp_path / "out"), "--resume",
                         str(tmp_path / "model_and_optimizer.pth"), "--no-progress", main=train_main)
    assert one_error_line(rc, err) and "lacks the training state" in err, err


def test_context_longer_than_the_validation_text_is_one_line(tmp_path, capsys):
    """the-verdict's validation tenth has ~530 tokens: --context-length 1024 cannot cut one window from it
    (before: chapter 2's ValueError as a traceback)."""
    rc, out, err = run_cli(capsys, "--quick", "--context-length", "1024", "--output-dir", str(tmp_path),
                           main=train_main)
    assert one_error_line(rc, err) and "validation split" in err and "context_length 1024" in err, err
    assert not (tmp_path / "model.pth").exists()


def test_generate_n_heads_that_does_not_divide_is_one_line(trained_dir, capsys):
    rc, _, err = run_cli(capsys, "--model", str(trained_dir / "checkpoint.pth"), "--n-heads", "3")
    assert one_error_line(rc, err) and "n_heads 3 does not divide" in err, err


@pytest.mark.parametrize("args", [["gpt5"], ["gpt2", "355"], ["--cache-dir"]])
def test_download_bad_names_are_one_line(args, capsys):
    rc, out, err = run_cli(capsys, *args, main=download_main)
    assert one_error_line(rc, err), err


def test_download_unwritable_cache_dir_and_offline_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    rc, _, err = run_cli(capsys, "gpt2", "--cache-dir", str(tmp_path / "file" / "cache"), main=download_main)
    assert one_error_line(rc, err) and "--cache-dir" in err, err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = run_cli(capsys, "gpt2", "--cache-dir", str(tmp_path / "empty"), main=download_main)
    assert rc == 2 and err.startswith("error:") and "HF_HUB_OFFLINE" in err and "Traceback" not in err
