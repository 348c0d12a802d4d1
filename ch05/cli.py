"""Chapter 5's commands: the chapter's listings wired to the project's machinery (`llmfs`).

    python -m ch05.gpt_train [--quick] [...]       # -> train_main -> pretrain (llmfs.trainer.train)
    python -m ch05.gpt_train --model DIR [...]     # New: a Llama 3.x / Qwen3 / Gemma 3 shaped model instead
    torchrun --nproc_per_node=2 -m ch05.gpt_train --quick [--fsdp]   # DDP, or FSDP (llmfs.distributed)
    python -m ch05.gpt_generate --model gpt2 ...   # -> generate_main
    python -m ch05.gpt_download gpt2               # -> download_main

`pretrain` is the chapter-5 run: the book's data loaders, loss and evaluation (`ch05.gpt_train`)
inside the training layer (`llmfs.trainer`: checkpoints on Ctrl-C, exact resume, torchrun), and
`print_sample`, the book's `generate_and_print_sample` decoded with the KV cache. The listing
modules are looked up with `llmfs.cli.chapter_module`, so `python -m ch05.gpt_train` runs
gpt_train.py once.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ch02.tokenizer import END_OF_TEXT, get_gpt2_tokenizer
from ch04.gpt import GPT_CONFIG_124M, QUICK_CONFIG, GPTModel
from llmfs.atomic import atomic_write
from llmfs.checkpoint import CheckpointFileError, save_model
from llmfs.cli import (
    Parser,
    add_common_args,
    add_quick_argument,
    add_sampling_arguments,
    chapter_module,
    check_input_file,
    check_output_dir,
    common_overrides,
    device_name,
    non_negative_float,
    non_negative_int,
    positive_int,
    run,
)
from llmfs.decoding_layout import layout_for_decoding
from llmfs.distributed import (
    DistInfo,
    cleanup,
    gather_full_state_dict,
    init_distributed,
    is_sharded_checkpoint,
    launched_by_torchrun,
    shard_loader,
    shard_model,
    under_torchrun,
)
from llmfs.download import get_data_file
from llmfs.errors import InvalidInput
from llmfs.int8 import add_int8_argument, check_int8_options, quantize_int8
from llmfs.runtime import get_device, outputs_dir, reuse_freed_memory, set_seed
from llmfs.trainer import check_autocast_support, make_optimizer, parse_dtype, train


def gpt_train():
    """Chapter 5's training listings (`ch05.gpt_train`)."""
    return chapter_module("ch05.gpt_train")


def gpt_generate():
    """Chapter 5's decoding listings (`ch05.gpt_generate`)."""
    return chapter_module("ch05.gpt_generate")


# --- The chapter-5 run: python -m ch05.gpt_train ------------------------------------------------------

def pretrain(cfg: dict, settings: dict, output_dir: str | Path, device=None, resume: str | None = None,
             checkpoint_every: int | None = None, dtype: str | None = None, text: str | None = None,
             max_steps: int | None = None, progress: bool = True, keep_freed_memory: bool = True,
             sample_tokens: int = 50, fsdp: bool = False, model_dir: str | Path | None = None,
             load_weights: bool = False) -> dict:
    """Train on the-verdict (or `text`); write checkpoint.pth, model.pth, config.json and loss.png to `output_dir`.

    checkpoint.pth holds everything needed to resume (`resume=` that path); model.pth
    only the weights, with the model's config beside it in config.json (so
    `python -m ch05.gpt_generate --model <output_dir>/model.pth` can rebuild the model).
    `keep_freed_memory` (default on) trades ~0.3-0.5 GB of peak memory for far fewer page
    faults (see `llmfs.runtime.reuse_freed_memory`); turn it off where memory is tight. It changes
    the C allocator of the whole process, so the run says so in its first lines.

    `fsdp` (under torchrun, one process or more) shards the model with FSDP2 (`llmfs.distributed`):
    `settings["batch_size"]` is then the global batch, split across the processes; the checkpoint is
    the folder checkpoint.dcp, which resumes on any number of processes. The returned "model" is the
    whole model on the first process (the one written to model.pth), the sharded one on the others.

    New: `model_dir`, a Hugging Face Llama 3.x / Qwen3 / Gemma 3 text folder, trains that family's model
    instead (`cfg`: its config, `ch05.llama.family_training.family_config`), from random init or, with
    `load_weights`, from the folder's weights; the text is tokenized with the folder's tokenizer.json, and
    the result is a Hugging Face folder in `output_dir` (config.json, model.safetensors, tokenizer files)
    in place of model.pth (`python -m ch05.llama --model <output_dir>` and transformers load it).
    """
    if fsdp:
        check_fsdp_settings(settings, resume)
    kept_freed_memory = reuse_freed_memory() if keep_freed_memory else False
    dist_info: DistInfo | None = (init_distributed() if launched_by_torchrun() or (fsdp and under_torchrun())
                                  else None)
    if dist_info is not None:
        device = dist_info.device
    device = get_device(device)
    autocast_dtype = parse_dtype(dtype)
    check_autocast_support(device, autocast_dtype)
    output_dir = Path(output_dir)
    set_seed(settings["seed"])
    if text is None:
        text = get_data_file("the-verdict.txt").read_text(encoding="utf-8")
    listings = gpt_train()
    if model_dir is None:
        tokenizer = get_gpt2_tokenizer()
        check_text_fits(text, tokenizer, cfg["context_length"], settings["batch_size"], settings["train_ratio"])
        train_loader, val_loader = listings.create_train_val_loaders(text, cfg, settings["batch_size"],
                                                                     settings["train_ratio"])
        model = GPTModel(cfg).to(device)
    else:  # New: another family's model, tokenizer and loaders (ch05.llama.family_training)
        from ch05.llama import family_training

        model, tokenizer, _ = family_training.build_family_model(model_dir, cfg, load_weights)
        check_text_fits(text, tokenizer, cfg["context_length"], settings["batch_size"], settings["train_ratio"])
        train_loader, val_loader = family_training.create_train_val_loaders(
            text, cfg, settings["batch_size"], tokenizer, settings["train_ratio"])
        model = model.to(device)
    empty_model = (lambda: GPTModel(cfg)) if model_dir is None else lambda: type(model)(cfg)
    is_main = dist_info is None or dist_info.is_main
    batch_per_process = settings["batch_size"]
    if dist_info is not None and fsdp:
        # New: every rank starts from the same weights (same seed) and keeps its slice of each;
        # global batch = batch_size, each rank trains on batch_size / ranks of it.
        batch_per_process = settings["batch_size"] // dist_info.world_size
        train_loader = shard_loader(train_loader, dist_info, seed=settings["seed"], batch_size=batch_per_process)
        model = shard_model(model, model.trf_blocks)
    elif dist_info is not None:
        # Every rank starts from the same weights (same seed); DDP averages gradients across ranks,
        # and each rank trains on its own shard of the batches: global batch = batch_size x ranks.
        train_loader = shard_loader(train_loader, dist_info, seed=settings["seed"])
        model = torch.nn.parallel.DistributedDataParallel(model)
    # After sharding: under FSDP the optimizer updates (and keeps the moments of) this rank's slices.
    optimizer = make_optimizer(model, settings["learning_rate"], settings["weight_decay"])
    if settings.get("warmup_steps"):
        add_warmup(optimizer, settings["learning_rate"], settings["warmup_steps"])
    if is_main:
        ranks = f", {dist_info.world_size} processes ({torch.distributed.get_backend()})" if dist_info else ""
        if fsdp:
            ranks += f", FSDP (global batch {settings['batch_size']})"
        precision = "bfloat16 autocast" if autocast_dtype else "float32"
        print(f"device: {device}{ranks} ({precision}); {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"{len(train_loader)} training batches per epoch (per process)")
        if kept_freed_memory:
            print("memory: freed memory is kept for reuse, for fewer page faults (--release-freed-memory, "
                  "or pretrain(keep_freed_memory=False), turns this off)")

    def sample(m: nn.Module, epoch: int) -> None:
        if sample_tokens:
            # Under FSDP every process generates (the forward is a collective); the first one prints.
            with contextlib.nullcontext() if is_main else contextlib.redirect_stdout(io.StringIO()):
                print_sample(m, tokenizer, device, settings["start_context"], sample_tokens)

    start = time.perf_counter()
    result = train(model, train_loader, val_loader, optimizer, device, num_epochs=settings["num_epochs"],
                   eval_freq=settings["eval_freq"], eval_iter=settings["eval_iter"],
                   loss_fn=lambda m, inputs, targets: listings.calc_loss_batch(inputs, targets, m, device),
                   evaluate_fn=lambda m: listings.evaluate_model(m, train_loader, val_loader, device,
                                                                 settings["eval_iter"]),
                   epoch_end_fn=sample,
                   checkpoint_path=output_dir / ("checkpoint.dcp" if fsdp else "checkpoint.pth"),
                   checkpoint_every=checkpoint_every,
                   resume_from=resume, max_steps=max_steps, autocast_dtype=autocast_dtype, progress=progress,
                   run_settings=settings)
    elapsed = time.perf_counter() - start
    model = getattr(model, "module", model)
    if fsdp:
        # New: the whole weights, gathered once into the first process, for the usual model.pth.
        full = gather_full_state_dict(model)
        if is_main:
            model = empty_model()
            model.load_state_dict(full)
    train_losses, val_losses, tokens_seen = result["train_losses"], result["val_losses"], result["tokens_seen"]
    out = {"model": model, "train_losses": train_losses, "val_losses": val_losses, "tokens_seen": tokens_seen,
           "seconds": elapsed, "output_dir": output_dir}
    if dist_info is not None:
        cleanup()
    if not is_main:
        return out
    if model_dir is None:
        save_model(model, output_dir / "model.pth")
        with atomic_write(output_dir / "config.json") as f:
            json.dump(model.cfg, f, indent=2)
    else:  # New: a Hugging Face folder of the family (the source's config.json and tokenizer files)
        from ch05.llama.hf_save import save_hf_folder

        save_hf_folder(model, output_dir, model_dir)
    if train_losses:
        # Fractional epochs from the tokens seen (also right for runs stopped early or resumed).
        tokens_per_epoch = len(train_loader) * batch_per_process * cfg["context_length"]  # as tokens_seen: per process
        epochs_seen = [t / tokens_per_epoch for t in tokens_seen]
        fig = gpt_train().plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, output_dir / "loss.png")
        import matplotlib.pyplot as plt

        plt.close(fig)  # saved to loss.png; don't keep (or, in a notebook, display) the figure
        print(f"final train loss {train_losses[-1]:.3f}, val loss {val_losses[-1]:.3f}, "
              f"perplexity {math.exp(val_losses[-1]):.1f}; {elapsed / 60:.1f} min")
    beside = f"config.json, checkpoint.{'dcp' if fsdp else 'pth'}" + (" and loss.png" if train_losses else "")
    if model_dir is not None:
        beside += ", the tokenizer files"
    # The folder as given (a notebook's relative outputs path stays relative, with no machine-specific prefix).
    print(f"wrote {output_dir / ('model.pth' if model_dir is None else 'model.safetensors')} and, beside it, "
          f"{beside}")
    return out


def check_fsdp_settings(settings: dict, resume: str | Path | None) -> None:
    """Refuse, before any work, what an FSDP run cannot honour: a run outside torchrun, a global batch
    the processes cannot split evenly, a single-file checkpoint to resume from."""
    if not under_torchrun():
        raise InvalidInput("--fsdp shards the model across the processes torchrun starts; run it as "
                           "torchrun --nproc_per_node=N -m ch05.gpt_train --fsdp ... (N=1 works too)")
    world = int(os.environ["WORLD_SIZE"])
    if settings["batch_size"] % world:
        raise InvalidInput(f"--fsdp: the batch size {settings['batch_size']} is the global batch and must be "
                           f"divisible by the {world} processes; use a multiple of {world}")
    if resume is not None and not Path(resume).exists():
        raise FileNotFoundError(f"--resume {resume} does not exist")
    if resume is not None and not Path(resume).is_dir():
        raise InvalidInput(f"--fsdp resumes the checkpoint.dcp folder an --fsdp run writes; {resume} is not a "
                           "folder (a checkpoint.pth resumes without --fsdp)")


def check_text_fits(text: str, tokenizer, context_length: int, batch_size: int, train_ratio: float) -> None:
    """Raise InvalidInput, before any work, unless both splits of `text` give what training needs.

    `create_train_val_loaders` cuts each split into windows of `context_length` tokens (stride
    `context_length`, plus the one-token-shifted target): the training split needs `batch_size`
    windows (it drops a partial last batch), the validation split one.
    """
    split = int(train_ratio * len(text))
    for name, part, needed in (("training", text[:split], batch_size), ("validation", text[split:], 1)):
        tokens = len(tokenizer.encode(part, allowed_special={END_OF_TEXT}))
        windows = len(range(0, tokens - context_length, context_length))
        if windows < needed:
            raise InvalidInput(
                f"the text ({len(text):,} characters) is too short for context_length {context_length} and "
                f"batch_size {batch_size}: its {name} split ({tokens:,} tokens) gives {windows} window(s) of "
                f"{context_length} + 1 tokens, and {needed} are needed. Use more text or lower the context "
                "length / batch size."
            )


def add_warmup(optimizer: torch.optim.Optimizer, peak_lr: float, warmup_steps: int) -> None:
    """New: a linear warm-up (appendix D's first phase) for `--warmup-steps`: step k (from 0) trains
    at peak_lr * min(1, (k + 1) / (warmup_steps + 1)), then at peak_lr, chapter 5's constant rate.
    Set just before each optimizer step from the optimizer's own step count, so a resumed run goes on
    where it stopped (the hyperparameter search's warm-up, `ch05.hparam_tuning`, is the same)."""
    def set_lr(opt: torch.optim.Optimizer, args, kwargs) -> None:
        done = next((int(st["step"]) for st in opt.state.values() if "step" in st), 0)
        for group in opt.param_groups:
            group["lr"] = peak_lr * min(1.0, (done + 1) / (warmup_steps + 1))

    optimizer.register_step_pre_hook(set_lr)


def print_sample(model: nn.Module, tokenizer, device, start_context: str, max_new_tokens: int = 50) -> str:
    """`generate_and_print_sample` with the KV cache: the same greedy tokens, each for one token's work."""
    listings = gpt_train()
    encoded = listings.text_to_token_ids(start_context, tokenizer).to(device)
    # New: the context from the config (a Llama, Qwen3 or Gemma 3 model has no position embedding)
    token_ids = gpt_generate().generate(model, encoded, max_new_tokens, model.cfg["context_length"], use_cache=True)
    text = listings.token_ids_to_text(token_ids, tokenizer)
    print(text.replace("\n", " "))
    return text


# --- python -m ch05.gpt_train --------------------------------------------------------------------------

def train_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ch05.gpt_train",
               description="Pretrain the chapter-5 GPT model on the-verdict and sample text.")
    add_quick_argument(p, "small model and few epochs (about a minute on a CPU)")
    add_common_args(p, str(outputs_dir("ch05")))
    p.add_argument("--context-length", type=positive_int, help="context length (default 256; quick: 64)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="New: pretrain another family's architecture: a Hugging Face Llama 3.x, Qwen3 (dense or "
                        "MoE) or Gemma 3 text folder; its config.json shapes the model (random init), its "
                        "tokenizer.json tokenizes the text, and the output folder is a Hugging Face folder "
                        "(default: the chapter's GPT-2)")
    p.add_argument("--load-weights", action="store_true",
                   help="with --model: start from the folder's weights (continued pretraining) instead of "
                        "random init")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, help="also checkpoint every N steps")
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after N optimizer steps")
    p.add_argument("--drop-rate", type=non_negative_float, default=None,
                   help="dropout rate of the model (default 0.1, the book's)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=0,
                   help="raise the learning rate linearly to --lr over the first N steps (default 0: none)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state across the processes "
                        "(FSDP2, for a model that does not fit one device); --batch-size is then the global batch "
                        "and the checkpoint is the folder checkpoint.dcp, resumable on any number of processes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 trains under torch.autocast (mixed precision)")
    p.add_argument("--release-freed-memory", action="store_true",
                   help="hand freed memory back to the OS at once: ~0.3-0.5 GB lower peak memory, but many more "
                        "page faults (up to ~30%% slower; by default freed memory is kept for reuse)")
    return p


def train_settings(args: argparse.Namespace) -> tuple[dict, dict]:
    listings = gpt_train()
    settings = {**(listings.QUICK_SETTINGS if args.quick else listings.DEFAULT_SETTINGS), **common_overrides(args)}
    if getattr(args, "model", None) is not None:  # New: another family (ch05.llama.family_training)
        return family_train_config(args), settings
    if getattr(args, "load_weights", False):
        raise InvalidInput("--load-weights starts from the weights of a --model folder; give --model DIR")
    cfg = dict(QUICK_CONFIG if args.quick else {**GPT_CONFIG_124M, "context_length": 256})
    if args.context_length:
        if args.context_length > GPT_CONFIG_124M["context_length"]:
            raise InvalidInput(f"--context-length {args.context_length} is longer than GPT-2's 1024 positions")
        cfg["context_length"] = args.context_length
    if args.drop_rate is not None:
        if args.drop_rate >= 1:
            raise InvalidInput(f"--drop-rate must be below 1, got {args.drop_rate}")
        cfg["drop_rate"] = args.drop_rate
    if args.warmup_steps:
        settings["warmup_steps"] = args.warmup_steps  # only when set: earlier checkpoints keep resuming
    return cfg, settings


def family_train_config(args: argparse.Namespace) -> dict:
    """New: the config of a --model folder's model (InvalidInput naming what does not fit), its context
    shortened to --context-length (default the chapter's 256, quick 64, or the model's own if shorter)."""
    from ch05.llama import family_training

    if args.drop_rate is not None:
        raise InvalidInput("--drop-rate sets the GPT model's dropout; Llama, Qwen3 and Gemma 3 have none "
                           "(leave it out with --model)")
    folder = Path(args.model).expanduser()
    if not (folder / "config.json").is_file():
        raise InvalidInput(f"--model {args.model} is not a model folder with a config.json (a Hugging Face "
                           "Llama 3.x, Qwen3 or Gemma 3 text folder)")
    full = family_training.family_config(args.model)
    wanted = args.context_length or (QUICK_CONFIG if args.quick else {"context_length": 256})["context_length"]
    if args.context_length and args.context_length > full["context_length"]:
        raise InvalidInput(f"--context-length {args.context_length} is longer than the {full['context_length']} "
                           f"positions of the model in {args.model}")
    return {**full, "context_length": min(wanted, full["context_length"])}


def train_main(argv: list[str] | None = None) -> int:
    """`python -m ch05.gpt_train [options]`; returns the exit code."""
    parser = train_parser()
    args = parser.parse_args(argv)
    if args.onednn and args.dtype != "float32":
        parser.error("--onednn computes float32 linear layers and cannot run with --dtype bfloat16; choose one")

    if args.fsdp and args.device == "mps":
        parser.error("--fsdp runs on CUDA (NCCL) or the CPU (Gloo); PyTorch has no process group for mps")

    def main():
        cfg, settings = train_settings(args)
        if args.fsdp:
            check_fsdp_settings(settings, args.resume)
        check_resume_kind(args.resume, args.fsdp)
        check_output_dir(args.output_dir, args.overwrite,
                         ("model.pth",) if args.model is None else ("model.safetensors",), resume=args.resume,
                         checkpoint="checkpoint.dcp" if args.fsdp else "checkpoint.pth")
        if not args.fsdp:
            check_input_file(args.resume, "--resume")
        pretrain(cfg, settings, args.output_dir, device=args.device, resume=args.resume,
                 checkpoint_every=args.checkpoint_every, dtype=args.dtype, max_steps=args.max_steps,
                 progress=not args.no_progress, keep_freed_memory=not args.release_freed_memory, fsdp=args.fsdp,
                 model_dir=args.model, load_weights=args.load_weights)

    return run(main, argv, onednn=args.onednn)


def check_resume_kind(resume: str | None, fsdp: bool) -> None:
    """A sharded checkpoint folder resumes only with --fsdp (and --fsdp only from one): said before any work."""
    if resume is None or not Path(resume).is_dir():
        return
    if not is_sharded_checkpoint(resume):
        raise CheckpointFileError(f"--resume {resume} is a folder but not a sharded checkpoint (no .metadata and "
                                  "train_state.pth); give the checkpoint.pth or checkpoint.dcp a run wrote")
    if not fsdp:
        raise InvalidInput(f"--resume {resume} is the sharded checkpoint of an --fsdp run; resume it with --fsdp "
                           "under torchrun (any number of processes)")


def generate_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ch05.gpt_generate",
               description="Generate text with GPT-2 or a model trained in chapter 5.")
    p.add_argument("--model", default="gpt2",
                   help="gpt2, gpt2-medium, gpt2-large, gpt2-xl (or 124M ... 1558M); a Hugging Face GPT-2 "
                        "folder or .safetensors file; or checkpoint.pth / model.pth from ch05.gpt_train")
    p.add_argument("--prompt", default="Every effort moves you", help="text to continue")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=50, help="tokens to add (default 50)")
    add_sampling_arguments(p)
    p.add_argument("--no-cache", action="store_true", help="recompute all tokens each step (no KV cache)")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at <|endoftext|>")
    p.add_argument("--n-heads", type=positive_int, default=None,
                   help="attention heads, for a weights-only file without config (normally inferred)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--onednn", action="store_true",
                   help="x86 CPUs, float32: compute linear layers with oneDNN (see benchmarks/README.md)")
    add_int8_argument(p)
    return p


def generate_main(argv: list[str] | None = None) -> int:
    """Print the prompt and its continuation; returns the exit code."""
    args = generate_parser().parse_args(argv)
    listings, generation = gpt_train(), gpt_generate()

    def main():
        generation.check_sampling_args(args.temperature, args.top_k, args.top_p)
        check_int8_options(args.int8, args.onednn)
        if not args.prompt.strip():
            raise InvalidInput("--prompt is empty: give some text to continue")
        if Path(args.model).is_file():  # a missing file gets the loader's message (it lists the other forms)
            check_input_file(args.model, "--model")
        device = get_device(args.device)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            model, described = generation.load_model_for_generation(args.model, device=device, n_heads=args.n_heads)
        if args.int8:
            quantize_int8(model)  # int8 linear layers (llmfs.int8); before the layout, which skips them
            described += ", int8 weights"
        layout_for_decoding(model)  # same numbers, faster one-token products on the CPU
        tokenizer = get_gpt2_tokenizer()
        idx = listings.text_to_token_ids(args.prompt, tokenizer).to(device)
        context = model.cfg["context_length"]
        if idx.shape[1] > context:
            raise InvalidInput(f"the prompt has {idx.shape[1]} tokens, more than the model's context of {context}")
        generator = torch.Generator(device=device).manual_seed(args.seed)
        print(f"model: {described}; device: {device}", file=sys.stderr)
        out = generation.generate(model, idx, max_new_tokens=args.max_new_tokens, context_size=context,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       eos_id=tokenizer.eot_token if args.stop_at_eos else None,
                       use_cache=not args.no_cache, generator=generator)
        print(listings.token_ids_to_text(out, tokenizer))

    return run(main, argv, onednn=args.onednn)


# --- python -m ch05.gpt_download -----------------------------------------------------------------------

def download_main(argv: list[str] | None = None) -> int:
    """`python -m ch05.gpt_download [models] [--cache-dir DIR]`; returns the exit code."""
    download = chapter_module("ch05.gpt_download")
    GPT2_MODEL_NAMES, canonical_model_name = download.GPT2_MODEL_NAMES, download.canonical_model_name
    download_gpt2_safetensors = download.download_gpt2_safetensors

    parser = Parser(prog="python -m ch05.gpt_download",
                    description="Download GPT-2 weights (safetensors) into the Hugging Face cache.")
    parser.add_argument("models", nargs="*", default=["gpt2"],
                        help=f"any of {', '.join(GPT2_MODEL_NAMES)} or 124M/355M/774M/1558M (default: gpt2)")
    parser.add_argument("--cache-dir", default=None, help="instead of the default Hugging Face cache")
    args = parser.parse_args(argv)
    for name in args.models:  # every name is checked before anything is downloaded
        try:
            canonical_model_name(name)
        except InvalidInput as exc:
            parser.error(f"argument models: {exc}")

    def download_all() -> None:
        if args.cache_dir is not None:
            check_output_dir(args.cache_dir, option="--cache-dir")
        for name in args.models:
            print(download_gpt2_safetensors(name, cache_dir=args.cache_dir))

    return run(download_all, argv)
