"""The command-line toolkit every command uses: one parser, one set of option checks, one error path.

* `Parser`: argparse whose errors are one line (`error: ...`, exit code 2) instead of a usage block, and
  which refuses a relative path in LLMFS_OUTPUT_DIR, LLMFS_DATA_MIRROR or LLMFS_CACHE_DIR the same way;
* the option types (`positive_int`, `positive_float`, `device_name`, ...) and the option groups every
  training command has (`add_common_args`, `add_sampling_arguments`);
* `run(main)`: first names the settings that come from the environment (`llmfs.runtime.environment_notice`);
  then a `UserError` (and an OS error about a path the user named) becomes `error: ...` on one line,
  exit code 2; Ctrl-C or SIGTERM during training print how to resume, and Ctrl-C elsewhere one line
  (with what was kept, when a command says); anything else, a `ValueError`
  from a bug included, keeps its traceback;
* the checks made before any work starts (`check_output_dir`, `check_input_file`);
* `chapter_module`, so a command started with `python -m chNN.module` never imports that module twice.

The chapters' own commands (`ch05.cli`, `ch06.cli`, `ch07.cli`, the bonus folders) are built from these.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from llmfs.atomic import remove_stale_temporary_files
from llmfs.checkpoint import CheckpointFileError, is_torch_file
from llmfs.env_paths import check_path_variables
from llmfs.errors import InvalidInput, UserError
from llmfs.onednn_linear import onednn_linear
from llmfs.runtime import DeviceUnavailableError, environment_notice
from llmfs.trainer import TrainingInterrupted

# What `run` prints as one line (exit 2): the project's own exception for a user's mistake, and the OS
# errors about a path the user named. Everything else is a bug and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
               IsADirectoryError)


def other_torchrun_process() -> bool:
    """True in the second, third, ... process torchrun started: every process checks the same options
    and fails the same way, and the first one says it (one line, not one per process)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("RANK", "0") != "0"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: argument --lr: ...` instead of usage + message.

    Made before any option default is computed, it first refuses a relative path in a path-valued
    variable (`llmfs.env_paths.check_path_variables`; defaults such as `outputs_dir(...)` read them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            check_path_variables()
        except UserError as exc:
            self.exit(2, None if other_torchrun_process() else f"error: {one_line(exc)}\n")

    def error(self, message: str):
        self.exit(2, None if other_torchrun_process() else f"error: {message} (see --help)\n")


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An option type for a whole number from `low` to `high` (no upper end when `high` is None),
    e.g. `whole_number(1, 65535)` for a port: the range is said in the one-line error."""
    what = f"from {low} to {high}" if high is not None else f">= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number {what}, got {text}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a whole number {what}, got {text}")
        return value

    parse.__name__ = f"whole number {what}"
    return parse


positive_int = whole_number(1)
non_negative_int = whole_number(0)


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


def path_argument(text: str) -> Path:
    """A file or folder option: an empty value is refused (as a Path it would silently mean the current
    folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; name a file or folder")
    return Path(text)


def device_name(text: str) -> str:
    """A device PyTorch knows and this machine has (cpu, cuda, cuda:1, mps), checked when parsed."""
    from llmfs.runtime import get_device

    try:
        get_device(text)
    except DeviceUnavailableError as exc:
        raise argparse.ArgumentTypeError(one_line(exc)) from None
    return text


def add_quick_argument(p: argparse.ArgumentParser, what: str) -> None:
    """--quick: `what` the command makes small. `LLMFS_QUICK=1` turns it on too (as it does in the
    notebooks), and the command's first line on stderr says so (`run`)."""
    from llmfs.runtime import is_quick

    p.add_argument("--quick", action="store_true", default=is_quick(), help=f"{what} (also: LLMFS_QUICK=1)")


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
    Ctrl-C or SIGTERM during training print how to resume (exit 130 / 143); Ctrl-C elsewhere prints
    `interrupted`, followed by the message of a KeyboardInterrupt a command raised again with what
    it kept and how to continue (exit 130). `other_errors` maps
    more exception types to their exit code (e.g. a server that does not answer: 1); anything
    else keeps its traceback.

    First, on stderr, the line naming the project's settings taken from the environment, when any
    differs from its default (no silent switches); under torchrun only the first process prints it.
    """
    notice = environment_notice()
    if notice and os.environ.get("RANK", "0") == "0":
        print(notice, file=sys.stderr)
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
    except KeyboardInterrupt as exc:  # outside training: nothing to save, or a command says what it kept
        print(f"\ninterrupted: {one_line(exc)}" if str(exc) else "\ninterrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if not other_torchrun_process():
            print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except tuple(other_errors or ()) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return next(code for kind, code in other_errors.items() if isinstance(exc, kind))
    return 0


# --- Checks before the work starts ------------------------------------------------------------------

def check_output_dir(path: str | os.PathLike, overwrite: bool = False, model_patterns: tuple[str, ...] = (),
                     resume: str | os.PathLike | None = None, option: str = "--output-dir",
                     checkpoint: str | None = None) -> Path:
    """Make sure the run can write its results, before it spends any time on training.

    Refuses an empty path (which would mean the current folder without saying so). Creates the
    folder, writes and removes a probe file (PermissionError with the folder's name otherwise),
    removes temporary files left by a killed earlier write, and refuses a folder that already
    holds a finished model (a file matching `model_patterns`) or the training checkpoint of an
    earlier run (the file named `checkpoint`, e.g. one interrupted by Ctrl-C) unless `overwrite`,
    or unless the run resumes a checkpoint from that same folder.
    """
    if not str(path).strip():
        raise InvalidInput(f"{option} is empty; name a folder (e.g. {option} outputs/run1)")
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
    earlier = folder / checkpoint if checkpoint else None
    if earlier is not None and earlier.exists() and not overwrite and not resuming_here:
        raise FileExistsError(f"{option} {folder} holds {checkpoint} of an earlier run that did not finish; "
                              f"continue it with --resume {earlier}, pass --overwrite to start afresh, or "
                              f"choose another {option}")
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
    # `python -m ch07.dpo` runs ch07/dpo/__main__.py: the command is the package's name
    return spec.name.removesuffix(".__main__") if spec is not None else "<module>"


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """--temperature, --top-k, --top-p and --seed, shared with `ch05.llama.generate_llm`."""
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="0 = greedy (default); e.g. 0.7 samples")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=positive_float, default=None,
                   help="sample only from the nucleus of mass p (0 < p <= 1)")
    p.add_argument("--seed", type=int, default=123, help="random seed for sampling (default 123)")


def chapter_module(name: str) -> ModuleType:
    """The chapter module `name`, never imported a second time.

    `python -m ch05.gpt_train` executes gpt_train.py as `__main__`; the command it hands over to needs
    the same listings, and `import ch05.gpt_train` would execute the file again as another module
    (two copies of every class and setting). When `name` is what `python -m` runs, that is the module.
    """
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == name:
        return main
    return importlib.import_module(name)
