"""Appendix D: a training loop with learning-rate warm-up, cosine decay and gradient clipping.

D.1-D.2 `lr_at_step` (the schedule as one function, for plots and tests), D.3 `total_grad_norm`
and `find_highest_gradient` (to see what clipping does), D.4 `train_model`: the book's listing,
chapter 5's `train_model_simple` with the three additions, and two `# New:` lines. Losses,
evaluation and text samples are imported from chapter 5 (`ch05.gpt_train`), not copied.
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


def train_model(model, train_loader, val_loader, optimizer, device,
                n_epochs, eval_freq, eval_iter, start_context, tokenizer,
                warmup_steps, initial_lr=3e-05, min_lr=1e-6,
                print_samples=True):  # New: print_samples=False skips the samples (tests, quick runs)

    train_losses, val_losses, track_tokens_seen, track_lrs = [], [], [], []
    tokens_seen, global_step = 0, -1

    # Retrieve the maximum learning rate from the optimizer
    peak_lr = optimizer.param_groups[0]["lr"]

    # Calculate the total number of iterations in the training process
    total_training_steps = len(train_loader) * n_epochs

    # Calculate the learning rate increment during the warmup phase
    lr_increment = (peak_lr - initial_lr) / warmup_steps

    for epoch in range(n_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            global_step += 1

            # Adjust the learning rate based on the current phase (warmup or cosine annealing)
            if global_step < warmup_steps:
                # Linear warmup
                lr = initial_lr + global_step * lr_increment
            else:
                # Cosine annealing after warmup
                progress = ((global_step - warmup_steps) /
                            (total_training_steps - warmup_steps))
                lr = min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

            # Apply the calculated learning rate to the optimizer
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            track_lrs.append(lr)  # Store the current learning rate

            # Calculate and backpropagate the loss
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()

            # Apply gradient clipping after the warmup phase to avoid exploding gradients
            # New: `>=` clips from the first step after warm-up; the book's `>` skipped that step
            # (the book repository's correction).
            if global_step >= warmup_steps:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)

            optimizer.step()
            tokens_seen += input_batch.numel()

            # Periodically evaluate the model on the training and validation sets
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader,
                    device, eval_iter
                )
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                # Print the current losses
                print(f"Ep {epoch+1} (Iter {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, "
                      f"Val loss {val_loss:.3f}"
                )

        # Generate and print a sample from the model to monitor progress
        if print_samples:  # New
            generate_and_print_sample(
                model, tokenizer, device, start_context
            )

    return train_losses, val_losses, track_tokens_seen, track_lrs
