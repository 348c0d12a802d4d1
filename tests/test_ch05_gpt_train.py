"""Tests for ch05/gpt_train.py: token helpers, the losses, evaluation, the training loop,
exact resumption from checkpoints, and the script entry point (on a tiny config and a short text).
"""

import math

import pytest
import torch
import torch.nn as nn

from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPTModel
from ch05.gpt_train import (
    DEFAULT_SETTINGS,
    QUICK_CONFIG,
    QUICK_SETTINGS,
    autocast_context,
    calc_loss_batch,
    calc_loss_loader,
    create_train_val_loaders,
    evaluate_model,
    generate_and_print_sample,
    main,
    make_optimizer,
    parse_args,
    parse_dtype,
    plot_losses,
    settings_from_args,
    text_to_token_ids,
    token_ids_to_text,
    train_model_simple,
)

TINY = {"vocab_size": 50257, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.1, "qkv_bias": False}



@pytest.fixture(scope="module")
def tokenizer():
    return get_gpt2_tokenizer()


@pytest.fixture
def short_text(verdict_text):
    return verdict_text[:1200]  # 17 training batches of 2 x 8 tokens, 2 validation batches


class FixedLogits(nn.Module):
    """Returns the same logits for every batch: (b, num_tokens, vocab)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, idx):
        return self.logits.expand(idx.shape[0], -1, -1)


# --- 5.1 ---------------------------------------------------------------------------------------

def test_token_round_trip(tokenizer):
    text = "Every effort moves you.<|endoftext|> And then"
    ids = text_to_token_ids(text, tokenizer)
    assert ids.shape[0] == 1 and ids.dim() == 2
    assert 50256 in ids[0].tolist()
    assert token_ids_to_text(ids, tokenizer) == text
    assert token_ids_to_text(ids[0].tolist(), tokenizer) == text  # a flat list works too


def test_calc_loss_batch_equals_hand_computed_cross_entropy():
    logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])  # (1, 2 tokens, vocab 3)
    targets = torch.tensor([[0, 2]])
    # -log softmax at the targets, averaged over the two positions
    expected = (-(2.0 - math.log(math.e ** 2 + math.e + 1)) + math.log(3)) / 2
    loss = calc_loss_batch(torch.zeros(1, 2, dtype=torch.long), targets, FixedLogits(logits), "cpu")
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the same with a batch of two identical rows
    loss2 = calc_loss_batch(torch.zeros(2, 2, dtype=torch.long), targets.repeat(2, 1), FixedLogits(logits), "cpu")
    assert loss2.item() == pytest.approx(expected, rel=1e-6)


def test_calc_loss_batch_on_a_gpt_matches_log_probabilities():
    torch.manual_seed(0)
    model = GPTModel({**TINY, "vocab_size": 20, "drop_rate": 0.0}).eval()
    inputs, targets = torch.randint(0, 20, (2, 5)), torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        log_probs = torch.log_softmax(model(inputs), dim=-1)
        picked = log_probs.gather(-1, targets.unsqueeze(-1))  # log p(target) per position
        loss = calc_loss_batch(inputs, targets, model, "cpu")
    assert loss.item() == pytest.approx(-picked.mean().item(), rel=1e-5)


def test_calc_loss_loader_averages_and_caps():
    vocab = 4
    model = FixedLogits(torch.zeros(1, 3, vocab))  # uniform: every batch has loss log(4)
    loader = [(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))] * 5
    assert calc_loss_loader(loader, model, "cpu") == pytest.approx(math.log(vocab))

    class Mixed(nn.Module):  # batch-dependent loss: 0 for the first batch, log(4) for the others
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, idx):
            self.calls += 1
            if self.calls == 1:
                return torch.nn.functional.one_hot(torch.zeros(1, 3, dtype=torch.long), vocab).float() * 1e4
            return torch.zeros(1, 3, vocab)

    assert calc_loss_loader(loader, Mixed(), "cpu", num_batches=2) == pytest.approx(math.log(vocab) / 2)
    mixed = Mixed()
    assert calc_loss_loader(loader, mixed, "cpu", num_batches=50) == pytest.approx(math.log(vocab) * 4 / 5)
    assert mixed.calls == 5  # capped at the loader's length


def test_calc_loss_loader_rejects_empty_loader_and_zero_batches():
    model = FixedLogits(torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="no batches"):
        calc_loss_loader([], model, "cpu")
    loader = [(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))]
    with pytest.raises(ValueError, match="num_batches"):
        calc_loss_loader(loader, model, "cpu", num_batches=0)


def test_evaluate_model_uses_eval_mode_and_restores_the_mode(short_text):
    model = GPTModel(TINY)
    train_loader, val_loader = create_train_val_loaders(short_text, TINY, batch_size=2)
    seen = []
    model.trf_blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    model.train()
    a = evaluate_model(model, train_loader, val_loader, "cpu", eval_iter=1)
    assert model.training and not any(seen)
    model.eval()
    evaluate_model(model, train_loader, val_loader, "cpu", eval_iter=1)
    assert not model.training
    # no dropout during evaluation: the validation loss is deterministic
    b = evaluate_model(model, train_loader, val_loader, "cpu", eval_iter=1)
    assert a[1] == b[1]


def test_generate_and_print_sample(capsys, tokenizer):
    model = GPTModel(TINY).train()
    text = generate_and_print_sample(model, tokenizer, "cpu", "Hello there", max_new_tokens=3)
    assert text.startswith("Hello there") and len(tokenizer.encode(text)) == 2 + 3
    assert capsys.readouterr().out.strip() == text.replace("\n", " ")
    assert model.training


def test_create_train_val_loaders_split(short_text):
    train_loader, val_loader = create_train_val_loaders(short_text, TINY, batch_size=2, train_ratio=0.9)
    assert (len(train_loader), len(val_loader)) == (17, 2)
    x, y = next(iter(train_loader))
    assert x.shape == y.shape == (2, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


# --- 5.2 training loop -------------------------------------------------------------------------

def run_training(text, tokenizer, *, num_epochs=2, seed=123, loader_seed=None, lr=5e-3, **kwargs):
    """A fresh model, optimizer and loaders, as a new process would build them."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(loader_seed) if loader_seed is not None else None
    train_loader, val_loader = create_train_val_loaders(text, TINY, batch_size=2, generator=gen)
    model = GPTModel(TINY)
    optimizer = make_optimizer(model, lr=lr, weight_decay=0.1)
    losses = train_model_simple(model, train_loader, val_loader, optimizer, "cpu", num_epochs=num_epochs,
                                eval_freq=4, eval_iter=2, start_context="Every effort", tokenizer=tokenizer,
                                sample_tokens=3, progress=False, **kwargs)
    return model, losses


def test_training_reduces_the_loss(short_text, tokenizer, capsys):
    _, (train_losses, val_losses, tokens_seen) = run_training(short_text, tokenizer, num_epochs=2)
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == 9  # steps 0, 4, ..., 32
    assert train_losses[-1] < train_losses[0] - 1.0
    assert val_losses[-1] < val_losses[0] - 0.5
    assert tokens_seen == [16 * (step + 1) for step in range(0, 34, 4)]
    out = capsys.readouterr().out
    assert "Ep 1 (Step 000000)" in out and out.count("Every effort") == 2  # one sample per epoch


def assert_same_run(a, b):
    (model_a, losses_a), (model_b, losses_b) = a, b
    assert losses_a == losses_b  # exact floats, tokens seen included
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), name


_REFERENCE_RUNS: dict = {}


@pytest.mark.parametrize("loader_seed", [None, 7], ids=["global-rng", "loader-generator"])
@pytest.mark.parametrize("stop_at", [6, 17, 23], ids=["mid-epoch-1", "epoch-boundary", "mid-epoch-2"])
def test_resume_equals_an_uninterrupted_run(short_text, tokenizer, tmp_path, stop_at, loader_seed):
    """Dropout 0.1 and shuffled batches: an interrupted + resumed run matches bit for bit."""
    if loader_seed not in _REFERENCE_RUNS:  # the uninterrupted run, shared by the stop points
        _REFERENCE_RUNS[loader_seed] = run_training(short_text, tokenizer, loader_seed=loader_seed)
    reference = _REFERENCE_RUNS[loader_seed]
    ckpt = tmp_path / "checkpoint.pth"
    run_training(short_text, tokenizer, loader_seed=loader_seed, checkpoint_path=ckpt, max_steps=stop_at)
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] + 1 == stop_at
    # "a new process": different seeds everywhere; the checkpoint restores model, optimizer and RNGs
    resumed = run_training(short_text, tokenizer, seed=999, loader_seed=None if loader_seed is None else 1,
                           checkpoint_path=ckpt, resume_from=ckpt)
    assert_same_run(reference, resumed)


def test_resume_after_a_finished_shorter_run(short_text, tokenizer, tmp_path):
    """Train 1 epoch, then continue the same checkpoint to 2 epochs: same as 2 epochs at once."""
    reference = run_training(short_text, tokenizer, num_epochs=2)
    ckpt = tmp_path / "checkpoint.pth"
    run_training(short_text, tokenizer, num_epochs=1, checkpoint_path=ckpt)
    resumed = run_training(short_text, tokenizer, num_epochs=2, seed=5, resume_from=ckpt)
    assert_same_run(reference, resumed)


def test_periodic_checkpoints(short_text, tokenizer, tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    run_training(short_text, tokenizer, num_epochs=1, checkpoint_path=ckpt, checkpoint_every=5, max_steps=12)
    state = torch.load(ckpt, weights_only=True)
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (11, 0, 12)
    assert state["config"] == {**TINY}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no temporary files left


def test_training_rejects_a_loader_without_batches(tokenizer):
    model = GPTModel(TINY)
    with pytest.raises(ValueError, match="no batches"):
        train_model_simple(model, [], [], make_optimizer(model, 1e-3, 0.1), "cpu", 1, 1, 1, "x", tokenizer)


def test_autocast_bfloat16_on_cpu(short_text, tokenizer):
    assert parse_dtype("float32") is None and parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError):
        parse_dtype("int8")
    with autocast_context("cpu", None):
        pass
    _, (train_losses, _, _) = run_training(short_text, tokenizer, num_epochs=1, max_steps=5,
                                           autocast_dtype=torch.bfloat16)
    assert all(math.isfinite(x) for x in train_losses)


def test_plot_losses_writes_png(tmp_path):
    plot_losses([0, 0.5, 1.0], [10, 20, 30], [3.0, 2.0, 1.5], [3.1, 2.5, 2.2], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]


# --- the script -------------------------------------------------------------------------------

def test_main_writes_checkpoint_model_config_and_plot(short_text, tmp_path, capsys):
    import json

    settings = {**QUICK_SETTINGS, "num_epochs": 1, "eval_freq": 5, "eval_iter": 1}
    result = main(TINY, settings, tmp_path, device="cpu", text=short_text, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.pth", "config.json", "loss.png", "model.pth"]
    assert json.loads((tmp_path / "config.json").read_text()) == TINY
    assert len(result["train_losses"]) == 4  # steps 0, 5, 10, 15
    assert "device: cpu" in capsys.readouterr().out
    # resuming a finished run trains no further and keeps the history
    again = main(TINY, settings, tmp_path / "again", device="cpu", text=short_text, progress=False,
                 resume=str(tmp_path / "checkpoint.pth"))
    assert again["train_losses"] == result["train_losses"]


def test_keeping_freed_memory_is_the_default_and_can_be_turned_off(short_text, tmp_path, monkeypatch):
    import ch05.gpt_train as gt

    calls = []
    monkeypatch.setattr(gt, "reuse_freed_memory", lambda: calls.append(1) or True)
    settings = {**QUICK_SETTINGS, "num_epochs": 1, "eval_freq": 50, "eval_iter": 1}
    monkeypatch.setattr(gt, "train_model_simple", lambda *a, **k: ([], [], []))  # only the set-up matters here
    main(TINY, settings, tmp_path / "a", device="cpu", text=short_text, progress=False, keep_freed_memory=False)
    assert calls == []
    main(TINY, settings, tmp_path / "b", device="cpu", text=short_text, progress=False)
    assert calls == [1]
    assert parse_args([]).release_freed_memory is False
    assert parse_args(["--release-freed-memory"]).release_freed_memory is True


def test_main_rejects_too_short_text(short_text, tmp_path):
    with pytest.raises(ValueError, match="needs at least"):  # not even one window (chapter 2's check)
        main(TINY, DEFAULT_SETTINGS, tmp_path, device="cpu", text="far too short", progress=False)
    with pytest.raises(ValueError, match="too short"):  # one window each, but no full training batch
        main(TINY, {**DEFAULT_SETTINGS, "train_ratio": 0.5}, tmp_path, device="cpu", text=short_text[:120],
             progress=False)
    assert not any(tmp_path.iterdir())


def test_command_line_settings():
    cfg, settings = settings_from_args(parse_args(["--quick"]))
    assert cfg == QUICK_CONFIG and settings == QUICK_SETTINGS
    cfg, settings = settings_from_args(parse_args([]))
    assert cfg["context_length"] == 256 and cfg["emb_dim"] == 768 and settings["num_epochs"] == 10
    cfg, settings = settings_from_args(parse_args(["--quick", "--epochs", "2", "--lr", "0.01",
                                                   "--context-length", "32", "--seed", "1"]))
    assert (settings["num_epochs"], settings["learning_rate"], settings["seed"]) == (2, 0.01, 1)
    assert cfg["context_length"] == 32 and QUICK_CONFIG["context_length"] == 64  # no mutation


def test_bfloat16_refused_with_a_clear_message_without_hardware_support(monkeypatch):
    from ch05.gpt_train import check_autocast_support

    check_autocast_support("cpu", None)  # float32 never needs anything
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(RuntimeError, match="no native bfloat16"):
        check_autocast_support("cpu", torch.bfloat16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    check_autocast_support("cpu", torch.bfloat16)


def test_float32_training_and_evaluation_use_onednn_linear_layers_unless_turned_off(short_text, tokenizer,
                                                                                      onednn_products):
    """The loop sends linear layers through oneDNN in float32 (not in bfloat16 autocast, not when off)."""
    calls = onednn_products
    run_training(short_text, tokenizer, num_epochs=1, max_steps=2)
    # 2 steps x 2 blocks x 6 linear layers + head, forward and input gradient; 1 evaluation of 2 x 2 batches
    assert len(calls) == 2 * 2 * 13 + 4 * 13
    calls.clear()
    run_training(short_text, tokenizer, num_epochs=1, max_steps=2, use_onednn=False)
    run_training(short_text, tokenizer, num_epochs=1, max_steps=2, autocast_dtype=torch.bfloat16)
    assert calls == []
    assert parse_args([]).no_onednn is False and parse_args(["--no-onednn"]).no_onednn is True
