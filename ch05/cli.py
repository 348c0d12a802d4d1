"""Command lines of the chapter scripts, kept apart from the teaching code.

    python -m ch05.gpt_train [--quick] [...]       # -> train_main (runs ch05.trainer.pretrain)
    python -m ch05.gpt_generate --model gpt2 ...   # -> generate_main

The helpers at the top are shared by chapters 6 and 7: a parser whose errors are one line
(`error: ...`, exit code 2), the options every training script has, and `run`, which turns
a user's mistake into that one line and an interruption into a resume hint, while an
unexpected failure keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import pickle
import shlex
import sys
import warnings
from collections.abc import Callable

import torch

from ch02.download import DataUnavailableError
from ch02.runtime import DeviceUnavailableError
from ch05.checkpoint import CheckpointMismatchError
from ch05.gpt_download import PretrainedWeightsUnavailable
from ch05.onednn_linear import onednn_linear
from ch05.trainer import TrainingInterrupted

# Exceptions that mean "the user asked for something that cannot be done": one line, exit 2.
USER_ERRORS = (PretrainedWeightsUnavailable, DeviceUnavailableError, CheckpointMismatchError, DataUnavailableError, FileNotFoundError,
               NotADirectoryError, PermissionError, IsADirectoryError, ValueError, pickle.UnpicklingError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: argument --lr: ...` instead of usage + message."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_common_args(p: argparse.ArgumentParser, output_dir: str) -> None:
    """Options every training script has (defaults None: the script's settings decide)."""
    p.add_argument("--epochs", type=positive_int, help="number of epochs")
    p.add_argument("--lr", type=positive_float, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=non_negative_float, help="AdamW weight decay")
    p.add_argument("--batch-size", type=positive_int, help="batch size")
    p.add_argument("--eval-freq", type=positive_int, help="evaluate the loss every N steps")
    p.add_argument("--eval-iter", type=positive_int, help="batches per evaluation")
    p.add_argument("--seed", type=int, help="random seed (default 123)")
    p.add_argument("--output-dir", default=output_dir, help=f"where the outputs go (default {output_dir})")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--onednn", action="store_true",
                   help="x86 CPUs, float32: compute linear layers with oneDNN instead of PyTorch's default "
                        "(faster on some AMD EPYC CPUs, slower on Intel Xeon; see benchmarks/README.md)")


def common_overrides(args: argparse.Namespace) -> dict:
    """The settings the common options change, under the chapters' settings keys."""
    values = {"num_epochs": args.epochs, "learning_rate": args.lr, "weight_decay": args.weight_decay,
              "batch_size": args.batch_size, "eval_freq": args.eval_freq, "eval_iter": args.eval_iter,
              "seed": args.seed}
    return {k: v for k, v in values.items() if v is not None}


def run(main: Callable[[], object], argv_for_resume: list[str] | None = None, onednn: bool = False) -> int:
    """Call `main()`; return the exit code. User mistakes print `error: ...` (exit 2); Ctrl-C or
    SIGTERM during training print how to resume (exit 130 / 143)."""
    try:
        with onednn_linear(onednn) if onednn else contextlib.nullcontext():
            main()
    except TrainingInterrupted as exc:
        print(f"\ninterrupted: {exc}", file=sys.stderr)
        if exc.checkpoint is not None:
            args = list(sys.argv[1:] if argv_for_resume is None else argv_for_resume)
            if "--resume" in args:  # resuming again: replace the old --resume value
                i = args.index("--resume")
                del args[i:i + 2]
            command = " ".join(shlex.quote(a) for a in [*args, "--resume", str(exc.checkpoint)])
            print(f"resume with: python -m {_module_name()} {command}", file=sys.stderr)
        return exc.exit_code
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else "<module>"


# --- python -m ch05.gpt_train --------------------------------------------------------------------------

def train_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ch05.gpt_train",
               description="Pretrain the chapter-5 GPT model on the-verdict and sample text.")
    p.add_argument("--quick", action="store_true", help="small model and few epochs (about a minute on a CPU)")
    add_common_args(p, "outputs/ch05")
    p.add_argument("--context-length", type=positive_int, help="context length (default 256; quick: 64)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, help="also checkpoint every N steps")
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after N optimizer steps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 trains under torch.autocast (mixed precision)")
    p.add_argument("--release-freed-memory", action="store_true",
                   help="hand freed memory back to the OS at once: ~0.3-0.5 GB lower peak memory, but many more "
                        "page faults (up to ~30%% slower; by default freed memory is kept for reuse)")
    return p


def train_settings(args: argparse.Namespace) -> tuple[dict, dict]:
    from ch04.gpt import GPT_CONFIG_124M, QUICK_CONFIG
    from ch05.gpt_train import DEFAULT_SETTINGS, QUICK_SETTINGS

    cfg = dict(QUICK_CONFIG if args.quick else {**GPT_CONFIG_124M, "context_length": 256})
    settings = {**(QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS), **common_overrides(args)}
    if args.context_length:
        if args.context_length > GPT_CONFIG_124M["context_length"]:
            raise ValueError(f"--context-length {args.context_length} is longer than GPT-2's 1024 positions")
        cfg["context_length"] = args.context_length
    return cfg, settings


def train_main(argv: list[str] | None = None) -> int:
    """`python -m ch05.gpt_train [options]`; returns the exit code."""
    from ch05.trainer import pretrain

    args = train_parser().parse_args(argv)

    def main():
        cfg, settings = train_settings(args)
        pretrain(cfg, settings, args.output_dir, device=args.device, resume=args.resume,
                 checkpoint_every=args.checkpoint_every, dtype=args.dtype, max_steps=args.max_steps,
                 progress=not args.no_progress, keep_freed_memory=not args.release_freed_memory)

    return run(main, argv, onednn=args.onednn)


# --- python -m ch05.gpt_generate -----------------------------------------------------------------------

def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """--temperature, --top-k, --top-p and --seed, shared with `ch05.generate_llm`."""
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="0 = greedy (default); e.g. 0.7 samples")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=positive_float, default=None,
                   help="sample only from the nucleus of mass p (0 < p <= 1)")
    p.add_argument("--seed", type=int, default=123, help="random seed for sampling (default 123)")


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
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--onednn", action="store_true",
                   help="x86 CPUs, float32: compute linear layers with oneDNN (see benchmarks/README.md)")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    """Print the prompt and its continuation; returns the exit code."""
    from ch02.runtime import get_device
    from ch02.tokenizer import get_gpt2_tokenizer
    from ch05.gpt_generate import _check_sampling_args, generate, load_model_for_generation
    from ch05.gpt_train import text_to_token_ids, token_ids_to_text

    args = generate_parser().parse_args(argv)

    def main():
        _check_sampling_args(args.temperature, args.top_k, args.top_p)
        if not args.prompt:
            raise ValueError("--prompt is empty: give some text to continue")
        device = get_device(args.device)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            model, described = load_model_for_generation(args.model, device=device, n_heads=args.n_heads)
        tokenizer = get_gpt2_tokenizer()
        idx = text_to_token_ids(args.prompt, tokenizer).to(device)
        context = model.cfg["context_length"]
        if idx.shape[1] > context:
            raise ValueError(f"the prompt has {idx.shape[1]} tokens, more than the model's context of {context}")
        generator = torch.Generator(device=device).manual_seed(args.seed)
        print(f"model: {described}; device: {device}", file=sys.stderr)
        out = generate(model, idx, max_new_tokens=args.max_new_tokens, context_size=context,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       eos_id=tokenizer.eot_token if args.stop_at_eos else None,
                       use_cache=not args.no_cache, generator=generator)
        print(token_ids_to_text(out, tokenizer))

    return run(main, argv, onednn=args.onednn)
