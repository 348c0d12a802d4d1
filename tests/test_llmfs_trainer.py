"""Tests for llmfs/trainer.py: the same run as the book's loop, exact resume (also after Ctrl-C),
checkpoints, mixed precision, and the chapter-5 run built on it (`ch05.cli.pretrain`), on a tiny config
and a short text."""

import json
import math
import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from ch04.gpt import GPTModel
from ch05.cli import pretrain, print_sample
from ch05.gpt_train import (
    DEFAULT_SETTINGS,
    QUICK_SETTINGS,
    calc_loss_batch,
    create_train_val_loaders,
    evaluate_model,
    train_model_simple,
)
from llmfs.checkpoint import CheckpointMismatchError
from llmfs.errors import InvalidInput
from llmfs.trainer import (
    TrainingDiverged,
    TrainingInterrupted,
    autocast_context,
    check_autocast_support,
    make_optimizer,
    parse_dtype,
    train,
)

TINY = {"vocab_size": 50257, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.1, "qkv_bias": False}


def dict_batches(loader, shuffle):
    """The windows of `loader` in the same order, each batch a dict {"inputs", "targets"} (DPO's batches
    are dicts too)."""
    def collate(items):
        inputs, targets = default_collate(items)
        return {"inputs": inputs, "targets": targets}

    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=shuffle, drop_last=loader.drop_last,
                      collate_fn=collate)


def losses_and_gap(train_loss, val_loss):
    return {"train_losses": train_loss, "val_losses": val_loss, "gaps": val_loss - train_loss}


def run_training(text, tokenizer, *, num_epochs=2, seed=123, loader_seed=None, lr=5e-3, as_dict=False, **kwargs):
    """A fresh model, optimizer and loaders, as a new process would build them."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(loader_seed) if loader_seed is not None else None
    train_loader, val_loader = create_train_val_loaders(text, TINY, batch_size=2, generator=gen)
    if as_dict:  # the same batches as dicts; the loss, the counts and the evaluation read them by name
        pairs = train_loader, val_loader
        train_loader, val_loader = dict_batches(train_loader, True), dict_batches(val_loader, False)
        kwargs.setdefault("loss_fn", lambda m, batch: calc_loss_batch(batch["inputs"], batch["targets"], m, "cpu"))
        kwargs.setdefault("count_fn", lambda batch: (batch["inputs"].numel(), len(batch["inputs"])))
        kwargs.setdefault("evaluate_fn", lambda m: losses_and_gap(*evaluate_model(m, *pairs, "cpu", 2)))
        kwargs.setdefault("eval_line", lambda v: f"Train loss {v['train_losses']:.3f}, gap {v['gaps']:.3f}")
    model = GPTModel(TINY)
    optimizer = make_optimizer(model, lr=lr, weight_decay=0.1)

    def sample(m, epoch):
        print_sample(m, tokenizer, "cpu", "Every effort", 3)

    kwargs.setdefault("loss_fn", lambda m, x, y: calc_loss_batch(x, y, m, "cpu"))
    kwargs.setdefault("evaluate_fn", lambda m: evaluate_model(m, train_loader, val_loader, "cpu", 2))
    result = train(model, train_loader, val_loader, optimizer, "cpu", num_epochs=num_epochs, eval_freq=4,
                   eval_iter=2, epoch_end_fn=sample, progress=False, **kwargs)
    return model, result


def assert_same_run(a, b):
    (model_a, result_a), (model_b, result_b) = a, b
    assert result_a == result_b  # exact floats, tokens seen included
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_the_trainer_runs_the_books_loop_step_for_step(short_text, tokenizer, capsys):
    """Same seed, same data: `train` and the book's `train_model_simple` give identical losses and weights."""
    torch.manual_seed(123)
    train_loader, val_loader = create_train_val_loaders(short_text, TINY, batch_size=2)
    book_model = GPTModel(TINY)
    book = train_model_simple(book_model, train_loader, val_loader, make_optimizer(book_model, 5e-3, 0.1), "cpu",
                              num_epochs=2, eval_freq=4, eval_iter=2, start_context="Every effort",
                              tokenizer=tokenizer)
    book_out = capsys.readouterr().out
    ours_model, ours = run_training(short_text, tokenizer, num_epochs=2)
    assert (ours["train_losses"], ours["val_losses"], ours["tokens_seen"]) == book
    for (name, pa), pb in zip(book_model.state_dict().items(), ours_model.state_dict().values()):
        assert torch.equal(pa, pb), name
    # the progress lines read as the book's
    assert [line for line in book_out.splitlines() if line.startswith("Ep ")] == \
        [line for line in capsys.readouterr().out.splitlines() if line.startswith("Ep ")]


def test_training_reduces_the_loss_and_counts(short_text, tokenizer, capsys):
    _, result = run_training(short_text, tokenizer, num_epochs=2)
    assert len(result["train_losses"]) == 9 and result["train_losses"][-1] < result["train_losses"][0] - 1.0
    assert (result["tokens"], result["examples"], result["global_step"]) == (34 * 16, 34 * 2, 33)
    assert capsys.readouterr().out.count("Every effort") == 2  # one sample per epoch


_REFERENCE_RUNS: dict = {}


def reference_run(text, tokenizer, loader_seed):
    if loader_seed not in _REFERENCE_RUNS:  # the uninterrupted run, shared by the tests
        _REFERENCE_RUNS[loader_seed] = run_training(text, tokenizer, loader_seed=loader_seed)
    return _REFERENCE_RUNS[loader_seed]


@pytest.mark.parametrize("loader_seed", [None, 7], ids=["global-rng", "loader-generator"])
@pytest.mark.parametrize("stop_at", [6, 17, 23], ids=["mid-epoch-1", "epoch-boundary", "mid-epoch-2"])
def test_resume_equals_an_uninterrupted_run(short_text, tokenizer, tmp_path, stop_at, loader_seed):
    """Dropout 0.1 and shuffled batches: an interrupted + resumed run matches bit for bit."""
    reference = reference_run(short_text, tokenizer, loader_seed)
    ckpt = tmp_path / "checkpoint.pth"
    run_training(short_text, tokenizer, loader_seed=loader_seed, checkpoint_path=ckpt, max_steps=stop_at)
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] + 1 == stop_at
    # "a new process": different seeds everywhere; the checkpoint restores model, optimizer and RNGs
    resumed = run_training(short_text, tokenizer, seed=999, loader_seed=None if loader_seed is None else 1,
                           checkpoint_path=ckpt, resume_from=ckpt)
    assert_same_run(reference, resumed)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_checkpoints_and_the_resumed_run_is_exact(short_text, tokenizer, tmp_path,
                                                                              signum):
    from ch05.gpt_train import calc_loss_batch

    reference = reference_run(short_text, tokenizer, None)
    steps = []

    def loss_then_signal(model, inputs, targets):
        steps.append(1)
        if len(steps) == 10:
            os.kill(os.getpid(), signum)  # arrives mid-step, like a Ctrl-C
        return calc_loss_batch(inputs, targets, model, "cpu")

    ckpt = tmp_path / "checkpoint.pth"
    with pytest.raises(TrainingInterrupted) as info:
        run_training(short_text, tokenizer, checkpoint_path=ckpt, loss_fn=loss_then_signal)
    assert info.value.checkpoint == ckpt and info.value.step == 9
    assert info.value.exit_code == 128 + signum
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = run_training(short_text, tokenizer, seed=5, checkpoint_path=ckpt, resume_from=ckpt)
    assert_same_run(reference, resumed)


def test_dict_batches_and_recorded_values_run_the_same_steps(short_text, tokenizer, tmp_path, capsys):
    """A batch need not be an (inputs, targets) pair: dict batches reach the loss hook whole, count_fn
    counts them, and a dict from evaluate_fn is recorded key by key; the steps are those of the pair run.
    Interrupted by SIGTERM and resumed, such a run is still exact."""
    reference_model, reference = reference_run(short_text, tokenizer, None)
    capsys.readouterr()
    model, result = run_training(short_text, tokenizer, as_dict=True)
    for key in ("train_losses", "val_losses", "tokens_seen", "tokens", "examples", "global_step"):
        assert result[key] == reference[key], key
    assert result["gaps"] == [v - t for t, v in zip(reference["train_losses"], reference["val_losses"])]
    assert_same_run((reference_model, {}), (model, {}))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Ep ")]
    assert len(lines) == 9 and all(", gap " in line for line in lines)

    steps = []

    def loss_then_signal(m, batch):
        assert isinstance(batch, dict)
        steps.append(1)
        if len(steps) == 20:  # in the second epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return calc_loss_batch(batch["inputs"], batch["targets"], m, "cpu")

    ckpt = tmp_path / "checkpoint.pth"
    with pytest.raises(TrainingInterrupted) as info:
        run_training(short_text, tokenizer, as_dict=True, checkpoint_path=ckpt, loss_fn=loss_then_signal)
    assert info.value.checkpoint == ckpt and info.value.step == 19
    assert len(torch.load(ckpt, weights_only=True)["history"]["gaps"]) == 5  # steps 0, 4, ..., 16
    resumed = run_training(short_text, tokenizer, as_dict=True, seed=5, resume_from=ckpt)
    assert_same_run((model, result), resumed)


def test_a_batch_the_default_count_cannot_read_asks_for_count_fn(short_text, tokenizer):
    with pytest.raises(TypeError, match="count_fn"):
        run_training(short_text, tokenizer, as_dict=True, count_fn=None)


def test_resume_after_a_finished_shorter_run(short_text, tokenizer, tmp_path):
    """Train 1 epoch, then continue the same checkpoint to 2 epochs: same as 2 epochs at once."""
    reference = reference_run(short_text, tokenizer, None)
    ckpt = tmp_path / "checkpoint.pth"
    run_training(short_text, tokenizer, num_epochs=1, checkpoint_path=ckpt)
    resumed = run_training(short_text, tokenizer, num_epochs=2, seed=5, resume_from=ckpt)
    assert_same_run(reference, resumed)


def test_resuming_a_finished_run_or_other_data_is_refused(short_text, tokenizer, tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    run_training(short_text, tokenizer, num_epochs=1, checkpoint_path=ckpt, max_steps=3)
    with pytest.raises(CheckpointMismatchError, match="17 training batches per epoch, this run has 8"):
        run_training(short_text[:600], tokenizer, num_epochs=1, resume_from=ckpt)
    run_training(short_text, tokenizer, num_epochs=1, checkpoint_path=ckpt)
    with pytest.raises(ValueError, match="finished run of 1 epochs"):
        run_training(short_text, tokenizer, num_epochs=1, resume_from=ckpt)


def test_periodic_checkpoints(short_text, tokenizer, tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    run_training(short_text, tokenizer, num_epochs=1, checkpoint_path=ckpt, checkpoint_every=5, max_steps=12)
    state = torch.load(ckpt, weights_only=True)
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (11, 0, 12)
    assert state["config"] == {**TINY}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no temporary files left


def test_training_rejects_a_loader_without_batches():
    model = GPTModel(TINY)
    with pytest.raises(ValueError, match="no batches"):
        train(model, [], [], make_optimizer(model, 1e-3, 0.1), "cpu", 1, 1, 1, loss_fn=None, evaluate_fn=None)


def test_autocast_bfloat16_on_cpu(short_text, tokenizer):
    assert parse_dtype("float32") is None and parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError):
        parse_dtype("int8")
    with autocast_context("cpu", None):
        pass
    _, result = run_training(short_text, tokenizer, num_epochs=1, max_steps=5, autocast_dtype=torch.bfloat16)
    assert all(math.isfinite(x) for x in result["train_losses"])


def test_bfloat16_refused_with_a_clear_message_without_hardware_support(monkeypatch):
    check_autocast_support("cpu", None)  # float32 never needs anything
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(RuntimeError, match="no native bfloat16"):
        check_autocast_support("cpu", torch.bfloat16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    check_autocast_support("cpu", torch.bfloat16)


# --- the chapter-5 run ------------------------------------------------------------------------------

def test_pretrain_writes_checkpoint_model_config_and_plot(short_text, tmp_path, capsys):
    settings = {**QUICK_SETTINGS, "num_epochs": 1, "eval_freq": 5, "eval_iter": 1}
    result = pretrain(TINY, settings, tmp_path, device="cpu", text=short_text, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.pth", "config.json", "loss.png", "model.pth"]
    assert json.loads((tmp_path / "config.json").read_text()) == TINY
    assert len(result["train_losses"]) == 4  # steps 0, 5, 10, 15
    out = capsys.readouterr().out
    assert "device: cpu" in out and f"wrote {tmp_path / 'model.pth'}" in out


def test_keeping_freed_memory_is_the_default_says_so_and_can_be_turned_off(short_text, tmp_path, monkeypatch,
                                                                           capsys):
    """It changes the C allocator of the whole process: never silently (the run's second line says so)."""
    import ch05.cli as tr

    calls, applies = [], [True]
    monkeypatch.setattr(tr, "reuse_freed_memory", lambda: calls.append(1) or applies[0])
    monkeypatch.setattr(tr, "train", lambda *a, **k: {"train_losses": [], "val_losses": [], "tokens_seen": []})
    settings = {**QUICK_SETTINGS, "num_epochs": 1, "eval_freq": 50, "eval_iter": 1}
    pretrain(TINY, settings, tmp_path / "a", device="cpu", text=short_text, progress=False, keep_freed_memory=False)
    assert calls == []
    assert "memory:" not in capsys.readouterr().out
    pretrain(TINY, settings, tmp_path / "b", device="cpu", text=short_text, progress=False)
    assert calls == [1]
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.startswith("device: cpu")
    assert second.startswith("memory: freed memory is kept for reuse") and "--release-freed-memory" in second
    applies[0] = False  # not glibc: nothing changed, nothing to say
    pretrain(TINY, settings, tmp_path / "c", device="cpu", text=short_text, progress=False)
    assert calls == [1, 1] and "memory:" not in capsys.readouterr().out


def test_the_train_command_keeps_freed_memory_unless_told(tmp_path, monkeypatch):
    import ch05.cli as tr

    seen = []
    monkeypatch.setattr(tr, "pretrain", lambda *a, **k: seen.append(k["keep_freed_memory"]))
    assert tr.train_main(["--quick", "--output-dir", str(tmp_path / "a")]) == 0
    assert tr.train_main(["--quick", "--output-dir", str(tmp_path / "b"), "--release-freed-memory"]) == 0
    assert seen == [True, False]


def test_pretrain_rejects_too_short_text(short_text, tmp_path):
    """Checked before the loaders are built: a user's mistake (InvalidInput, one line from the command),
    not chapter 2's ValueError from inside the dataset."""
    with pytest.raises(InvalidInput, match="training split .* gives 0 window"):  # not even one window
        pretrain(TINY, DEFAULT_SETTINGS, tmp_path, device="cpu", text="far too short", progress=False)
    with pytest.raises(InvalidInput, match="training split .* gives 1 window"):  # no full training batch of 2
        pretrain(TINY, {**DEFAULT_SETTINGS, "train_ratio": 0.5}, tmp_path, device="cpu", text=short_text[:120],
                 progress=False)
    with pytest.raises(InvalidInput, match="validation split .* gives 0 window"):
        pretrain(TINY, {**DEFAULT_SETTINGS, "train_ratio": 0.99}, tmp_path, device="cpu", text=short_text,
                 progress=False)
    assert not any(tmp_path.iterdir())


def test_the_text_check_agrees_with_the_loaders(short_text, tokenizer):
    """The check counts windows as the loaders cut them: it refuses exactly the texts whose loaders
    would have no training batch or no validation window."""
    from ch05.cli import check_text_fits
    from ch05.gpt_train import create_train_val_loaders

    verdicts = []
    for n in range(60, 1200, 23):
        text = short_text[:n]
        try:
            check_text_fits(text, tokenizer, TINY["context_length"], 2, 0.9)
            fits = True
        except InvalidInput:
            fits = False
        try:
            train_loader, val_loader = create_train_val_loaders(text, TINY, 2, 0.9)
            built = len(train_loader) > 0 and len(val_loader) > 0
        except ValueError:  # chapter 2's dataset: not even one window
            built = False
        assert fits == built, f"{n} characters"
        verdicts.append(fits)
    assert False in verdicts and True in verdicts


# --- a run that diverges stops -------------------------------------------------------------------------

def test_a_non_finite_loss_stops_before_the_step_and_keeps_the_last_checkpoint(short_text, tokenizer, tmp_path):
    """A learning rate far too high: the run stops at the first loss that is not a number, names that
    step and the learning rate, and leaves the last periodic checkpoint as it was (finite weights)."""
    ckpt = tmp_path / "checkpoint.pth"
    with pytest.raises(TrainingDiverged) as info:
        run_training(short_text, tokenizer, num_epochs=1, lr=1e30, checkpoint_path=ckpt, checkpoint_every=1)
    message = str(info.value)
    assert "\n" not in message and "lower learning rate" in message and "1e+30" in message
    assert f"training diverged at step {info.value.step}:" in message and info.value.step >= 2
    assert info.value.last_checkpoint == ckpt and str(ckpt) in message
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] + 2 == info.value.step  # written after the step before the bad one
    assert all(torch.isfinite(t).all() for t in state["model_state_dict"].values())


class _InfGrad(torch.autograd.Function):
    """0 forward, an infinite gradient backward: a finite loss whose step overflows the weights."""

    @staticmethod
    def forward(ctx, weight):
        ctx.shape = weight.shape
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"))


def test_weights_that_overflow_are_never_saved_or_handed_back(short_text, tokenizer, tmp_path):
    def poisoned_loss(m, x, y):
        return calc_loss_batch(x, y, m, "cpu") + _InfGrad.apply(m.out_head.weight)

    with pytest.raises(TrainingDiverged, match="weights are no longer finite") as info:
        run_training(short_text, tokenizer, num_epochs=1, max_steps=1, loss_fn=poisoned_loss,
                     checkpoint_path=tmp_path / "checkpoint.pth")
    assert info.value.last_checkpoint is None and not (tmp_path / "checkpoint.pth").exists()
    with pytest.raises(TrainingDiverged, match="weights are no longer finite"):  # no checkpoint path: the result
        run_training(short_text, tokenizer, num_epochs=1, max_steps=1, loss_fn=poisoned_loss)
