"""Appendix D: a training loop with learning-rate warm-up, cosine decay and gradient clipping.

D.1-D.2 `lr_at_step` (one function for the whole schedule), D.3 `total_grad_norm` and
`find_highest_gradient` (to see what clipping does), D.4 `train_model`, which is chapter 5's
`train_model_simple` with the three additions. Losses, evaluation and text samples are
imported from chapter 5 (`ch05.gpt_train`), not copied.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ch05.gpt_train import calc_loss_batch, evaluate_model, generate_and_print_sample

# --- D.1 Learning rate warmup and D.2 Cosine decay ---------------------------------------------


def lr_at_step(step: int, total_steps: int, warmup_steps: int, peak_lr: float,
               initial_lr: float = 3e-05, min_lr: float = 1e-6) -> float:
    """The learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps.

    Steps 0 .. warmup_steps-1 warm up linearly: step 0 uses `initial_lr` and every step adds
    (peak_lr - initial_lr) / warmup_steps. From step `warmup_steps` on, the rate follows half a
    cosine from `peak_lr` (at step warmup_steps) down to `min_lr` (reached at step total_steps,
    one past the last step, so the final step's rate is a hair above min_lr).

    Halfway through the decay the cosine is 0 and the rate is (peak_lr + min_lr) / 2.
    """
    if step < warmup_steps:
        lr_increment = (peak_lr - initial_lr) / warmup_steps
        return initial_lr + step * lr_increment
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:  # the whole run is warm-up: stay at the peak after it
        return peak_lr
    progress = min((step - warmup_steps) / decay_steps, 1.0)  # 0 -> 1 over the decay phase
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


# --- D.3 Gradient clipping -----------------------------------------------------------------------


def total_grad_norm(model: nn.Module) -> float:
    """The L2 norm of all gradients taken together, as if they were one long vector.

    This is the quantity `torch.nn.utils.clip_grad_norm_` compares with `max_norm`; when it is
    larger, every gradient is multiplied by max_norm / norm, so the direction is kept and only
    the length shrinks.
    """
    norms = [p.grad.detach().norm(2) for p in model.parameters() if p.grad is not None]
    if not norms:
        return 0.0
    return torch.stack(norms).norm(2).item()


def find_highest_gradient(model: nn.Module) -> float:
    """The largest single gradient entry in the model (clipping by norm shrinks it too)."""
    highest = None
    for p in model.parameters():
        if p.grad is not None:
            value = p.grad.detach().max().item()
            highest = value if highest is None else max(highest, value)
    return highest if highest is not None else 0.0


# --- D.4 The modified training function ---------------------------------------------------------


def train_model(model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer, device,
                n_epochs: int, eval_freq: int, eval_iter: int, start_context: str, tokenizer,
                warmup_steps: int, initial_lr: float = 3e-05, min_lr: float = 1e-6,
                max_norm: float | None = 1.0, *, peak_lr: float | None = None,
                print_samples: bool = True) -> tuple[list[float], list[float], list[int], list[float]]:
    """Chapter 5's training loop plus warm-up, cosine decay and gradient clipping.

    The peak learning rate is the one the optimizer was created with (or `peak_lr`). Before
    every step the rate from `lr_at_step` is written into all parameter groups and recorded.
    After warm-up (steps >= warmup_steps) the gradients are clipped to a total norm of
    `max_norm` (None turns clipping off); during warm-up the small rates already keep the
    updates small, so the gradients are left as they are.

    Returns (train_losses, val_losses, track_tokens_seen, track_lrs): one loss pair and token
    count per evaluation (every `eval_freq` steps), and one learning rate per optimizer step.
    """
    train_losses: list[float] = []
    val_losses: list[float] = []
    track_tokens_seen: list[int] = []
    track_lrs: list[float] = []
    tokens_seen, global_step = 0, -1

    if peak_lr is None:
        peak_lr = optimizer.param_groups[0]["lr"]
    total_steps = len(train_loader) * n_epochs

    for epoch in range(n_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad(set_to_none=True)
            global_step += 1

            # New: set this step's learning rate (warm-up, then cosine decay) and record it.
            lr = lr_at_step(global_step, total_steps, warmup_steps, peak_lr, initial_lr, min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            track_lrs.append(lr)

            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()

            # New: clip the gradient norm once warm-up is over.
            if max_norm is not None and global_step >= warmup_steps:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm)

            optimizer.step()
            tokens_seen += input_batch.numel()

            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch + 1} (Iter {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}, lr {lr:.2e}")

        if print_samples:  # New: a switch, so tests and quick runs can skip the samples
            generate_and_print_sample(model, tokenizer, device, start_context)

    return train_losses, val_losses, track_tokens_seen, track_lrs
