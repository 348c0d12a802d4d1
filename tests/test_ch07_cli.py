"""Tests for ch07/cli.py: the run from scratch, from a chapter-5 file and the offline pretrained route,
Ctrl-C and exact resume, the settings and one-line errors of the command line."""

import json

import pytest
import torch

from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch06.cli import load_init_checkpoint
from ch07 import cli as ft
from ch07.gpt_instruction_finetuning import load_finetuned_model, load_instruction_data
from llmfs.checkpoint import save_checkpoint

TINY = {**GPT_CONFIG_124M, "context_length": 128, "emb_dim": 16, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0}


@pytest.fixture(scope="module")
def instruction_data():
    from llmfs.download import get_data_file

    return load_instruction_data(get_data_file("instruction-data.json", download=False))


def test_init_checkpoint_from_chapter5_files(tmp_path, instruction_data):
    torch.manual_seed(123)
    cfg = {**TINY, "qkv_bias": True, "n_layers": 2}
    model = GPTModel(cfg).eval()
    path = save_checkpoint(tmp_path / "checkpoint.pth", model, None, config=cfg)
    loaded = load_init_checkpoint(path).eval()
    x = torch.tensor([[1, 2, 3]])
    assert loaded.cfg["n_layers"] == 2 and torch.equal(loaded(x), model(x))
    with pytest.raises(FileNotFoundError, match="ch05.gpt_train --quick"):
        load_init_checkpoint(tmp_path / "missing.pth")
    # main() starts from it: one optimizer step, one answer.
    settings = {**ft.QUICK_SETTINGS, "batch_size": 4, "num_train": 4, "num_epochs": 1, "eval_freq": 1,
                "eval_iter": 1, "num_test": 1, "max_new_tokens": 2}
    result = ft.finetune(settings, tmp_path / "out", init_checkpoint=path, data=instruction_data[:20], device="cpu",
                     progress=False)
    assert result["model_path"].name == "init-sft.pth" and len(result["responses"]) == 1


def test_n_heads_settles_the_head_count_of_a_weights_only_init_checkpoint(tmp_path, instruction_data, capsys):
    torch.manual_seed(123)
    weights = tmp_path / "weights" / "model.pth"  # no config.json beside it
    weights.parent.mkdir()
    torch.save(GPTModel({**TINY, "n_heads": 4}).state_dict(), weights)
    # emb_dim 16 is no GPT-2 width: without --n-heads the head count cannot be told
    assert ft.main(["--init-checkpoint", str(weights), "--output-dir", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot tell the number of attention heads") and "--n-heads" in err
    settings = {**ft.QUICK_SETTINGS, "batch_size": 4, "num_train": 4, "num_epochs": 1, "eval_freq": 1,
                "eval_iter": 1, "num_test": 1, "max_new_tokens": 2}
    result = ft.finetune(settings, tmp_path / "b", init_checkpoint=weights, n_heads=4, data=instruction_data[:20],
                         device="cpu", progress=False)
    assert result["model"].cfg["n_heads"] == 4 and result["model_path"].name == "init-sft.pth"


def test_n_heads_without_an_init_checkpoint_is_refused(tmp_path, capsys):
    assert ft.main(["--quick", "--n-heads", "4", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == "error: --n-heads only applies to --init-checkpoint (a file without a config)\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--from-scratch"], "--quick and --from-scratch both choose a random-init model"),
    (["--quick", "--model", "gpt2-xl"], "--model gpt2-xl is not used with --quick"),
    (["--from-scratch", "--model", "gpt5"], "unknown GPT-2 model 'gpt5'"),
])
def test_model_options_that_would_be_ignored_are_refused(tmp_path, capsys, argv, message):
    """The same rule as chapter 6 (ch06.cli.check_model_source): no model option is silently dropped."""
    assert ft.main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_pretrained_unavailable_gives_clear_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    assert ft.main(["--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "gpt2-medium" in err
    assert "HF_ENDPOINT" in err and "--quick" in err and "--from-scratch" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "instruction-data-with-response.json").exists()


def test_settings_from_args():
    quick = ft.settings_from_args(ft.parser().parse_args(["--quick", "--lr", "0.01"]))
    assert quick["learning_rate"] == 0.01 and quick["num_test"] == 3 and quick["max_new_tokens"] == 32
    book = ft.settings_from_args(ft.parser().parse_args([]))
    assert (book["learning_rate"], book["weight_decay"], book["batch_size"], book["num_epochs"]) == (5e-5, 0.1, 8, 2)
    assert (book["eval_freq"], book["eval_iter"], book["max_new_tokens"]) == (5, 5, 256)


def test_tiny_end_to_end_fine_tune(tmp_path, instruction_data):
    settings = {**ft.QUICK_SETTINGS, "learning_rate": 1e-2, "batch_size": 4, "num_train": 16, "num_epochs": 2,
                "eval_freq": 2, "eval_iter": 1, "num_test": 2, "max_new_tokens": 6}
    result = ft.finetune(settings, tmp_path, cfg=TINY, data=instruction_data[:40], device="cpu",
                     mask_instructions=True, progress=False)
    losses = result["train_losses"]
    assert len(losses) == 1 + 4  # before training + every 2nd of 8 steps
    assert losses[-1] < losses[0] - 1.0
    records = json.loads(result["responses_path"].read_text())
    assert [r["instruction"] for r in records] == [e["instruction"] for e in instruction_data[34:36]]
    assert all(isinstance(r["model_response"], str) for r in records)
    assert result["plot_path"].is_file()
    model, meta = load_finetuned_model(result["model_path"])
    assert meta["config"] == TINY and meta["mask_instructions"] is True
    x = torch.tensor([[1, 2, 3]])
    result["model"].eval()
    assert torch.equal(model(x), result["model"](x))


def test_ctrl_c_then_resume_ends_with_the_same_model_and_answers(tmp_path, instruction_data, monkeypatch):
    import os
    import signal

    import llmfs.trainer as tr

    settings = {**ft.QUICK_SETTINGS, "learning_rate": 1e-2, "batch_size": 4, "num_train": 16, "num_epochs": 2,
                "eval_freq": 2, "eval_iter": 1, "num_test": 2, "max_new_tokens": 6}
    cfg = {**TINY, "drop_rate": 0.1}
    reference = ft.finetune(settings, tmp_path / "ref", cfg=cfg, data=instruction_data[:40], device="cpu",
                            progress=False)
    real, calls = ft.calc_loss_batch, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 6:  # a step in the second epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(ft, "calc_loss_batch", interrupting)
    with pytest.raises(tr.TrainingInterrupted) as info:
        ft.finetune(settings, tmp_path / "run", cfg=cfg, data=instruction_data[:40], device="cpu", progress=False)
    assert info.value.exit_code == 143
    monkeypatch.setattr(ft, "calc_loss_batch", real)
    resumed = ft.finetune(settings, tmp_path / "run", cfg=cfg, data=instruction_data[:40], device="cpu",
                          progress=False, resume=info.value.checkpoint)
    assert resumed["train_losses"][1:] == reference["train_losses"][1:]
    assert resumed["responses"] == reference["responses"]
    for name, value in reference["model"].state_dict().items():
        assert torch.equal(value, resumed["model"].state_dict()[name]), name


@pytest.mark.parametrize("bad", [["--max-new-tokens", "-1"], ["--lr", "inf"], ["--num-test", "0"],
                                 ["--prompt-style", "chatml"], ["--batch-size", "0"]])
def test_bad_arguments_fail_in_one_line_before_any_work(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        ft.main(["--quick", "--output-dir", str(tmp_path), *bad])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
