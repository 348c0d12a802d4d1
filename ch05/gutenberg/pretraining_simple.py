"""Chapter 5 bonus: pretrain chapter 4's GPTModel on the shards `prepare_dataset` wrote.

The book's `pretraining_simple.py` (ch05/03_bonus_pretraining_on_gutenberg) tokenizes one book at a
time, cuts it into windows with chapter 2's `create_dataloader_v1` and trains with chapter 5's loop,
saving the weights now and then and on Ctrl-C. This module keeps its names and switches and trains
from the uint16 shards instead:

* `ShardDataset`: the windows of chapter 2's `GPTDatasetV1` (`max_length` tokens, `stride` apart, the
  target shifted by one) over the shards of one split taken as one stream, read from memory maps
  (`prepare_dataset.ShardSet`): nothing is tokenized or loaded into memory up front;
* `create_dataloaders`: the training windows shuffled by a seeded generator (or in order,
  `--sampling contiguous`), the validation windows of the held-out val shards in order;
* the run is `llmfs.trainer.train` (checkpoints every N steps and on Ctrl-C, exact resume: the epoch,
  the batch in it and the RNG states are in the checkpoint) with chapter 5's loss and evaluation and
  appendix D's schedule (`appendix_d.training.lr_at_step`: linear warm-up, cosine decay; gradient
  clipping after the warm-up), applied by `add_schedule` just before every optimizer step;
* the progress line adds tokens/s and an ETA; with `--log-dir` the curves go to TensorBoard, without
  it the loss plot is chapter 5's `plot_losses`;
* under torchrun: DistributedDataParallel, or with `--fsdp` the model sharded with FSDP2, as
  `python -m ch05.gpt_train` runs (`llmfs.distributed`).

    python -m ch05.gutenberg.prepare_dataset prepare --data-dir BOOKS --output-dir SHARDS
    python -m ch05.gutenberg.pretraining_simple --data-dir SHARDS --output-dir RUN [--quick] [--log-dir TB]
    torchrun --nproc_per_node=2 -m ch05.gutenberg.pretraining_simple --data-dir SHARDS --output-dir RUN [--fsdp]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from appendix_d.training import lr_at_step
from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT_CONFIG_124M, QUICK_CONFIG, GPTModel
from ch05.cli import check_fsdp_settings, check_resume_kind, print_sample
from ch05.gpt_train import calc_loss_batch, evaluate_model, plot_losses
from ch05.gutenberg.prepare_dataset import FORMAT, MANIFEST, PROGRESS, ShardSet
from llmfs.atomic import atomic_write
from llmfs.checkpoint import save_model
from llmfs.cli import (
    Parser,
    add_common_args,
    add_quick_argument,
    check_input_file,
    check_output_dir,
    common_overrides,
    non_negative_int,
    path_argument,
    positive_float,
    positive_int,
    run,
)
from llmfs.distributed import (
    DistInfo,
    cleanup,
    gather_full_state_dict,
    init_distributed,
    launched_by_torchrun,
    shard_loader,
    shard_model,
    under_torchrun,
)
from llmfs.errors import InvalidInput
from llmfs.runtime import get_device, outputs_dir, set_seed
from llmfs.trainer import make_optimizer, train

# The book's settings (lr 5e-4, batch size 4, eval every 100 steps on 1 batch, samples every 1000 steps),
# with appendix D's schedule (warm-up, cosine decay to min_lr, clipping at norm 1.0) and GPT-2's context.
DEFAULT_SETTINGS = {
    "learning_rate": 5e-4, "weight_decay": 0.1, "batch_size": 4, "num_epochs": 1, "max_steps": None,
    "eval_freq": 100, "eval_iter": 1, "print_sample_iter": 1000, "seed": 123,
    "warmup_steps": 100, "initial_lr": 3e-5, "min_lr": 1e-6, "max_norm": 1.0,
    "sampling": "random", "stride": None, "start_context": "Every effort moves you",
}
# Quick: chapter 4's small model, a few dozen steps (seconds on a laptop CPU).
QUICK_SETTINGS = {**DEFAULT_SETTINGS, "learning_rate": 1e-3, "max_steps": 40, "eval_freq": 10, "eval_iter": 2,
                  "print_sample_iter": 40, "warmup_steps": 4}
SAMPLINGS = ("random", "contiguous")


# --- The data: windows over memory-mapped shards -----------------------------------------------------

class ShardDataset(Dataset):
    """Chapter 2's `GPTDatasetV1` windows over a split's shards, read on demand from memory maps.

    Window i is tokens [i * stride, i * stride + max_length] of the split's stream (its shards one after
    the other); input = the first max_length tokens, target = the last max_length. A window may span two
    shards. As in the book, the windows start at range(0, num_tokens - max_length, stride).
    """

    def __init__(self, shards: list[np.ndarray], max_length: int, stride: int):
        self.shards, self.max_length, self.stride = shards, max_length, stride
        self.offsets = np.cumsum([0] + [len(s) for s in shards])  # where each shard starts in the stream
        self.num_tokens = int(self.offsets[-1])
        self.num_windows = len(range(0, self.num_tokens - max_length, stride))

    def __len__(self) -> int:
        return self.num_windows

    def window(self, idx: int) -> np.ndarray:
        """The max_length + 1 token ids of window `idx` (int64)."""
        if not 0 <= idx < self.num_windows:
            raise IndexError(f"window {idx} of {self.num_windows}")
        start = idx * self.stride
        end = start + self.max_length + 1
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1  # the shard `start` falls in
        pieces = []
        while start < end:
            shard_start = int(self.offsets[k])
            take = min(end, int(self.offsets[k + 1])) - start
            pieces.append(self.shards[k][start - shard_start:start - shard_start + take])
            start, k = start + take, k + 1
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(self.window(idx))
        return ids[:-1], ids[1:]  # (max_length,), (max_length,)


def check_prepared(data_dir: str | Path) -> ShardSet:
    """The finished preparation in `data_dir`, or a one-line InvalidInput saying what is wrong."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise InvalidInput(f"--data-dir {folder} is not a folder: give the --output-dir of "
                           "`python -m ch05.gutenberg.prepare_dataset prepare`")
    if not (folder / MANIFEST).exists():
        if (folder / PROGRESS).exists():
            raise InvalidInput(f"--data-dir {folder} holds an unfinished preparation (progress.json, no manifest.json):"
                               " run the same `python -m ch05.gutenberg.prepare_dataset prepare` again to finish it")
        raise InvalidInput(f"--data-dir {folder} is not a prepared folder (no manifest.json): prepare it with "
                           f"`python -m ch05.gutenberg.prepare_dataset prepare --data-dir BOOKS --output-dir {folder}`")
    try:
        shards = ShardSet(folder)
    except ValueError as exc:  # json.JSONDecodeError
        raise InvalidInput(f"{folder / MANIFEST} is not valid JSON ({exc}): prepare again with --overwrite") from None
    if shards.manifest.get("format") != FORMAT:
        raise InvalidInput(f"{folder / MANIFEST} is not of this project's format ({FORMAT!r}): prepare again")
    return shards


def create_dataloaders(shards: ShardSet, batch_size: int, max_length: int, stride: int | None = None,
                       shuffle: bool = True, generator: torch.Generator | None = None,
                       num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """The book's `create_dataloaders`, from shards: the train split's windows (shuffled by `generator`,
    partial last batch dropped) and the val split's in order. Checks first that each split has them."""
    stride = stride or max_length
    train_set = ShardDataset(shards.memmaps("train"), max_length, stride)
    val_set = ShardDataset(shards.memmaps("val"), max_length, stride)
    for name, dataset, needed in (("train", train_set, batch_size), ("val", val_set, 1)):
        if len(dataset) < needed:
            raise InvalidInput(
                f"the {name} shards hold {dataset.num_tokens:,} tokens: {len(dataset)} window(s) of context length "
                f"{max_length} + 1, and {needed} are needed; lower --context-length"
                + (" or --batch-size" if name == "train" else "") + " or prepare more text"
                + (" (a larger --val-fraction)" if name == "val" else ""))
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=shuffle, drop_last=True,
                              generator=generator, num_workers=num_workers)
    val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers)
    return train_loader, val_loader


# --- Appendix D's schedule around the trainer's optimizer steps ---------------------------------------

def steps_taken(optimizer: torch.optim.Optimizer) -> int:
    """How many steps the optimizer has made: AdamW counts them in its state (so a resumed run knows too)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                return int(state["step"])
    return 0


def add_schedule(optimizer: torch.optim.Optimizer, model: nn.Module, total_steps: int, warmup_steps: int,
                 peak_lr: float, initial_lr: float = 3e-5, min_lr: float = 1e-6, max_norm: float = 1.0,
                 lrs: list[float] | None = None):
    """Before every optimizer step: set appendix D's learning rate for that step and, from the end of the
    warm-up on, clip the gradients' norm to `max_norm` (appendix D.4, in the same order). Appends each rate
    to `lrs` when given. Returns the hook's handle (`.remove()` takes it off).

    The step number comes from the optimizer's own count, so the schedule continues after a resume.
    """
    def before_step(opt, args, kwargs):
        step = steps_taken(opt)
        lr = lr_at_step(step, total_steps, warmup_steps, peak_lr, initial_lr, min_lr)
        for param_group in opt.param_groups:
            param_group["lr"] = lr
        if lrs is not None:
            lrs.append(lr)
        if step >= warmup_steps:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm)

    return optimizer.register_step_pre_hook(before_step)


# --- Progress: tokens/s, ETA, TensorBoard ---------------------------------------------------------------

def format_time(seconds: float) -> str:
    """h:mm:ss, as the book's `convert_time` splits it."""
    hours, rem = divmod(int(seconds), 3600)
    minutes, seconds = divmod(rem, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class Progress:
    """Measures training tokens/s between evaluations (evaluation time left out), gives an ETA, and
    writes the curves to TensorBoard when `log_dir` is set (tags: loss/train, loss/val, lr, tokens_per_s)."""

    TAGS = {"train_losses": "loss/train", "val_losses": "loss/val", "lrs": "lr", "tokens_per_s": "tokens_per_s"}

    def __init__(self, optimizer, tokens_per_step: int, total_steps: int, log_dir: str | Path | None = None):
        self.optimizer, self.tokens_per_step, self.total_steps = optimizer, tokens_per_step, total_steps
        self.log_dir, self.writer = log_dir, None
        self.clock, self.last_step = time.perf_counter(), None

    def start(self) -> None:
        """Called before the first training step (after a resume has loaded the optimizer's count)."""
        if self.last_step is None:
            self.clock, self.last_step = time.perf_counter(), steps_taken(self.optimizer)

    def measure(self) -> dict:
        """Called at an evaluation: tokens/s since the last one (or the start), and the step it is at."""
        step = steps_taken(self.optimizer)
        elapsed = time.perf_counter() - self.clock
        rate = (step - self.last_step) * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        self.last_step = step
        return {"tokens_per_s": rate, "step": step}

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def eta(self, step: int, tokens_per_s: float) -> str:
        left = (self.total_steps - step) * self.tokens_per_step
        return format_time(left / tokens_per_s) if tokens_per_s > 0 else "?"

    def log(self, global_step: int, values: dict) -> None:
        if self.log_dir is None:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: after a resume, events the interrupted run wrote from here on are dropped.
            self.writer = SummaryWriter(str(self.log_dir), purge_step=global_step)
        for key, tag in self.TAGS.items():
            if key in values:
                self.writer.add_scalar(tag, values[key], global_step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_log_dir(log_dir: str | Path | None, resume: str | None, overwrite: bool) -> None:
    """A --log-dir with an earlier run's event files is refused (curves of two runs would mix) unless the
    run resumes, or --overwrite, which removes those event files (and only them)."""
    if log_dir is None:
        return
    folder = Path(log_dir)
    if folder.exists() and not folder.is_dir():
        raise InvalidInput(f"--log-dir {folder} is a file, not a folder")
    events = sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []
    if events and resume is None:
        if not overwrite:
            raise FileExistsError(f"--log-dir {folder} already holds TensorBoard events of another run; pass "
                                  "--overwrite to replace them, --resume to continue that run, or another --log-dir")
        for event in events:
            event.unlink()
    folder.mkdir(parents=True, exist_ok=True)


# --- The run ------------------------------------------------------------------------------------------------

def train_model_from_shards(cfg: dict, settings: dict, data_dir: str | Path, output_dir: str | Path, device=None,
                            resume: str | None = None, save_ckpt_freq: int | None = None,
                            log_dir: str | Path | None = None, stop_after: int | None = None,
                            progress: bool = True, sample_tokens: int = 50,
                            on_lr: list[float] | None = None, fsdp: bool = False) -> dict:
    """Train GPTModel(cfg) on the shards in `data_dir`; write model.pth, config.json, checkpoint.pth and (without
    `log_dir`) loss.png to `output_dir`. Returns the model, the history and the timing.

    `stop_after` ends the run after that many optimizer steps in all, with a checkpoint, as Ctrl-C does (the
    schedule stays that of the whole run; resume to continue). `on_lr` collects the learning rate of every step.

    Under torchrun the run is DistributedDataParallel (`batch_size` per process), or with `fsdp` the model is
    sharded with FSDP2 (`batch_size` is the global batch; the checkpoint is the folder checkpoint.dcp), as
    `python -m ch05.gpt_train` does (`ch05.cli.pretrain`); only the first process prints and writes files.
    """
    if settings["sampling"] not in SAMPLINGS:
        raise InvalidInput(f"sampling must be one of {', '.join(SAMPLINGS)}, got {settings['sampling']!r}")
    if fsdp:
        check_fsdp_settings(settings, resume)
    dist_info: DistInfo | None = (init_distributed() if launched_by_torchrun() or (fsdp and under_torchrun())
                                  else None)
    if dist_info is not None:
        device = dist_info.device
    is_main = dist_info is None or dist_info.is_main
    device = get_device(device)
    output_dir = Path(output_dir)
    shards = check_prepared(data_dir)
    set_seed(settings["seed"])
    # New: the shuffle has its own seeded generator; the trainer saves its state in checkpoints.
    generator = torch.Generator().manual_seed(settings["seed"])
    train_loader, val_loader = create_dataloaders(
        shards, settings["batch_size"], cfg["context_length"], settings["stride"],
        shuffle=settings["sampling"] == "random", generator=generator)
    model = GPTModel(cfg).to(device)
    world = dist_info.world_size if dist_info is not None else 1
    global_batch = settings["batch_size"] * (1 if fsdp else world)
    if dist_info is not None and fsdp:
        # Every rank starts from the same weights (same seed) and keeps its slice of each.
        train_loader = shard_loader(train_loader, dist_info, seed=settings["seed"],
                                    batch_size=settings["batch_size"] // world)
        model = shard_model(model, model.trf_blocks)
    elif dist_info is not None:
        train_loader = shard_loader(train_loader, dist_info, seed=settings["seed"])
        model = torch.nn.parallel.DistributedDataParallel(model)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * settings["num_epochs"]
    if settings["max_steps"]:
        total_steps = min(total_steps, settings["max_steps"])
    # Stored in checkpoints: a resume with other values is refused (printing samples changes no step).
    run_settings = {**{k: v for k, v in settings.items() if k != "print_sample_iter"}, "total_steps": total_steps,
                    "data_tokens": shards.num_tokens("train")}

    optimizer = make_optimizer(model, settings["learning_rate"], settings["weight_decay"])
    hook = add_schedule(optimizer, model, total_steps, settings["warmup_steps"], settings["learning_rate"],
                        settings["initial_lr"], settings["min_lr"], settings["max_norm"], lrs=on_lr)
    tokens_per_step = global_batch * cfg["context_length"]  # all processes together
    meter = Progress(optimizer, tokens_per_step, total_steps, log_dir if is_main else None)
    tokenizer = get_gpt2_tokenizer()
    ranks = "" if dist_info is None else f", {world} processes" + (" (FSDP)" if fsdp else " (DDP)")
    if is_main:
        print(f"device: {device}{ranks}; {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"{shards.num_tokens('train'):,} train tokens ({steps_per_epoch:,} batches of {global_batch} x "
              f"{cfg['context_length']} per epoch), {shards.num_tokens('val'):,} val tokens; {total_steps:,} steps "
              f"({settings['sampling']} windows)")

    def evaluate(m: nn.Module) -> dict:
        measured = meter.measure()
        train_loss, val_loss = evaluate_model(m, train_loader, val_loader, device, settings["eval_iter"])
        global_step = measured["step"] - 1
        values = {"train_losses": train_loss, "val_losses": val_loss,
                  "lrs": optimizer.param_groups[0]["lr"], "tokens_per_s": measured["tokens_per_s"]}
        meter.log(global_step, values)
        if sample_tokens and settings["print_sample_iter"] and global_step % settings["print_sample_iter"] == 0:
            # Under FSDP every process generates (the forward is a collective); the first one prints.
            with contextlib.nullcontext() if is_main else contextlib.redirect_stdout(io.StringIO()):
                print_sample(m, tokenizer, device, settings["start_context"], sample_tokens)
        meter.restart_clock()
        return values

    def line(values: dict) -> str:
        step = meter.last_step
        return (f"Train loss {values['train_losses']:.3f}, Val loss {values['val_losses']:.3f}, "
                f"lr {values['lrs']:.2e}, {values['tokens_per_s']:,.0f} tokens/s, "
                f"ETA {meter.eta(step, values['tokens_per_s'])}")

    def loss_fn(m: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        meter.start()
        return calc_loss_batch(inputs, targets, m, device)

    start = time.perf_counter()
    try:
        result = train(model, train_loader, val_loader, optimizer, device, num_epochs=settings["num_epochs"],
                       eval_freq=settings["eval_freq"], eval_iter=settings["eval_iter"],
                       loss_fn=loss_fn,
                       evaluate_fn=evaluate, eval_line=line,
                       checkpoint_path=output_dir / ("checkpoint.dcp" if fsdp else "checkpoint.pth"),
                       checkpoint_every=save_ckpt_freq, resume_from=resume,
                       max_steps=min(stop_after or total_steps, total_steps), progress=progress,
                       run_settings=run_settings, desc="pretraining")
    finally:
        hook.remove()
        meter.close()
    elapsed = time.perf_counter() - start
    model = getattr(model, "module", model)
    if fsdp:
        full = gather_full_state_dict(model)  # the whole weights, gathered into the first process
        if is_main:
            model = GPTModel(cfg)
            model.load_state_dict(full)
    if dist_info is not None:
        cleanup()
    if not is_main:
        return {**result, "model": model, "seconds": elapsed, "total_steps": total_steps,
                "steps_per_epoch": steps_per_epoch}
    save_model(model, output_dir / "model.pth")
    with atomic_write(output_dir / "config.json") as f:
        json.dump(model.cfg, f, indent=2)
    train_losses, val_losses, tokens_seen = result["train_losses"], result["val_losses"], result["tokens_seen"]
    if train_losses and log_dir is None:
        tokens_per_epoch = steps_per_epoch * settings["batch_size"] // (world if fsdp else 1) * cfg["context_length"]
        fig = plot_losses([t / tokens_per_epoch for t in tokens_seen], tokens_seen, train_losses, val_losses,
                          output_dir / "loss.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
    if train_losses:
        print(f"step {result['global_step'] + 1} of {total_steps}: train loss {train_losses[-1]:.3f}, val loss "
              f"{val_losses[-1]:.3f}; {elapsed:.1f} s")
    written = (f"model.pth, config.json, checkpoint.{'dcp' if fsdp else 'pth'}"
               + ("" if log_dir or not train_losses else ", loss.png"))
    print(f"wrote {written} to {output_dir}" + (f"; TensorBoard logs in {log_dir}" if log_dir else ""))
    return {**result, "model": model, "seconds": elapsed, "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch}


# --- A small library to try it on ----------------------------------------------------------------------------

PG_HEADER = ("The Project Gutenberg eBook of {title}\n\nThis eBook is for the use of anyone anywhere in the United "
             "States and most other parts of the world at no cost.\n\n*** START OF THE PROJECT GUTENBERG EBOOK "
             "{title_upper} ***\n\n")
PG_FOOTER = ("\n\n*** END OF THE PROJECT GUTENBERG EBOOK {title_upper} ***\n\nUpdated editions will replace the "
             "previous one--the old editions will be renamed.\n")


def write_demo_library(folder: str | Path, max_chars: int | None = None, doc_chars: int = 20_000) -> list[Path]:
    """A folder of "books" the project can ship offline: tinyshakespeare (its first `max_chars` characters) cut at
    blank lines into documents of about `doc_chars` characters, every other one wrapped in a Project Gutenberg
    header and footer, and the-verdict; plus a binary file and an empty one (the preparation skips both).
    Returns the files written, sorted."""
    from llmfs.download import get_data_file

    folder = Path(folder)
    shakespeare = get_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:max_chars]
    docs, current = [], []
    for paragraph in shakespeare.split("\n\n"):
        current.append(paragraph)
        if sum(len(p) for p in current) >= doc_chars:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    files = {}
    for i, doc in enumerate(docs):
        title = f"Tiny Shakespeare, part {i + 1}"
        if i % 2 == 0:
            doc = PG_HEADER.format(title=title, title_upper=title.upper()) + doc + \
                PG_FOOTER.format(title_upper=title.upper())
        files[f"shakespeare/pg{i + 1:03d}.txt"] = doc.encode("utf-8")
    files["wharton/the-verdict.txt"] = get_data_file("the-verdict.txt").read_bytes()
    files["wharton/cover.png"] = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
    files["notes/empty.txt"] = b""
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return sorted(folder / name for name in files)


# --- The command -----------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    """The book's switches (--data_dir, --n_epochs, --eval_freq, --save_ckpt_freq, --print_sample_iter, --lr,
    --batch_size, --debug) under the project's spelling, plus the schedule, sampling, resume and TensorBoard."""
    p = Parser(prog="python -m ch05.gutenberg.pretraining_simple",
               description="Pretrain chapter 4's GPT model on shards from ch05.gutenberg.prepare_dataset.")
    p.add_argument("--data-dir", "--data_dir", type=path_argument, required=True,
                   help="the --output-dir of `prepare_dataset prepare` (holds manifest.json and the shards)")
    add_quick_argument(p, "chapter 4's small model and 40 steps (the book's --debug)")
    add_common_args(p, str(outputs_dir("ch05") / "gutenberg_pretraining"))
    p.add_argument("--n-epochs", "--n_epochs", dest="epochs", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--max-steps", type=positive_int, help="train at most N steps (the schedule spans them)")
    p.add_argument("--context-length", type=positive_int, help="context length (default 1024; quick: 64)")
    p.add_argument("--save-ckpt-freq", "--checkpoint-every", dest="save_ckpt_freq", type=positive_int,
                   help="also write checkpoint.pth every N steps (it is written at the end and on Ctrl-C anyway)")
    p.add_argument("--print-sample-iter", type=positive_int, help="print a sample at evaluations every N steps")
    p.add_argument("--warmup-steps", type=non_negative_int, help="appendix D's linear warm-up (default 100; quick: 4)")
    p.add_argument("--min-lr", type=positive_float, help="where the cosine decay ends (default 1e-6)")
    p.add_argument("--max-norm", type=positive_float, help="gradient clipping norm after the warm-up (default 1.0)")
    p.add_argument("--sampling", choices=SAMPLINGS, help="random: the windows shuffled, seeded (default); "
                   "contiguous: in order")
    p.add_argument("--stride", type=positive_int, help="tokens between window starts (default: the context length)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint.pth")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 (--batch-size is then the global batch; the "
                        "checkpoint is the folder checkpoint.dcp); without it torchrun runs DDP")
    p.add_argument("--log-dir", type=path_argument, default=None,
                   help="write the curves to TensorBoard here (tensorboard --logdir DIR); without it, loss.png")
    return p


def run_settings_from(args: argparse.Namespace) -> tuple[dict, dict]:
    """(model config, settings) from the command line."""
    cfg = dict(QUICK_CONFIG if args.quick else GPT_CONFIG_124M)
    settings = {**(QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS), **common_overrides(args)}
    chosen = {"max_steps": args.max_steps, "print_sample_iter": args.print_sample_iter,
              "warmup_steps": args.warmup_steps, "min_lr": args.min_lr, "max_norm": args.max_norm,
              "sampling": args.sampling, "stride": args.stride}
    settings.update({k: v for k, v in chosen.items() if v is not None})
    if args.context_length:
        if args.context_length > GPT_CONFIG_124M["context_length"]:
            raise InvalidInput(f"--context-length {args.context_length} is longer than GPT-2's 1024 positions")
        cfg["context_length"] = args.context_length
    return cfg, settings


def main(argv: list[str] | None = None) -> int:
    """`python -m ch05.gutenberg.pretraining_simple --data-dir SHARDS [...]`; returns the exit code."""
    args = parser().parse_args(argv)

    def work() -> None:
        cfg, settings = run_settings_from(args)
        shards = check_prepared(args.data_dir)
        # Every window check before any file is written (create_dataloaders raises the one-line errors).
        create_dataloaders(shards, settings["batch_size"], cfg["context_length"], settings["stride"])
        if args.fsdp:
            check_fsdp_settings(settings, args.resume)
        check_resume_kind(args.resume, args.fsdp)
        if not args.fsdp:
            check_input_file(args.resume, "--resume")
        check_log_dir(args.log_dir, args.resume, args.overwrite)
        check_output_dir(args.output_dir, args.overwrite, ("model.pth",), resume=args.resume,
                         checkpoint="checkpoint.dcp" if args.fsdp else "checkpoint.pth")
        train_model_from_shards(cfg, settings, args.data_dir, args.output_dir, device=args.device,
                                resume=args.resume, save_ckpt_freq=args.save_ckpt_freq, log_dir=args.log_dir,
                                progress=not args.no_progress, fsdp=args.fsdp)

    return run(work, argv, onednn=args.onednn)


if __name__ == "__main__":
    sys.exit(main())
