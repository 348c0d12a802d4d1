"""Tests for ch05/gpt_train.py, the book's listings: token helpers, the losses, evaluation,
the sample, the training loop and the loss plot (on a tiny config and a short text).
The training layer around them (resume, checkpoints, DDP, ...) is tested in test_llmfs_trainer.py.
"""

import math

import pytest
import torch
import torch.nn as nn

from ch04.gpt import GPTModel
from ch05.gpt_train import (
    calc_loss_batch,
    calc_loss_loader,
    create_train_val_loaders,
    evaluate_model,
    generate_and_print_sample,
    plot_losses,
    text_to_token_ids,
    token_ids_to_text,
    train_model_simple,
)

TINY = {"vocab_size": 50257, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.1, "qkv_bias": False}



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


def test_calc_loss_loader_of_an_empty_loader_is_nan_as_in_the_book():
    assert math.isnan(calc_loss_loader([], FixedLogits(torch.zeros(1, 3, 4)), "cpu"))


def test_evaluate_model_uses_eval_mode_and_returns_to_training_mode(short_text):
    model = GPTModel(TINY)
    train_loader, val_loader = create_train_val_loaders(short_text, TINY, batch_size=2)
    seen = []
    model.trf_blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    model.train()
    a = evaluate_model(model, train_loader, val_loader, "cpu", eval_iter=1)
    assert model.training and not any(seen)  # as in the book: back to train mode afterwards
    # no dropout during evaluation: the validation loss is deterministic
    b = evaluate_model(model, train_loader, val_loader, "cpu", eval_iter=1)
    assert a[1] == b[1]


def test_generate_and_print_sample(capsys, tokenizer):
    from ch04.gpt import generate_text_simple

    model = GPTModel(TINY).train()
    generate_and_print_sample(model, tokenizer, "cpu", "Hello there")
    assert model.training
    model.eval()
    expected = generate_text_simple(model, text_to_token_ids("Hello there", tokenizer), 50, TINY["context_length"])
    assert capsys.readouterr().out == token_ids_to_text(expected, tokenizer).replace("\n", " ") + "\n"


def test_create_train_val_loaders_split(short_text):
    train_loader, val_loader = create_train_val_loaders(short_text, TINY, batch_size=2, train_ratio=0.9)
    assert (len(train_loader), len(val_loader)) == (17, 2)
    x, y = next(iter(train_loader))
    assert x.shape == y.shape == (2, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


# --- 5.2 training loop -------------------------------------------------------------------------

def test_training_reduces_the_loss(short_text, tokenizer, capsys):
    from llmfs.trainer import make_optimizer

    torch.manual_seed(123)
    train_loader, val_loader = create_train_val_loaders(short_text, TINY, batch_size=2)
    model = GPTModel(TINY)
    optimizer = make_optimizer(model, lr=5e-3, weight_decay=0.1)
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, "cpu", num_epochs=2, eval_freq=4, eval_iter=2,
        start_context="Every effort", tokenizer=tokenizer)
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == 9  # steps 0, 4, ..., 32
    assert train_losses[-1] < train_losses[0] - 1.0
    assert val_losses[-1] < val_losses[0] - 0.5
    assert tokens_seen == [16 * (step + 1) for step in range(0, 34, 4)]
    out = capsys.readouterr().out
    assert "Ep 1 (Step 000000)" in out and out.count("Every effort") == 2  # one sample per epoch


def test_plot_losses_writes_png(tmp_path):
    plot_losses([0, 0.5, 1.0], [10, 20, 30], [3.0, 2.0, 1.5], [3.1, 2.5, 2.2], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]
