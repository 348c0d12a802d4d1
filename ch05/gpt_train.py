"""Chapter 5: pretraining the GPT model on unlabeled text (sections 5.1-5.2), the book's listings.

`text_to_token_ids` / `token_ids_to_text`, the losses (`calc_loss_batch`,
`calc_loss_loader`), `evaluate_model`, `generate_and_print_sample`, the training loop
`train_model_simple` and the loss plot, as the chapter writes them. The chapter's run
as a headless job, with resumable checkpoints, DDP, mixed precision and progress bars,
is `llmfs.trainer`, which wraps these listings; its command line is `ch05.cli`:

    python -m ch05.gpt_train            # the chapter's run: GPT-2 124M shape, context 256, 10 epochs
    python -m ch05.gpt_train --quick    # a small model, about a minute on a laptop CPU

Reuses chapter 2 (tokenizer, loaders) and chapter 4 (greedy generation; the configs
`GPT_CONFIG_124M` and `QUICK_CONFIG` live in `ch04.gpt`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ch02.dataloader import create_dataloader_v1
from ch04.gpt import generate_text_simple
from llmfs.atomic import atomic_path

# --- 5.1 Evaluating generative text models ----------------------------------------------------


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    encoded_tensor = torch.tensor(encoded).unsqueeze(0)  # add batch dimension
    return encoded_tensor


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    flat = token_ids.squeeze(0)  # remove batch dimension
    return tokenizer.decode(flat.tolist())


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device | str) -> torch.Tensor:
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (b, num_tokens, vocab_size)
    # cross_entropy wants (N, classes) and (N,): flatten batch and sequence dimensions.
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())
    return loss


def calc_loss_loader(data_loader, model: nn.Module, device: torch.device | str, num_batches: int | None = None,
                     calc_loss_batch=calc_loss_batch) -> float:  # New: chapter 6 passes its classification loss
    total_loss = 0.
    if len(data_loader) == 0:
        return float("nan")
    elif num_batches is None:
        num_batches = len(data_loader)
    else:
        # Reduce the number of batches to match the total number of batches in the data loader
        # if num_batches exceeds the number of batches in the data loader
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            total_loss += loss.item()
        else:
            break
    return total_loss / num_batches


# --- 5.2 Training an LLM ------------------------------------------------------------------------

def train_model_simple(model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer, device,
                       num_epochs: int, eval_freq: int, eval_iter: int, start_context: str,
                       tokenizer) -> tuple[list[float], list[float], list[int]]:
    # Initialize lists to track losses and tokens seen
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1

    # Main training loop
    for epoch in range(num_epochs):
        model.train()  # Set model to training mode

        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()  # Reset loss gradients from previous batch iteration
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()  # Calculate loss gradients
            optimizer.step()  # Update model weights using loss gradients
            tokens_seen += input_batch.numel()
            global_step += 1

            # Optional evaluation step
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch+1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")

        # Print a sample text after each epoch
        generate_and_print_sample(
            model, tokenizer, device, start_context
        )

    return train_losses, val_losses, track_tokens_seen


def evaluate_model(model: nn.Module, train_loader, val_loader, device, eval_iter: int,
                   calc_loss_batch=calc_loss_batch) -> tuple[float, float]:  # New: as in calc_loss_loader
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, eval_iter, calc_loss_batch)
        val_loss = calc_loss_loader(val_loader, model, device, eval_iter, calc_loss_batch)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model: nn.Module, tokenizer, device, start_context: str) -> None:
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(
            model=model, idx=encoded,
            max_new_tokens=50, context_size=context_size
        )
    decoded_text = token_ids_to_text(token_ids, tokenizer)
    print(decoded_text.replace("\n", " "))  # Compact print format
    model.train()


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path: str | Path | None = None):
    """Training and validation loss against epochs (bottom axis) and tokens seen (top axis)."""
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax2 = ax1.twiny()  # same y axis, second x axis for tokens seen
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if path is not None:  # New: save the figure atomically (headless runs)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    return fig


# --- The chapter's data and settings -------------------------------------------------------------

DEFAULT_SETTINGS = {
    "learning_rate": 4e-4, "weight_decay": 0.1, "batch_size": 2, "num_epochs": 10,
    "eval_freq": 5, "eval_iter": 5, "train_ratio": 0.9, "seed": 123,
    "start_context": "Every effort moves you",
}
QUICK_SETTINGS = {**DEFAULT_SETTINGS, "learning_rate": 1e-3, "num_epochs": 4, "eval_iter": 2}


def create_train_val_loaders(text: str, cfg: dict, batch_size: int, train_ratio: float = 0.9,
                             num_workers: int = 0, generator: torch.Generator | None = None) -> tuple:
    """Split the text by characters (first part trains, the rest validates) into non-overlapping windows.

    The training loader shuffles, drawing from `generator` (default: PyTorch's global RNG).
    """
    split = int(train_ratio * len(text))
    common = dict(batch_size=batch_size, max_length=cfg["context_length"], stride=cfg["context_length"],
                  num_workers=num_workers)
    train_loader = create_dataloader_v1(text[:split], drop_last=True, shuffle=True, generator=generator, **common)
    val_loader = create_dataloader_v1(text[split:], drop_last=False, shuffle=False, **common)
    return train_loader, val_loader


if __name__ == "__main__":
    import sys

    from ch05.cli import train_main

    sys.exit(train_main())
