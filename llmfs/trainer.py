"""The training layer around the book's loops: what a long headless run needs beyond chapter 5's listing.

`ch05.gpt_train.train_model_simple` is the book's loop, kept as the book writes it. `train`
here runs the same steps in the same order (same batches, same dropout masks, so the same
losses and weights; `tests/test_llmfs_trainer.py` proves it, and `tests/test_ch07_dpo_dpo.py`
for the DPO loop `ch07.dpo.dpo.train_model_dpo_simple`) and adds:

* checkpoints written atomically every `checkpoint_every` steps, at the end, and when the
  run is interrupted (Ctrl-C / SIGTERM: the current step finishes, a checkpoint is written
  and `TrainingInterrupted` says how to resume);
* exact resume (`resume_from`): the epoch's shuffle order is re-drawn from the RNG state
  saved at the start of the epoch, the batches already trained on are skipped, then the
  RNG continues where it stopped, so dropout masks and batches are those of an
  uninterrupted run;
* a loss that stops being a finite number (a learning rate far too high) ends the run with
  `TrainingDiverged` before that step updates anything; no checkpoint or final weights that are
  not finite numbers are ever handed out, so the last checkpoint on disk stays the last good one;
* DistributedDataParallel under `torchrun` (`llmfs.distributed`), `max_steps`, mixed
  precision (`autocast_dtype`), a progress bar;
* a model sharded with FSDP (`llmfs.distributed.shard_model`): checkpoints are then folders that
  all processes write together (`llmfs.distributed.save_sharded_checkpoint`) and that resume on
  any number of processes; evaluation and `epoch_end_fn` run on every process (the sharded
  model's forward is a collective);
* hooks, so that chapter 5 (the book's loss, evaluation and sample), chapter 6 (classification
  loss, accuracies), chapter 7 (chapter 5's loss on instruction data) and chapter 7's DPO (a
  batch that is a dict of chosen and rejected answers, reward margins tracked beside the losses)
  reuse the same loop instead of copying it: the loss, the evaluation and the counting are passed
  in, this module knows no chapter.

The chapter-5 run (`python -m ch05.gpt_train`) is `ch05.cli.pretrain`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm  # the text bar: tqdm.auto warns in notebooks without ipywidgets

from llmfs.checkpoint import (
    CheckpointMismatchError,
    check_state_dict,
    load_state_file,
    save_checkpoint,
)
from llmfs.distributed import (
    is_sharded,
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    read_sharded_training_state,
    save_sharded_checkpoint,
)
from llmfs.errors import InvalidInput, UserError
from llmfs.runtime import DeviceUnavailableError, cpu_bf16_supported

# --- Optimizer and precision -----------------------------------------------------------------------


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (frozen ones are skipped, as fine-tuning needs).

    Uses PyTorch's fused AdamW kernel where the device has one (CPU and CUDA in recent
    releases): one kernel updates all tensors, several times faster than a Python loop over
    parameters. The same arithmetic as the book's `torch.optim.AdamW(model.parameters(), ...)`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidInput("the model has no trainable parameters (all have requires_grad=False)")
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older PyTorch or a device without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def autocast_context(device: torch.device | str, dtype: torch.dtype | None):
    """`torch.autocast` for mixed precision (e.g. bfloat16), or a no-op when dtype is None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def check_autocast_support(device, dtype: torch.dtype | None) -> None:
    """Refuse mixed precision where the hardware cannot run it, instead of silently crawling."""
    if dtype != torch.bfloat16:
        return
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceUnavailableError("--dtype bfloat16: this GPU has no bfloat16 support; use --dtype float32")
    if kind == "cpu" and not cpu_bf16_supported():
        raise DeviceUnavailableError("--dtype bfloat16: this CPU has no native bfloat16 instructions (AVX512-BF16 or "
                                     "AMX), so bfloat16 would be slower than float32; use --dtype float32")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "float32", "fp32"):
        return None
    if name in ("bfloat16", "bf16"):
        return torch.bfloat16
    if name in ("float16", "fp16"):
        return torch.float16
    raise InvalidInput(f"unsupported --dtype {name!r}; use float32 or bfloat16")


# --- RNG state, for exact resume ------------------------------------------------------------------

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


# --- Interrupts ----------------------------------------------------------------------------------------

class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped training after a finished step; `checkpoint` is where it was saved."""

    def __init__(self, signum: int, checkpoint: Path | None, step: int):
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        name = signal.Signals(signum).name
        saved = f"; checkpoint written to {checkpoint}" if checkpoint else " (no checkpoint path: nothing saved)"
        super().__init__(f"{name} after step {step + 1}{saved}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@contextlib.contextmanager
def _deferred_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """Record SIGINT/SIGTERM instead of dying mid-step; a second Ctrl-C stops at once."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can only be installed from the main thread
        return
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        received.append(signum)
        signal.signal(signum, previous[signum])  # the next one acts as it did before

    for s in signals:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class TrainingDiverged(UserError, RuntimeError):
    """The loss (or the weights) stopped being finite numbers: the run stops before saving anything.

    A learning rate far too high is the usual cause. Nothing is trained on or written after the bad
    step, so the last checkpoint on disk (if any) is one of finite weights, and no final model is written.
    """

    def __init__(self, what: str, step: int, lr: float, last_checkpoint: Path | None):
        self.step, self.last_checkpoint = step, last_checkpoint
        kept = (f"the last checkpoint, {last_checkpoint}, is kept as it was" if last_checkpoint
                else "no checkpoint or model was written")
        super().__init__(f"training diverged at step {step}: {what}; {kept}. Start again with a lower "
                         f"learning rate (this run used {lr:g})")


def _all_finite(tensors, device, everywhere: bool = False) -> bool:
    """Whether every tensor holds only finite numbers; with `everywhere`, on every process under torchrun
    (a collective: every process must ask)."""
    ok = torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all()
    if everywhere and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = ok.to(device=device, dtype=torch.float32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())
    return bool(ok.item())


def _any_process(flag: bool, device) -> bool:
    """Whether `flag` is True on any process (a collective: every process must ask)."""
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


# --- Resuming ----------------------------------------------------------------------------------------

def _plain(settings: dict | None) -> dict | None:
    """The settings values torch.load(weights_only=True) can read back (numbers, strings, None, lists)."""
    if settings is None:
        return None
    ok = (int, float, str, bool, type(None))
    return {k: v for k, v in settings.items() if isinstance(v, ok) or
            (isinstance(v, (list, tuple)) and all(isinstance(x, ok) for x in v))}


# Settings a resumed run may change: more epochs, and how much it prints.
RESUMABLE_CHANGES = ("num_epochs", "num_threads", "max_new_tokens", "num_test", "sample_tokens")


def check_resume_settings(state: dict, path: str | Path, cfg: dict | None, settings: dict | None,
                          sharded: bool = False) -> None:
    """Refuse to resume the checkpoint `state` (read from `path`) with another model config or other
    training settings, naming what differs. One written before settings were stored is checked by its config.
    `sharded`: `state` is the training state of a sharded checkpoint folder (its weights are beside it).
    """
    if "model_state_dict" not in state and not sharded:
        raise CheckpointMismatchError(f"{path} is not a training checkpoint (it holds weights only); resume needs "
                                      "the checkpoint.pth a run writes")
    missing = [k for k in ("global_step", "epoch", "batch_in_epoch", "rng_state", "rng_epoch_start") if k not in state]
    if missing or ("history" not in state and "train_losses" not in state):
        raise CheckpointMismatchError(f"{path} lacks the training state a resume needs ({', '.join(missing or ['history'])}"
                                      "; e.g. the book's model_and_optimizer.pth): resume needs the checkpoint.pth "
                                      "a run of this project writes")
    differ = []
    saved_cfg = state.get("config")
    if isinstance(saved_cfg, dict) and cfg is not None:
        differ += [f"model {k}: checkpoint {saved_cfg.get(k)!r}, now {cfg.get(k)!r}"
                   for k in sorted(set(saved_cfg) | set(cfg)) if saved_cfg.get(k) != cfg.get(k)]
    saved = state.get("run_settings")
    if isinstance(saved, dict) and settings is not None:
        now = _plain(settings)
        differ += [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
                   for k in sorted(set(saved) | set(now)) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
    if differ:
        raise CheckpointMismatchError(f"cannot resume {path}: it was written with other settings ("
                                      + "; ".join(differ) + "); resume with the options of the interrupted run")


# --- The loop ------------------------------------------------------------------------------------------

def _count_pair(batch) -> tuple[int, int]:
    """(tokens, examples) of an (inputs, targets) batch: the size of its inputs."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"cannot count the tokens of a {type(batch).__name__} batch; pass train(count_fn=...)")
    return inputs.numel(), inputs.shape[0]


def _losses_line(values: dict) -> str:
    return f"Train loss {values['train_losses']:.3f}, Val loss {values['val_losses']:.3f}"


def train(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    device,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    *,
    loss_fn: Callable,
    evaluate_fn: Callable,
    epoch_end_fn: Callable | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | Path | None = None,
    max_steps: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "training",
    final_checkpoint: bool = True,
    run_settings: dict | None = None,
    count_fn: Callable | None = None,
    eval_line: Callable[[dict], str] | None = None,
) -> dict:
    """The book's loop with the extras of this module; returns the history and counters.

    loss_fn(model, input_batch, target_batch) -> loss (chapter 5: its `calc_loss_batch`) for a
    loader that yields (inputs, targets) pairs; for any other batch (DPO's dict) loss_fn(model, batch).
    evaluate_fn(model) -> (train_loss, val_loss) (chapter 5: its `evaluate_model` on `eval_iter`
    batches), or a dict {history name: value} to record several values (DPO: losses and rewards);
    eval_line(values) is the text of the progress line after "Ep 1 (Step 000005): " (default: the
    train and val losses). count_fn(batch) -> (tokens, examples) (default: the size of a pair's inputs).
    epoch_end_fn(model, epoch) -> dict of values to record or None
    (chapter 5 prints a sample; chapter 6 measures accuracies). The result holds
    "train_losses", "val_losses", "tokens_seen" (one entry per evaluation; with a dict from
    evaluate_fn, a list per key instead of the two losses), a list per key that epoch_end_fn
    returned, and the totals "tokens", "examples", "global_step".
    `final_checkpoint=False` writes no checkpoint at the end (fine-tuning saves its model instead;
    a checkpoint with optimizer state is three times the weights' size). `run_settings` (the
    run's settings dict) is stored in checkpoints; resuming with different values (other than
    num_epochs) raises CheckpointMismatchError naming them.
    """
    if len(train_loader) == 0:
        raise InvalidInput("the training loader has no batches: the text is too short for this batch size and "
                         "context length (lower batch_size or context_length, or use more text)")
    if eval_freq < 1:
        raise InvalidInput(f"eval_freq must be >= 1, got {eval_freq}")
    # Under DistributedDataParallel the model is a wrapper: evaluate, sample and save the
    # plain model inside it, and let only the first process print and write files.
    core = getattr(model, "module", model)
    is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    # New: under FSDP every process holds a slice of the weights, so saving, loading, the finiteness
    # check of the weights and every forward pass (evaluation, samples) involve all processes.
    sharded = is_sharded(core)
    sampler = getattr(train_loader, "sampler", None)
    gen = _loader_generator(train_loader)
    steps_per_epoch = len(train_loader)
    history: dict[str, list] = {"train_losses": [], "val_losses": [], "tokens_seen": []}
    tokens, examples, global_step, start_epoch, skip_batches = 0, 0, -1, 0, 0
    rng_now = loader_rng_now = None

    if resume_from is not None:
        # Load to the CPU: RNG states must stay CPU tensors; weights and optimizer state are
        # copied onto the model's device by load_state_dict.
        if sharded != is_sharded_checkpoint(resume_from):
            raise CheckpointMismatchError(
                f"{resume_from} is a sharded checkpoint folder: resume it with --fsdp under torchrun" if not sharded
                else f"{resume_from} is not a sharded checkpoint folder: a sharded (FSDP) run resumes the "
                     "checkpoint.dcp folder an FSDP run wrote")
        if sharded:
            state = read_sharded_training_state(resume_from)
            check_resume_settings(state, resume_from, getattr(core, "cfg", None), run_settings, sharded=True)
            load_sharded_checkpoint(resume_from, core, optimizer)
        else:
            state = load_state_file(resume_from, map_location="cpu")
            check_resume_settings(state, resume_from, getattr(core, "cfg", None), run_settings)
            check_state_dict(core, state["model_state_dict"], source=str(resume_from))
            core.load_state_dict(state["model_state_dict"])
            if "optimizer_state_dict" not in state:
                raise CheckpointMismatchError(f"{resume_from} has no optimizer state to resume from")
            optimizer.load_state_dict(state["optimizer_state_dict"])
        saved_steps = state.get("steps_per_epoch")
        if saved_steps is not None and saved_steps != steps_per_epoch:
            raise CheckpointMismatchError(
                f"{resume_from} was written by a run with {saved_steps} training batches per epoch, this run has "
                f"{steps_per_epoch}: resume with the same data, batch size and context length")
        if "history" not in state:  # written before the trainer had its own module
            state["history"] = {"train_losses": state["train_losses"], "val_losses": state["val_losses"],
                                "tokens_seen": state["track_tokens_seen"]}
        history = {k: list(v) for k, v in state["history"].items()}
        tokens, examples = state.get("tokens", state.get("tokens_seen")), state.get("examples", 0)
        global_step, start_epoch, skip_batches = state["global_step"], state["epoch"], state["batch_in_epoch"]
        if start_epoch >= num_epochs:
            raise InvalidInput(f"{resume_from} is a finished run of {state['epoch']} epochs: nothing to resume "
                             f"(ask for more epochs to train on from there)")
        rng_now, loader_rng_now = state["rng_state"], state.get("loader_rng_state")
        # Re-create the epoch's shuffle order: restore the RNG as it was when the epoch began.
        torch.set_rng_state(state["rng_epoch_start"].cpu())
        if gen is not None and state.get("loader_rng_epoch_start") is not None:
            gen.set_state(state["loader_rng_epoch_start"].cpu())
        _set_device_rng_state(device, state.get("device_rng_state"))
        if is_main:
            writes = f"; checkpoints go to {checkpoint_path}" if checkpoint_path else ""
            print(f"resumed from {resume_from} at epoch {start_epoch + 1}, step {global_step + 1} "
                  f"({skip_batches} of the epoch's {steps_per_epoch} batches done){writes}")

    last_saved = Path(resume_from) if resume_from is not None else None

    def lr_now() -> float:
        return optimizer.param_groups[0]["lr"]

    def check_weights() -> None:
        """Never save (or hand back for saving) weights that are not finite numbers. (DDP keeps the
        weights equal on every process, so each can check its own copy; under FSDP each checks its
        slice and all must agree.)"""
        weights = [p.to_local() if hasattr(p, "to_local") else p for p in core.parameters()]
        if not _all_finite(weights, device, everywhere=sharded):
            raise TrainingDiverged("the weights are no longer finite numbers (a gradient overflowed)",
                                   global_step + 1, lr_now(), last_saved)

    def checkpoint(epoch: int, batch_in_epoch: int, rng_epoch_start, loader_rng_epoch_start) -> Path | None:
        nonlocal last_saved
        check_weights()
        if not (checkpoint_path and (is_main or sharded)):
            return None
        save = save_sharded_checkpoint if sharded else save_checkpoint  # the sharded one: every process
        last_saved = save(
            checkpoint_path, core, optimizer,
            global_step=global_step, epoch=epoch, batch_in_epoch=batch_in_epoch, tokens=tokens,
            examples=examples, history=history, num_epochs=num_epochs, steps_per_epoch=steps_per_epoch,
            rng_state=torch.get_rng_state(), rng_epoch_start=rng_epoch_start,
            loader_rng_epoch_start=loader_rng_epoch_start,
            # Evaluations iterate the (shuffled) training loader too, moving its generator on.
            loader_rng_state=gen.get_state() if gen is not None else None,
            device_rng_state=_device_rng_state(device), config=getattr(core, "cfg", None),
            run_settings=_plain(run_settings),
        )
        return last_saved

    count = count_fn or _count_pair
    describe = eval_line or _losses_line
    bar = tqdm(total=num_epochs * steps_per_epoch, initial=global_step + 1, disable=not (progress and is_main),
               desc=desc, unit="step")
    stopped = False
    with _deferred_signals() as received:
        for epoch in range(start_epoch, num_epochs):
            model.train()
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
            for batch_in_epoch, batch in enumerate(batches, start=skip_batches):
                optimizer.zero_grad(set_to_none=True)
                with autocast_context(device, autocast_dtype):
                    # An (inputs, targets) pair as two arguments, as the book's calc_loss_batch takes them
                    loss = loss_fn(model, *batch) if isinstance(batch, (tuple, list)) else loss_fn(model, batch)
                # New: a loss that is no longer a number ends the run before it updates or saves anything.
                if not _all_finite([loss], device, everywhere=True):
                    bar.close()
                    value = loss.detach().float().item()
                    what = (f"the training loss is {value}" if not math.isfinite(value)
                            else "another process's training loss is not a finite number")
                    raise TrainingDiverged(what, global_step + 2, lr_now(), last_saved)
                loss.backward()
                optimizer.step()
                # Free the gradients now rather than at the next step: evaluation and sampling
                # don't need them, and for GPT-2 124M that keeps ~650 MB out of their peak memory.
                optimizer.zero_grad(set_to_none=True)
                batch_tokens, batch_examples = count(batch)
                tokens += batch_tokens
                examples += batch_examples
                global_step += 1
                bar.update(1)

                if global_step % eval_freq == 0:
                    with autocast_context(device, autocast_dtype):
                        values = evaluate_fn(core)
                    if not isinstance(values, dict):
                        values = dict(zip(("train_losses", "val_losses"), values, strict=True))
                    for key, value in values.items():
                        history.setdefault(key, []).append(value)
                    history["tokens_seen"].append(tokens)
                    if "train_losses" in values and "val_losses" in values:
                        bar.set_postfix(train=f"{values['train_losses']:.3f}", val=f"{values['val_losses']:.3f}")
                    if is_main:
                        bar.write(f"Ep {epoch + 1} (Step {global_step:06d}): " + describe(values))

                if sharded and _any_process(bool(received), device) and not received:
                    received.append(signal.SIGINT)  # New: another process was interrupted: all save together
                if received:
                    bar.close()
                    saved = checkpoint(epoch, batch_in_epoch + 1, rng_epoch_start, loader_rng_epoch_start)
                    raise TrainingInterrupted(received[0], saved, global_step)
                if checkpoint_every and (global_step + 1) % checkpoint_every == 0:
                    checkpoint(epoch, batch_in_epoch + 1, rng_epoch_start, loader_rng_epoch_start)
                if max_steps is not None and global_step + 1 >= max_steps:
                    stopped = True
                    break
            skip_batches = 0
            if stopped:
                checkpoint(epoch, batch_in_epoch + 1, rng_epoch_start, loader_rng_epoch_start)
                break
            if epoch_end_fn is not None:
                with autocast_context(device, autocast_dtype):
                    recorded = epoch_end_fn(core, epoch) if is_main or sharded else None
                for key, value in (recorded or {}).items():
                    history.setdefault(key, []).append(value)
            if epoch + 1 == num_epochs and final_checkpoint:
                # The end: resuming from here with more epochs continues at the start of the next one.
                # (Not after every epoch: a 124M model's checkpoint with optimizer state is ~2 GB.)
                checkpoint(epoch + 1, 0, torch.get_rng_state(), gen.get_state() if gen is not None else None)
    bar.close()
    check_weights()  # what the caller saves as the final model
    return {**history, "tokens": tokens, "examples": examples, "global_step": global_step}
