"""Tests for ch06/cli.py (and the shared llmfs/finetuning.py): the script's routes (pretrained offline,
a tiny local GPT-2, from scratch, from a chapter-5 file), one real offline fine-tuning run (the slow test),
Ctrl-C and exact resume, and the command line's one-line errors."""

import pytest
import torch

from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch05.gpt_download import PretrainedWeightsUnavailable
from ch06.cli import (
    BOOK_SETTINGS,
    QUICK_SETTINGS,
    finetune,
    load_init_checkpoint,
    main,
    parser,
    settings_from_args,
)
from ch06.gpt_class_finetune import calc_accuracy_loader, load_classifier
from llmfs.checkpoint import save_checkpoint, save_model
from llmfs.runtime import set_seed
from llmfs.trainer import TrainingInterrupted

TINY = {**GPT_CONFIG_124M, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0}


def write_tiny_gpt2_checkpoint(folder, emb_dim=16, n_layers=2, n_heads=2, n_positions=300, vocab_size=50257):
    """A random GPT-2 in the Hugging Face file layout (model.safetensors + config.json), as chapter 5 reads it."""
    import json

    from safetensors.torch import save_file

    d = emb_dim
    shapes = {"wte.weight": (vocab_size, d), "wpe.weight": (n_positions, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(n_layers):
        shapes.update({f"h.{i}.{name}": shape for name, shape in {
            "ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
            "mlp.c_fc.weight": (d, 4 * d), "mlp.c_fc.bias": (4 * d,),
            "mlp.c_proj.weight": (4 * d, d), "mlp.c_proj.bias": (d,)}.items()})
    folder.mkdir(parents=True)
    save_file({k: torch.randn(shape) * 0.02 for k, shape in shapes.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": vocab_size, "n_positions": n_positions, "n_embd": d,
        "n_layer": n_layers, "n_head": n_heads}))
    return folder


@pytest.mark.filterwarnings("ignore:the file stores no config")  # the guess is what is tested
def test_init_from_chapter5_files(tmp_path):
    from ch04.gpt import QUICK_CONFIG

    set_seed(123)
    lm = GPTModel({**QUICK_CONFIG, "n_layers": 1})
    save_model(lm, tmp_path / "model.pth")            # weights only: the config is read from the shapes
    save_checkpoint(tmp_path / "checkpoint.pth", lm, None, config={**lm.cfg, "drop_rate": 0.3})
    for name in ("model.pth", "checkpoint.pth"):
        model = load_init_checkpoint(tmp_path / name)
        assert model.cfg["n_heads"] == QUICK_CONFIG["n_heads"] and model.cfg["n_layers"] == 1
        assert model.cfg["drop_rate"] == 0.0
        torch.testing.assert_close(model.tok_emb.weight, lm.tok_emb.weight)
    odd = GPTModel({**TINY, "emb_dim": 24})
    save_model(odd, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="--n-heads"):
        load_init_checkpoint(tmp_path / "odd.pth")
    assert load_init_checkpoint(tmp_path / "odd.pth", n_heads=3).cfg["n_heads"] == 3


def test_pretrained_route_offline_explains_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(PretrainedWeightsUnavailable, match="HF_ENDPOINT") as info:
        finetune(dict(QUICK_SETTINGS), tmp_path / "out", mode="pretrained", progress=False)
    assert "--quick" in str(info.value)
    assert main(["--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "--from-scratch" in capsys.readouterr().err


def test_pretrained_route_with_a_local_gpt2_checkpoint(tmp_path):
    """The book's route end to end, with a tiny random GPT-2 in Hugging Face format instead of the real weights."""
    torch.manual_seed(0)
    folder = write_tiny_gpt2_checkpoint(tmp_path / "tiny-gpt2")
    settings = {**QUICK_SETTINGS, "trainable": "last_block", "num_epochs": 1, "max_length": None, "batch_size": 32,
                "eval_freq": 100, "eval_iter": 2}
    result = finetune(settings, tmp_path / "out", mode="pretrained", model_name=str(folder),
                  device="cpu", progress=False)
    model = result["model"]
    assert model.trf_blocks[0].att.W_query.weight.requires_grad is False
    assert model.out_head.weight.shape == (2, 16)
    assert len(result["train_accs"]) == 1 and result["examples_seen"] == (1045 // 32) * 32
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"review_classifier.pth", "review_classifier.json",
                                                              "loss-plot.png", "accuracy-plot.png", "train.csv"}
    # GPT-2's config ties the output head to the token embedding; the saved classifier still reloads exactly
    loaded, meta = load_classifier(result["model_path"])
    assert meta["config"]["tie_weights"] is True and meta["max_length"] == 120
    assert calc_accuracy_loader(result["loaders"][2], loaded, "cpu") == result["accuracies"]["test"]


def test_cli_settings_and_from_scratch_route(tmp_path):
    mode, settings = settings_from_args(parser().parse_args(["--quick", "--epochs", "2", "--lr", "3e-4"]))
    assert mode == "quick" and settings["num_epochs"] == 2 and settings["learning_rate"] == 3e-4
    assert settings["trainable"] == "all" and settings["max_length"] == 64
    mode, settings = settings_from_args(parser().parse_args([]))
    assert mode == "pretrained" and settings == BOOK_SETTINGS
    assert (settings["learning_rate"], settings["batch_size"], settings["num_epochs"]) == (5e-5, 8, 5)
    mode, settings = settings_from_args(parser().parse_args(["--from-scratch", "--trainable", "last_block"]))
    assert mode == "scratch" and settings["trainable"] == "last_block"

    tiny = {**TINY, "context_length": 64}
    result = finetune({**QUICK_SETTINGS, "num_epochs": 1, "batch_size": 32, "eval_freq": 100}, tmp_path,
                  mode="scratch", cfg=tiny, device="cpu", progress=False)
    assert all(p.requires_grad for p in result["model"].parameters())
    assert result["max_length"] == 64


def test_quick_offline_fine_tuning_reaches_85_percent(tmp_path):
    """SLOW (about 20-60 s on two CPU cores): the offline quick path, random init, fixed seed.

    This is the accuracy the README quotes for the offline route; it measures ~96% test accuracy.
    """
    result = finetune(dict(QUICK_SETTINGS), tmp_path, mode="quick", device="cpu", progress=False)
    assert result["accuracies"]["test"] >= 0.85
    assert result["accuracies"]["validation"] >= 0.85
    assert len(result["train_accs"]) == QUICK_SETTINGS["num_epochs"]
    # the saved classifier gives the same answers
    loaded, meta = load_classifier(result["model_path"])
    test_loader = result["loaders"][2]
    assert calc_accuracy_loader(test_loader, loaded, "cpu") == result["accuracies"]["test"]


def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_ends_with_the_same_classifier(tmp_path, monkeypatch):
    import os
    import signal

    import ch06.cli as cc

    tiny = {**TINY, "context_length": 64, "drop_rate": 0.1}
    settings = {**QUICK_SETTINGS, "num_epochs": 2, "batch_size": 32, "eval_freq": 10, "eval_iter": 1}
    reference = finetune(settings, tmp_path / "ref", mode="scratch", cfg=tiny, device="cpu", progress=False)

    real_loss, calls = cc.book.calc_loss_batch, []

    def interrupting_loss(*args):
        calls.append(1)
        if len(calls) == 40:  # in the second epoch
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args)

    monkeypatch.setattr(cc.book, "calc_loss_batch", interrupting_loss)
    with pytest.raises(TrainingInterrupted) as info:
        finetune(settings, tmp_path / "run", mode="scratch", cfg=tiny, device="cpu", progress=False)
    assert info.value.checkpoint == tmp_path / "run" / "checkpoint.pth"
    monkeypatch.setattr(cc.book, "calc_loss_batch", real_loss)
    resumed = finetune(settings, tmp_path / "run", mode="scratch", cfg=tiny, device="cpu", progress=False,
                       resume=info.value.checkpoint)
    for key in ("train_losses", "val_losses", "train_accs", "val_accs", "examples_seen", "accuracies"):
        assert resumed[key] == reference[key], key
    for name, value in reference["model"].state_dict().items():
        assert torch.equal(value, resumed["model"].state_dict()[name]), name


@pytest.mark.parametrize("bad", [["--lr", "nan"], ["--epochs", "0"], ["--eval-freq", "0"], ["--batch-size", "-1"],
                                 ["--max-length", "0"], ["--trainable", "everything"]])
def test_bad_arguments_fail_in_one_line(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--quick", "--output-dir", str(tmp_path), *bad])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


# --- bad model sources: one line, before any training --------------------------------------------------

def run_main(capsys, *args):
    try:
        rc = main(list(args))
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err


def one_error_line(rc, err) -> bool:
    lines = [line for line in err.splitlines() if line.strip()]
    return rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    from test_ch05_cli import write_bad_model_files

    return write_bad_model_files(tmp_path_factory.mktemp("bad-models"))


@pytest.mark.parametrize("name", ["pickle-payload-pth", "a-list-pth", "not-tensors-pth", "truncated-pth",
                                  "truncated-safetensors", "meta-not-json-safetensors", "config-missing-key",
                                  "config-string-size", "config-heads-do-not-divide", "checkpoint-bad-config"])
def test_init_checkpoint_that_cannot_be_a_model_is_one_line(name, bad_files, tmp_path, capsys):
    rc, err = run_main(capsys, "--quick", "--output-dir", str(tmp_path), "--init-checkpoint", str(bad_files[name]))
    assert one_error_line(rc, err), err
    assert not (tmp_path / "review_classifier.pth").exists()


def test_a_broken_local_gpt2_folder_is_one_line(bad_files, tmp_path, capsys):
    rc, err = run_main(capsys, "--model", str(bad_files["hf-broken-config"]), "--output-dir", str(tmp_path))
    assert one_error_line(rc, err) and "config.json" in err, err


@pytest.mark.parametrize("args, message", [
    (["--quick", "--from-scratch"], "give one of them"),
    (["--quick", "--n-heads", "2"], "--n-heads only applies to --init-checkpoint"),
    (["--from-scratch", "--model", "gpt5"], "unknown GPT-2 model 'gpt5'"),
    (["--from-scratch", "--init-checkpoint", "{tiny}"], "give one of them"),
    (["--quick", "--model", "gpt2-medium"], "--model gpt2-medium is not used with --quick"),
    (["--init-checkpoint", "{tiny}", "--model", "gpt2-xl"], "is not used with --init-checkpoint"),
    (["--quick", "--init-checkpoint", "{tiny}", "--n-heads", "3"], "n_heads 3 does not divide"),
    (["--quick", "--batch-size", "5000"], "no batches"),
    (["--model", "gpt5"], "unknown GPT-2 model 'gpt5'"),
])
def test_options_that_would_be_ignored_or_cannot_work_are_one_line(args, message, tmp_path, capsys):
    """Before, --from-scratch --model gpt5 trained GPT-2 124M and --quick --model gpt2-medium a small model,
    silently."""
    tiny = tmp_path / "tiny" / "model.pth"
    save_model(GPTModel(TINY), tiny)
    args = [a.format(tiny=tiny) for a in args]
    rc, err = run_main(capsys, *args, "--output-dir", str(tmp_path / "out"), "--no-progress")
    assert one_error_line(rc, err) and message in err, err
    assert not (tmp_path / "out" / "review_classifier.pth").exists()


def test_truncating_messages_to_a_short_context_is_said(tmp_path, monkeypatch, capsys):
    """A chapter-5 model with a 32-token context cannot read the longest message: the run truncates
    every split to 32 tokens, and its first line says so (no silent switch)."""
    import ch06.cli as cc

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    save_model(GPTModel(TINY), tmp_path / "tiny.pth")
    monkeypatch.setattr(cc, "train", stop)
    with pytest.raises(Stop):
        finetune({**BOOK_SETTINGS, "max_length": None}, tmp_path / "out", mode="quick",
                 init_checkpoint=tmp_path / "tiny.pth", n_heads=2, device="cpu", progress=False)
    first = capsys.readouterr().out.splitlines()[0]
    assert "max_length 32 (the model's context length: the longest training message has" in first
    assert "longer ones are truncated" in first
