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
import os
import pickle
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ch02.atomic import remove_stale_temporary_files
from ch02.download import DataUnavailableError
from ch02.runtime import DeviceUnavailableError, outputs_dir
from ch05.checkpoint import CheckpointFileError, CheckpointMismatchError, is_torch_file
from ch05.gpt_download import PretrainedWeightsUnavailable
from ch05.onednn_linear import onednn_linear
from ch05.trainer import TrainingInterrupted

# Exceptions that mean "the user asked for something that cannot be done": one line, exit 2.
USER_ERRORS = (PretrainedWeightsUnavailable, DeviceUnavailableError, CheckpointMismatchError, DataUnavailableError,
               FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, IsADirectoryError, ValueError,
               pickle.UnpicklingError)


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


def device_name(text: str) -> str:
    """A device PyTorch knows and this machine has (cpu, cuda, cuda:1, mps), checked when parsed."""
    from ch02.runtime import get_device

    try:
        get_device(text)
    except (DeviceUnavailableError, RuntimeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(one_line(exc)) from None
    return text


def add_common_args(p: argparse.ArgumentParser, output_dir: str) -> None:
    """Options every training script has (defaults None: the script's settings decide)."""
    p.add_argument("--epochs", type=positive_int, help="number of epochs")
    p.add_argument("--lr", type=positive_float, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=non_negative_float, help="AdamW weight decay")
    p.add_argument("--batch-size", type=positive_int, help="batch size")
    p.add_argument("--eval-freq", type=positive_int, help="evaluate the loss every N steps")
    p.add_argument("--eval-iter", type=positive_int, help="batches per evaluation")
    p.add_argument("--seed", type=int, help="random seed (default 123)")
    p.add_argument("--output-dir", default=output_dir,
                   help=f"where the outputs go (default {output_dir}: outputs/<chapter> at the repository "
                        "root, or under $LLMFS_OUTPUT_DIR)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a trained model already in --output-dir (without it such a folder is refused)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, mps (default: best available)")
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


def one_line(exc: BaseException | str) -> str:
    """A message on one line: an error's advice lines joined with '; '."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def run(main: Callable[[], object], argv_for_resume: list[str] | None = None, onednn: bool = False,
        other_errors: dict[type[BaseException], int] | None = None) -> int:
    """Call `main()`; return the exit code. User mistakes print `error: ...` on one line (exit 2);
    Ctrl-C or SIGTERM during training print how to resume (exit 130 / 143). `other_errors` maps
    more exception types to their exit code (e.g. a server that does not answer: 1); anything
    else keeps its traceback."""
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
            args = [a for a in args if not a.startswith("--resume=")]
            command = " ".join(shlex.quote(a) for a in [*args, "--resume", str(exc.checkpoint)])
            print(f"resume with: python -m {_module_name()} {command}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # outside training (loading, answering): nothing to save
        print("\ninterrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except tuple(other_errors or ()) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return next(code for kind, code in other_errors.items() if isinstance(exc, kind))
    return 0


# --- Checks before the work starts ------------------------------------------------------------------

def check_output_dir(path: str | os.PathLike, overwrite: bool = False, model_patterns: tuple[str, ...] = (),
                     resume: str | os.PathLike | None = None, option: str = "--output-dir") -> Path:
    """Make sure the run can write its results, before it spends any time on training.

    Creates the folder, writes and removes a probe file (PermissionError with the folder's
    name otherwise), removes temporary files left by a killed earlier write, and refuses a
    folder that already holds a finished model (a file matching `model_patterns`) unless
    `overwrite`, or unless the run resumes a checkpoint from that same folder.
    """
    folder = Path(path)
    probe = folder / f".write-probe.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PermissionError(f"{option} {folder} cannot be written ({reason}); nothing was started. "
                              f"Choose a folder you can write to with {option}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    removed = remove_stale_temporary_files(folder)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left in {folder} by an interrupted write", file=sys.stderr)
    resuming_here = resume is not None and Path(resume).resolve().parent == folder.resolve()
    finished = sorted({p.name for pattern in model_patterns for p in folder.glob(pattern)})
    if finished and not overwrite and not resuming_here:
        raise FileExistsError(f"{option} {folder} already holds a trained model ({', '.join(finished)}); "
                              f"pass --overwrite to replace it, or choose another {option}")
    return folder


def check_input_file(path: str | os.PathLike | None, option: str) -> Path | None:
    """A model or checkpoint file given on the command line exists and is of a kind we read.

    Cheap (reads a few bytes, or a .safetensors header): the full load comes later and names the
    file too if the rest is damaged.
    """
    if path is None:
        return None
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{option} {file} does not exist")
    if file.is_dir():
        raise IsADirectoryError(f"{option} {file} is a folder; give the checkpoint file inside it")
    if file.stat().st_size == 0:
        raise CheckpointFileError(f"{option} {file} is empty (0 bytes): not a checkpoint")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise CheckpointFileError(f"{option} {file} is not a readable .safetensors file ({exc})") from None
    elif not is_torch_file(file):
        raise CheckpointFileError(f"{option} {file} is not a PyTorch checkpoint (torch.save writes a zip "
                                  "archive); give the checkpoint.pth or model.pth a run wrote")
    return file


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else "<module>"


# --- python -m ch05.gpt_train --------------------------------------------------------------------------

def train_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ch05.gpt_train",
               description="Pretrain the chapter-5 GPT model on the-verdict and sample text.")
    p.add_argument("--quick", action="store_true", help="small model and few epochs (about a minute on a CPU)")
    add_common_args(p, str(outputs_dir("ch05")))
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
        check_output_dir(args.output_dir, args.overwrite, ("model.pth",), resume=args.resume)
        check_input_file(args.resume, "--resume")
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
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--onednn", action="store_true",
                   help="x86 CPUs, float32: compute linear layers with oneDNN (see benchmarks/README.md)")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    """Print the prompt and its continuation; returns the exit code."""
    from ch02.runtime import get_device
    from ch02.tokenizer import get_gpt2_tokenizer
    from ch05.decoding_layout import layout_for_decoding
    from ch05.gpt_generate import _check_sampling_args, generate, load_model_for_generation
    from ch05.gpt_train import text_to_token_ids, token_ids_to_text

    args = generate_parser().parse_args(argv)

    def main():
        _check_sampling_args(args.temperature, args.top_k, args.top_p)
        if not args.prompt.strip():
            raise ValueError("--prompt is empty: give some text to continue")
        if Path(args.model).is_file():  # a missing file gets the loader's message (it lists the other forms)
            check_input_file(args.model, "--model")
        device = get_device(args.device)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            model, described = load_model_for_generation(args.model, device=device, n_heads=args.n_heads)
        layout_for_decoding(model)  # same numbers, faster one-token products on the CPU
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


# --- python -m ch05.gpt_download -----------------------------------------------------------------------

def download_main(argv: list[str] | None = None) -> int:
    """`python -m ch05.gpt_download [models] [--cache-dir DIR]`; returns the exit code."""
    from ch05.gpt_download import GPT2_MODEL_NAMES, canonical_model_name, download_gpt2_safetensors

    parser = Parser(prog="python -m ch05.gpt_download",
                    description="Download GPT-2 weights (safetensors) into the Hugging Face cache.")
    parser.add_argument("models", nargs="*", default=["gpt2"],
                        help=f"any of {', '.join(GPT2_MODEL_NAMES)} or 124M/355M/774M/1558M (default: gpt2)")
    parser.add_argument("--cache-dir", default=None, help="instead of the default Hugging Face cache")
    args = parser.parse_args(argv)
    for name in args.models:  # every name is checked before anything is downloaded
        try:
            canonical_model_name(name)
        except ValueError as exc:
            parser.error(f"argument models: {exc}")

    def download_all() -> None:
        if args.cache_dir is not None:
            check_output_dir(args.cache_dir, option="--cache-dir")
        for name in args.models:
            print(download_gpt2_safetensors(name, cache_dir=args.cache_dir))

    return run(download_all, argv)
