"""Chapter 5: pretraining the GPT model on unlabeled text (sections 5.1-5.2).

Loss helpers (`calc_loss_batch`, `calc_loss_loader`), the training loop
(`train_model_simple`) with periodic evaluation and text samples, the loss plot,
resumable checkpoints, and a headless entry point:

    python -m ch05.gpt_train            # the chapter's run: GPT-2 124M shape, context 256, 10 epochs
    python -m ch05.gpt_train --quick    # a small model, about a minute on a laptop CPU

Reuses chapter 2 (data, tokenizer, loaders) and chapter 4 (GPTModel, greedy generation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm  # the text bar: tqdm.auto warns in notebooks without ipywidgets

from ch02.atomic import atomic_path, atomic_write
from ch02.dataloader import create_dataloader_v1
from ch02.download import get_data_file
from ch02.runtime import get_device, reuse_freed_memory, set_seed
from ch02.tokenizer import END_OF_TEXT, get_gpt2_tokenizer
from ch04.gpt import GPT_CONFIG_124M, GPTModel, generate_text_simple
from ch05.checkpoint import load_checkpoint, save_checkpoint, save_model
from ch05.distributed import DistInfo, cleanup, init_distributed, launched_by_torchrun, shard_loader
from ch05.gpt_generate import generate
from ch05.onednn_linear import add_no_onednn_argument, onednn_linear, onednn_linear_supported

# --- 5.1 Evaluating generative text models ----------------------------------------------------

def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """Encode text into a (1, num_tokens) batch of token ids."""
    return torch.tensor(tokenizer.encode(text, allowed_special={END_OF_TEXT})).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    """Decode a (1, num_tokens) batch (or a flat list/tensor) back into text."""
    ids = token_ids.squeeze(0) if isinstance(token_ids, torch.Tensor) else torch.tensor(token_ids)
    return tokenizer.decode(ids.tolist())


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` for mixed precision (e.g. bfloat16), or a no-op when dtype is None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def uses_onednn(device: torch.device | str, autocast_dtype: torch.dtype | None, use_onednn: bool = True) -> bool:
    """Whether `forward_context` runs the linear layers through oneDNN: float32 on a CPU that supports it."""
    return (use_onednn and autocast_dtype in (None, torch.float32) and torch.device(device).type == "cpu"
            and onednn_linear_supported())


def forward_context(device: torch.device | str, autocast_dtype: torch.dtype | None = None, use_onednn: bool = True):
    """The context for training and evaluation forward passes: mixed precision when asked;
    otherwise, on a CPU, float32 linear layers through oneDNN (faster, see `ch05.onednn_linear`)."""
    if autocast_dtype not in (None, torch.float32):
        return autocast_context(device, autocast_dtype)
    return onednn_linear(uses_onednn(device, autocast_dtype, use_onednn))


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device | str) -> torch.Tensor:
    """Mean cross-entropy of the next-token predictions in one batch."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (b, num_tokens, vocab_size)
    # cross_entropy wants (N, classes) and (N,): flatten batch and sequence dimensions.
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


def average_over_batches(data_loader, batch_fn, num_batches: int | None = None) -> float:
    """Mean of `batch_fn(input_batch, target_batch)` over the first `num_batches` batches (all when None).

    Runs under `torch.inference_mode`: no graph is recorded, which saves memory and time.
    Chapter 6 reuses it with its classification loss.
    """
    if len(data_loader) == 0:
        raise ValueError("the data loader has no batches: the text is too short for this batch size and "
                         "context length (lower batch_size or context_length, or use more text)")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    with torch.inference_mode():
        for i, (input_batch, target_batch) in enumerate(data_loader):
            if i >= num_batches:
                break
            total += float(batch_fn(input_batch, target_batch))
    return total / num_batches


def calc_loss_loader(data_loader, model: nn.Module, device: torch.device | str,
                     num_batches: int | None = None) -> float:
    """Average loss over the first `num_batches` batches (all when None), without autograd."""
    return average_over_batches(
        data_loader, lambda inputs, targets: calc_loss_batch(inputs, targets, model, device), num_batches)


def evaluate_model(model: nn.Module, train_loader, val_loader, device, eval_iter: int) -> tuple[float, float]:
    """Train and validation loss on `eval_iter` batches each, in eval mode (no dropout).

    The model goes back to the mode it was in (train mode during training).
    """
    was_training = model.training
    model.eval()
    try:
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    finally:
        model.train(was_training)
    return train_loss, val_loss


def generate_and_print_sample(model: nn.Module, tokenizer, device, start_context: str,
                              max_new_tokens: int = 50) -> str:
    """Greedy continuation of `start_context`, printed on one line and returned."""
    was_training = model.training
    model.eval()
    try:
        context_size = model.pos_emb.weight.shape[0]
        encoded = text_to_token_ids(start_context, tokenizer).to(device)
        if hasattr(model, "reset_kv_cache"):
            # Same greedy tokens as generate_text_simple, but with the KV cache each new
            # token costs one token's work instead of re-reading the whole context.
            token_ids = generate(model, encoded, max_new_tokens, context_size, use_cache=True)
        else:
            token_ids = generate_text_simple(model, encoded, max_new_tokens=max_new_tokens,
                                             context_size=context_size)
    finally:
        model.train(was_training)
    text = token_ids_to_text(token_ids, tokenizer)
    print(text.replace("\n", " "))
    return text


# --- 5.2 Training an LLM ------------------------------------------------------------------------

def _loader_generator(loader) -> torch.Generator | None:
    return getattr(getattr(loader, "sampler", None), "generator", None)


def _device_rng_state(device) -> torch.Tensor | None:
    """The accelerator's RNG state (dropout masks on a GPU come from it, not from the CPU RNG)."""
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_rng_state(torch.device(device))
    if kind == "mps" and hasattr(torch, "mps") and torch.backends.mps.is_available():
        return torch.mps.get_rng_state()
    return None


def _set_device_rng_state(device, state: torch.Tensor | None) -> None:
    if state is None:
        return
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(state.cpu(), torch.device(device))
    elif kind == "mps" and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state.cpu())


def train_model_simple(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    device,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer,
    *,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | Path | None = None,
    max_steps: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    use_onednn: bool = True,
    sample_tokens: int = 50,
    progress: bool = True,
) -> tuple[list[float], list[float], list[int]]:
    """The chapter's training loop: AdamW steps, evaluation every `eval_freq` steps, a sample per epoch.

    Returns (train_losses, val_losses, tokens_seen), one entry per evaluation.

    Extras beyond the book, all optional: a checkpoint is written atomically
    every `checkpoint_every` steps, when `max_steps` stops the run, and at the end
    (`checkpoint_path`);
    `resume_from` continues an interrupted run exactly where it stopped (same
    batches, same dropout masks, same final loss and weights); `max_steps` stops
    early; `autocast_dtype=torch.bfloat16` trains in mixed precision; in float32 on a CPU the
    linear layers run through oneDNN unless `use_onednn=False` (same results, ~10% faster).

    How the exact resume works: the shuffle order of an epoch is drawn from the
    RNG when the epoch's iterator starts, so a checkpoint stores the RNG state of
    that moment plus the current one. Resuming replays the epoch's shuffle from
    the first, skips the batches already trained on, then switches to the current
    state (dropout masks continue as if nothing had happened).
    """
    if len(train_loader) == 0:
        raise ValueError("the training loader has no batches: the text is too short for this batch size and "
                         "context length (lower batch_size or context_length, or use more text)")
    if eval_freq < 1:
        raise ValueError(f"eval_freq must be >= 1, got {eval_freq}")
    # Under DistributedDataParallel the model is a wrapper: evaluate, sample and save the
    # plain model inside it, and let only the first process print and write files.
    core = getattr(model, "module", model)
    is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    sampler = getattr(train_loader, "sampler", None)
    train_losses: list[float] = []
    val_losses: list[float] = []
    track_tokens_seen: list[int] = []
    tokens_seen, global_step, start_epoch, skip_batches = 0, -1, 0, 0
    rng_now = loader_rng_now = None
    gen = _loader_generator(train_loader)

    if resume_from is not None:
        # Load to the CPU: RNG states must stay CPU tensors; weights and optimizer state are
        # copied onto the model's device by load_state_dict.
        state = load_checkpoint(resume_from, core, optimizer, map_location="cpu")
        train_losses, val_losses = list(state["train_losses"]), list(state["val_losses"])
        track_tokens_seen = list(state["track_tokens_seen"])
        tokens_seen, global_step = state["tokens_seen"], state["global_step"]
        start_epoch, skip_batches = state["epoch"], state["batch_in_epoch"]
        rng_now, loader_rng_now = state["rng_state"], state.get("loader_rng_state")
        # Re-create the epoch's shuffle order: restore the RNG as it was when the epoch began.
        torch.set_rng_state(state["rng_epoch_start"].cpu())
        if gen is not None and state.get("loader_rng_epoch_start") is not None:
            gen.set_state(state["loader_rng_epoch_start"].cpu())
        _set_device_rng_state(device, state.get("device_rng_state"))

    def checkpoint(epoch: int, batch_in_epoch: int, rng_epoch_start, loader_rng_epoch_start):
        if not is_main:
            return
        save_checkpoint(
            checkpoint_path, core, optimizer,
            global_step=global_step, epoch=epoch, batch_in_epoch=batch_in_epoch, tokens_seen=tokens_seen,
            train_losses=train_losses, val_losses=val_losses, track_tokens_seen=track_tokens_seen,
            rng_state=torch.get_rng_state(), rng_epoch_start=rng_epoch_start,
            loader_rng_epoch_start=loader_rng_epoch_start,
            # Evaluations iterate the (shuffled) training loader too, moving its generator on.
            loader_rng_state=gen.get_state() if gen is not None else None,
            device_rng_state=_device_rng_state(device),
            num_epochs=num_epochs, config=getattr(core, "cfg", None),
        )

    model.train()
    steps_per_epoch = len(train_loader)
    bar = tqdm(total=num_epochs * steps_per_epoch, initial=global_step + 1, disable=not (progress and is_main),
               desc="training", unit="step")
    stopped = False
    for epoch in range(start_epoch, num_epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # DistributedSampler: a new shuffle each epoch, the same on every rank
        rng_epoch_start = torch.get_rng_state()
        loader_rng_epoch_start = gen.get_state() if gen is not None else None
        batches = iter(train_loader)  # draws the shuffle order from the RNG state above
        if skip_batches:
            for _ in range(skip_batches):  # already trained on before the interruption
                next(batches)
            torch.set_rng_state(rng_now.cpu())  # continue with the dropout RNG where it stopped
            if gen is not None and loader_rng_now is not None:
                gen.set_state(loader_rng_now.cpu())
        for batch_in_epoch, (input_batch, target_batch) in enumerate(batches, start=skip_batches):
            optimizer.zero_grad(set_to_none=True)  # set_to_none frees the gradient memory between steps
            with forward_context(device, autocast_dtype, use_onednn):
                loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            # Free the gradients now rather than at the next step: evaluation and sampling
            # don't need them, and for GPT-2 124M that keeps ~650 MB out of their peak memory.
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += input_batch.numel()
            global_step += 1
            bar.update(1)

            if global_step % eval_freq == 0:
                with forward_context(device, autocast_dtype, use_onednn):
                    train_loss, val_loss = evaluate_model(core, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
                if is_main:
                    bar.write(f"Ep {epoch + 1} (Step {global_step:06d}): "
                              f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")

            if checkpoint_path and checkpoint_every and (global_step + 1) % checkpoint_every == 0:
                checkpoint(epoch, batch_in_epoch + 1, rng_epoch_start, loader_rng_epoch_start)
            if max_steps is not None and global_step + 1 >= max_steps:
                stopped = True
                break
        skip_batches = 0
        if stopped:
            if checkpoint_path:
                checkpoint(epoch, batch_in_epoch + 1, rng_epoch_start, loader_rng_epoch_start)
            break
        if sample_tokens and is_main:
            with autocast_context(device, autocast_dtype):
                generate_and_print_sample(core, tokenizer, device, start_context, sample_tokens)
        if checkpoint_path and epoch + 1 == num_epochs:
            # The end: resuming from here with more epochs continues at the start of the next one.
            # (Not after every epoch: a 124M model's checkpoint with optimizer state is ~2 GB.)
            checkpoint(epoch + 1, 0, torch.get_rng_state(), gen.get_state() if gen is not None else None)
    bar.close()
    return train_losses, val_losses, track_tokens_seen


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
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    return fig


# --- The chapter's run, as a script --------------------------------------------------------------

QUICK_CONFIG = {**GPT_CONFIG_124M, "context_length": 64, "emb_dim": 128, "n_heads": 4, "n_layers": 2}

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


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (frozen ones are skipped, as fine-tuning needs).

    Uses PyTorch's fused AdamW kernel where the device has one (CPU and CUDA in recent
    releases): one kernel updates all tensors, several times faster than a Python loop over
    parameters, which matters for the 50,257-row embedding. Falls back to the multi-tensor
    (`foreach`) version elsewhere.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older PyTorch or a device without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def check_autocast_support(device, dtype: torch.dtype | None) -> None:
    """Refuse mixed precision where the hardware cannot run it, instead of silently crawling."""
    if dtype != torch.bfloat16:
        return
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError("--dtype bfloat16: this GPU has no bfloat16 support; use --dtype float32")
    if kind == "cpu":
        try:
            native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        except (AttributeError, RuntimeError):
            native = False
        if not native:
            raise RuntimeError("--dtype bfloat16: this CPU has no native bfloat16 instructions (AVX512-BF16 or "
                               "AMX), so bfloat16 would be slower than float32; use --dtype float32")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "float32", "fp32"):
        return None
    if name in ("bfloat16", "bf16"):
        return torch.bfloat16
    if name in ("float16", "fp16"):
        return torch.float16
    raise ValueError(f"unsupported --dtype {name!r}; use float32 or bfloat16")


def main(cfg: dict, settings: dict, output_dir: str | Path, device=None, resume: str | None = None,
         checkpoint_every: int | None = None, dtype: str | None = None, text: str | None = None,
         max_steps: int | None = None, progress: bool = True, keep_freed_memory: bool = True,
         use_onednn: bool = True) -> dict:
    """Train on the-verdict (or `text`); write checkpoint.pth, model.pth, config.json and loss.png to `output_dir`.

    checkpoint.pth holds everything needed to resume (`resume=` that path); model.pth
    only the weights, with the model's config beside it in config.json (so
    `python -m ch05.gpt_generate --model <output_dir>/model.pth` can rebuild the model).
    `keep_freed_memory` (default on) trades ~0.3-0.5 GB of peak memory for far fewer page faults:
    on the 2-core benchmark machine the bfloat16 run takes 3 min 4 s with it and 3 min 54 s
    without (see `ch02.runtime.reuse_freed_memory`); turn it off where memory is tight.
    `use_onednn` (default on) runs float32 linear layers on a CPU through oneDNN
    (`ch05.onednn_linear`): same results; back to back there, 5 min 13 s -> 4 min 41 s in fp32.
    """
    if keep_freed_memory:
        reuse_freed_memory()
    dist_info: DistInfo | None = init_distributed() if launched_by_torchrun() else None
    if dist_info is not None:
        device = dist_info.device
    device = torch.device(device) if device is not None else get_device()
    autocast_dtype = parse_dtype(dtype)
    check_autocast_support(device, autocast_dtype)
    output_dir = Path(output_dir)
    set_seed(settings["seed"])
    if text is None:
        text = get_data_file("the-verdict.txt").read_text(encoding="utf-8")
    tokenizer = get_gpt2_tokenizer()
    train_loader, val_loader = create_train_val_loaders(text, cfg, settings["batch_size"], settings["train_ratio"])
    if len(train_loader) == 0 or len(val_loader) == 0:
        raise ValueError(
            f"the text ({len(text):,} characters) is too short for context_length {cfg['context_length']} and "
            f"batch_size {settings['batch_size']}: the {'training' if len(train_loader) == 0 else 'validation'} "
            "split has no full batch. Use more text or lower context_length / batch_size."
        )
    model = GPTModel(cfg).to(device)
    optimizer = make_optimizer(model, settings["learning_rate"], settings["weight_decay"])
    is_main = dist_info is None or dist_info.is_main
    if dist_info is not None:
        # Every rank starts from the same weights (same seed); DDP averages gradients across ranks,
        # and each rank trains on its own shard of the batches: global batch = batch_size x ranks.
        train_loader = shard_loader(train_loader, dist_info, seed=settings["seed"])
        model = torch.nn.parallel.DistributedDataParallel(model)
    if is_main:
        ranks = f", {dist_info.world_size} processes ({torch.distributed.get_backend()})" if dist_info else ""
        precision = ("bfloat16 autocast" if autocast_dtype else
                     "float32, linear layers via oneDNN" if uses_onednn(device, autocast_dtype, use_onednn)
                     else "float32")
        print(f"device: {device}{ranks} ({precision}); {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"{len(train_loader)} training batches per epoch (per process)")

    start = time.perf_counter()
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, device,
        num_epochs=settings["num_epochs"], eval_freq=settings["eval_freq"], eval_iter=settings["eval_iter"],
        start_context=settings["start_context"], tokenizer=tokenizer,
        checkpoint_path=output_dir / "checkpoint.pth", checkpoint_every=checkpoint_every,
        resume_from=resume, max_steps=max_steps, autocast_dtype=autocast_dtype, use_onednn=use_onednn,
        progress=progress,
    )
    elapsed = time.perf_counter() - start
    model = getattr(model, "module", model)
    if dist_info is not None:
        cleanup()
    if not is_main:
        return {"model": model, "train_losses": train_losses, "val_losses": val_losses,
                "tokens_seen": tokens_seen, "seconds": elapsed, "output_dir": output_dir}
    save_model(model, output_dir / "model.pth")
    with atomic_write(output_dir / "config.json") as f:
        json.dump(model.cfg, f, indent=2)
    if train_losses:
        # Fractional epochs from the tokens seen (also right for runs stopped early or resumed).
        tokens_per_epoch = len(train_loader) * settings["batch_size"] * cfg["context_length"]
        epochs_seen = [t / tokens_per_epoch for t in tokens_seen]
        fig = plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, output_dir / "loss.png")
        import matplotlib.pyplot as plt

        plt.close(fig)  # saved to loss.png; don't keep (or, in a notebook, display) the figure
        print(f"final train loss {train_losses[-1]:.3f}, val loss {val_losses[-1]:.3f}, "
              f"perplexity {math.exp(val_losses[-1]):.1f}; {elapsed / 60:.1f} min")
    return {"model": model, "train_losses": train_losses, "val_losses": val_losses,
            "tokens_seen": tokens_seen, "seconds": elapsed, "output_dir": output_dir}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain the chapter-5 GPT model on the-verdict and sample text.")
    p.add_argument("--quick", action="store_true", help="small model and few epochs (about a minute on a CPU)")
    p.add_argument("--epochs", type=int, help="number of epochs (default 10; quick: 4)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 4e-4)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    p.add_argument("--batch-size", type=int, help="batch size (default 2)")
    p.add_argument("--eval-freq", type=int, help="evaluate every N steps (default 5)")
    p.add_argument("--eval-iter", type=int, help="batches per evaluation (default 5)")
    p.add_argument("--context-length", type=int, help="context length (default 256; quick: 64)")
    p.add_argument("--seed", type=int, help="random seed (default 123)")
    p.add_argument("--output-dir", default="outputs/ch05", help="where checkpoint, model, config and plot go")
    p.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps")
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 trains under torch.autocast (mixed precision)")
    p.add_argument("--release-freed-memory", action="store_true",
                   help="hand freed memory back to the OS at once: ~0.3-0.5 GB lower peak memory, but many more "
                        "page faults (up to ~30%% slower; by default freed memory is kept for reuse)")
    add_no_onednn_argument(p)
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> tuple[dict, dict]:
    cfg = dict(QUICK_CONFIG if args.quick else {**GPT_CONFIG_124M, "context_length": 256})
    settings = dict(QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS)
    overrides = {"num_epochs": args.epochs, "learning_rate": args.lr, "weight_decay": args.weight_decay,
                 "batch_size": args.batch_size, "eval_freq": args.eval_freq, "eval_iter": args.eval_iter,
                 "seed": args.seed}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if args.context_length:
        cfg["context_length"] = args.context_length
    return cfg, settings


def cli(argv=None) -> dict:
    """`python -m ch05.gpt_train [options]` as a function (tests call it with a list of arguments)."""
    args = parse_args(argv)
    cfg, settings = settings_from_args(args)
    return main(cfg, settings, args.output_dir, device=args.device, resume=args.resume,
                checkpoint_every=args.checkpoint_every, dtype=args.dtype, max_steps=args.max_steps,
                keep_freed_memory=not args.release_freed_memory, use_onednn=not args.no_onednn)


if __name__ == "__main__":
    cli()
