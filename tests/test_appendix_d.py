"""Appendix D: learning-rate schedule, gradient clipping and the extended training loop."""

import math

import pytest
import torch
import torch.nn as nn

from appendix_d.training import find_highest_gradient, lr_at_step, total_grad_norm, train_model
from ch04.gpt import GPTModel

TINY = {"vocab_size": 64, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
        "drop_rate": 0.0, "qkv_bias": False}

# --- the schedule --------------------------------------------------------------------------------

TOTAL, WARMUP, PEAK, INITIAL, MIN = 120, 20, 1e-3, 1e-5, 1e-6


def lr(step):
    return lr_at_step(step, TOTAL, WARMUP, PEAK, INITIAL, MIN)


def test_schedule_key_points():
    assert lr(0) == pytest.approx(INITIAL)
    assert lr(WARMUP) == pytest.approx(PEAK)
    assert lr(WARMUP + (TOTAL - WARMUP) // 2) == pytest.approx((PEAK + MIN) / 2)
    assert lr(TOTAL) == pytest.approx(MIN)
    # The last step actually taken is a hair above min_lr.
    assert MIN < lr(TOTAL - 1) < MIN + 1e-3 * (PEAK - MIN)


def test_schedule_shape():
    lrs = [lr(s) for s in range(TOTAL)]
    warm, decay = lrs[:WARMUP + 1], lrs[WARMUP:]
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert all(d == pytest.approx((PEAK - INITIAL) / WARMUP) for d in steps)  # linear warm-up
    assert all(b < a for a, b in zip(decay, decay[1:]))  # strictly decreasing afterwards
    assert max(lrs) == pytest.approx(PEAK)


def test_schedule_edge_cases():
    # No warm-up: start at the peak. All warm-up: stay at the peak afterwards.
    assert lr_at_step(0, 10, 0, PEAK, INITIAL, MIN) == pytest.approx(PEAK)
    assert lr_at_step(10, 10, 10, PEAK, INITIAL, MIN) == pytest.approx(PEAK)
    assert lr_at_step(50, 10, 2, PEAK, INITIAL, MIN) == pytest.approx(MIN)  # past the end: min_lr


# --- helpers ---------------------------------------------------------------------------------------


def repeated_batches(n_batches, batch_size=2, seed=0):
    """The same random batch of token ids n times (a list works as a data loader)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (batch_size, TINY["context_length"] + 1), generator=g)
    return [(ids[:, :-1], ids[:, 1:])] * n_batches


class Scaled(nn.Module):
    """Multiplies a model's logits, which blows the loss and gradients up."""

    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor = model, factor
        self.pos_emb = model.pos_emb  # generate_and_print_sample reads the context size here

    def forward(self, x):
        return self.model(x) * self.factor


class RecordingSGD(torch.optim.SGD):
    """SGD that records the total gradient norm it is handed at every step (after any clipping)."""

    def __init__(self, model, lr):
        super().__init__(model.parameters(), lr=lr)
        self.watched = model
        self.norms = []

    def step(self, closure=None):
        self.norms.append(total_grad_norm(self.watched))
        return super().step(closure)


def test_total_grad_norm_matches_pytorch():
    model = GPTModel(TINY)
    x, y = repeated_batches(1)[0]
    nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    ours = total_grad_norm(model)
    highest = find_highest_gradient(model)
    theirs = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9).item()
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert 0 < highest <= ours
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    assert total_grad_norm(model) == pytest.approx(1.0, rel=1e-4)
    assert find_highest_gradient(model) == pytest.approx(highest / ours, rel=1e-4)  # same direction


# --- the training loop ----------------------------------------------------------------------------


def test_clipping_only_after_warmup():
    model = Scaled(GPTModel(TINY), factor=1000.0)
    optimizer = RecordingSGD(model, lr=1e-6)
    warmup = 3
    _, _, _, lrs = train_model(model, repeated_batches(8), repeated_batches(1), optimizer, "cpu",
                               n_epochs=1, eval_freq=100, eval_iter=1, start_context="", tokenizer=None,
                               warmup_steps=warmup, initial_lr=1e-7, min_lr=1e-8, print_samples=False)
    norms = optimizer.norms
    assert len(norms) == len(lrs) == 8
    assert all(n > 10.0 for n in norms[:warmup])  # huge gradients pass untouched during warm-up
    assert all(n <= 1.0 + 1e-4 for n in norms[warmup:])  # and are clipped to norm 1 afterwards


def test_a_run_that_is_all_warmup_never_clips():
    model = Scaled(GPTModel(TINY), factor=1000.0)
    optimizer = RecordingSGD(model, lr=1e-6)
    train_model(model, repeated_batches(3), repeated_batches(1), optimizer, "cpu", n_epochs=1,
                eval_freq=100, eval_iter=1, start_context="", tokenizer=None, warmup_steps=3,
                initial_lr=1e-7, print_samples=False)
    assert len(optimizer.norms) == 3 and all(n > 10.0 for n in optimizer.norms)


def test_the_book_clipped_one_step_later():
    """The book's printed `global_step > warmup_steps` left the first step after warm-up unclipped;
    ours (`>=`, the book repository's fix) clips it. Everything before that step is identical."""
    import inspect

    from appendix_d import training

    source = inspect.getsource(training.train_model)
    assert source.count("global_step >= warmup_steps") == 1
    book_source = source.replace("global_step >= warmup_steps", "global_step > warmup_steps")
    namespace = dict(vars(training))
    exec(compile(book_source, "book_train_model", "exec"), namespace)
    book = namespace["train_model"]
    norms = {}
    for name, fn in (("ours", train_model), ("book", book)):
        torch.manual_seed(123)
        model = Scaled(GPTModel(TINY), factor=1000.0)
        optimizer = RecordingSGD(model, lr=1e-6)
        fn(model, repeated_batches(5), repeated_batches(1), optimizer, "cpu", n_epochs=1, eval_freq=100,
           eval_iter=1, start_context="", tokenizer=None, warmup_steps=2, initial_lr=1e-7, print_samples=False)
        norms[name] = optimizer.norms
    assert norms["book"][2] > 10.0 >= 1.0 + 1e-4 >= norms["ours"][2]  # step 2: the first after warm-up
    assert norms["book"][:2] == norms["ours"][:2]
    assert all(n <= 1.0 + 1e-4 for n in norms["book"][3:] + norms["ours"][3:])


def test_train_model_loss_falls_and_tracks_lr(capsys):
    model = GPTModel(TINY)
    peak = 5e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.1)
    n_batches, n_epochs, warmup = 5, 6, 6
    train_losses, val_losses, tokens, lrs = train_model(
        model, repeated_batches(n_batches), repeated_batches(1), optimizer, "cpu",
        n_epochs=n_epochs, eval_freq=5, eval_iter=1, start_context="", tokenizer=None,
        warmup_steps=warmup, initial_lr=1e-4, min_lr=1e-5, print_samples=False)
    total = n_batches * n_epochs
    assert len(lrs) == total
    assert lrs == pytest.approx([lr_at_step(s, total, warmup, peak, 1e-4, 1e-5) for s in range(total)])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[-1])
    assert len(train_losses) == len(val_losses) == len(tokens) == math.ceil(total / 5)
    assert tokens == [(s + 1) * 2 * TINY["context_length"] for s in range(0, total, 5)]
    assert train_losses[0] > math.log(TINY["vocab_size"]) - 0.5  # starts near chance
    assert train_losses[-1] < 0.5 * train_losses[0]  # memorises the repeated batch
    assert "Ep 6" in capsys.readouterr().out


def test_train_model_on_the_verdict_with_samples(verdict_text, capsys):
    from ch02.tokenizer import get_gpt2_tokenizer
    from ch05.gpt_train import create_train_val_loaders

    cfg = {**TINY, "vocab_size": 50257, "context_length": 16, "emb_dim": 32}
    train_loader, val_loader = create_train_val_loaders(verdict_text[:3000], cfg, batch_size=4)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
    train_losses, val_losses, _, lrs = train_model(
        model, train_loader, val_loader, optimizer, "cpu", n_epochs=2, eval_freq=len(train_loader),
        eval_iter=2, start_context="Every effort moves you", tokenizer=get_gpt2_tokenizer(),
        warmup_steps=3)
    assert len(lrs) == 2 * len(train_loader)
    assert train_losses[-1] < train_losses[0]
    out = capsys.readouterr().out
    assert out.count("Every effort moves you") == 2  # one sample per epoch


def test_the_package_root_exports_the_main_names():
    """`from appendix_d import ...` works as with the book's package: the names are training's objects."""
    import appendix_d
    from appendix_d import find_highest_gradient, training

    assert find_highest_gradient is training.find_highest_gradient
    assert {"find_highest_gradient", "train_model"} <= set(appendix_d.__all__)
    for name in appendix_d.__all__:
        assert getattr(appendix_d, name) is getattr(training, name), name
