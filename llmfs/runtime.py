"""Cross-cutting helpers used by every chapter: device choice, quick mode, seeding, eval mode, and
the one list of the environment variables the project reads (`environment_variables`).

They live here so there is exactly one copy (the chapters import them).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmfs.env_paths import CACHE_ENV, MIRROR_ENV, OUTPUT_ENV, env_path
from llmfs.errors import UserError

QUICK_ENV = "LLMFS_QUICK"
DEVICE_ENV = "LLMFS_DEVICE"
_TRUE = {"1", "true", "yes", "on"}


def outputs_dir(chapter: str) -> Path:
    """Where a chapter's scripts and notebooks write what they produce: `<root>/outputs/<chapter>`.

    One convention for both: the root is the repository's checkout (found from this package's
    location, so a notebook run from `ch06/` and `python -m ch06.gpt_class_finetune` run from
    the repository root write to the same `outputs/ch06/`), or the current folder when the
    package is installed elsewhere. `$LLMFS_OUTPUT_DIR` replaces `<root>/outputs` (the tests
    point it at a temporary folder, so they never write into the checkout); it must be an absolute
    path (`llmfs.env_paths.env_path`: InvalidInput otherwise).
    """
    override = env_path(OUTPUT_ENV)
    if override is not None:
        return override / chapter
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "pyproject.toml").is_file():  # installed, not a checkout
        return Path("outputs") / chapter
    folder = checkout / "outputs" / chapter
    cwd = Path.cwd().resolve()
    if cwd == checkout or checkout in cwd.parents:  # short and readable: outputs/ch05, ../outputs/ch06
        return Path(os.path.relpath(folder, cwd))
    return folder


class DeviceUnavailableError(UserError, RuntimeError):
    """The device or precision asked for is not available here (a setting to change, not a bug)."""


def is_quick() -> bool:
    """True when `LLMFS_QUICK=1`: notebooks and commands (as if given --quick) shrink models and epochs.

    Quick mode keeps every step (loss still falls, text is still generated); it only
    makes the work small enough to run in about a minute on two CPU cores.
    """
    return os.environ.get(QUICK_ENV, "0").strip().lower() in _TRUE


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """Pick the best available device: cuda > mps > cpu.

    `prefer` (a command's `--device`, or the environment variable `LLMFS_DEVICE`) forces a choice,
    e.g. "cpu" when a PyTorch/MPS combination gives wrong results on a Mac. Only the devices the
    project runs on are accepted (cpu, cuda, cuda:N, mps), and only when this machine has them.
    """
    if isinstance(prefer, torch.device):
        prefer = str(prefer)
    where = f"--device {prefer!r}" if prefer is not None else f"{DEVICE_ENV}={os.environ.get(DEVICE_ENV, '')!r}"
    choice = (prefer if prefer is not None else os.environ.get(DEVICE_ENV, "")).strip().lower()
    if prefer is not None and not choice:
        raise DeviceUnavailableError(f"{where} is empty; use 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if choice:
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", choice):
            raise DeviceUnavailableError(f"{where} is not a device this project runs on; use 'cpu', 'cuda', "
                                         "'cuda:N' or 'mps'")
        if choice.startswith("cuda") and not torch.cuda.is_available():
            raise DeviceUnavailableError(f"{where}: CUDA is not available here; use 'cpu' or install a CUDA build "
                                         "of PyTorch")
        if choice == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceUnavailableError(f"{where}: MPS is not available here; use 'cpu'")
        device = torch.device(choice)
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"{where}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_seed(seed: int = 123) -> None:
    """Seed Python, NumPy and PyTorch so runs are reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (no dropout) for the block, then the mode the model was in before.

    Generation, evaluation and classification run inside a training loop, which must get
    its model back in training mode, and outside one, where it must stay in eval mode.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def cpu_bf16_supported() -> bool:
    """True when this CPU has native bfloat16 instructions (AVX512-BF16 or AMX), where bfloat16 autocast
    pays off; elsewhere PyTorch emulates it, slower than float32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def distributed_backend() -> str:
    """The torch.distributed backend that works here: NCCL on CUDA (Linux), Gloo otherwise.

    Choosing it automatically keeps DDP scripts running on laptops, on Windows and on
    CUDA builds without NCCL, where hard-coding "nccl" crashes.
    """
    import torch.distributed as dist

    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def reuse_freed_memory() -> bool:
    """Let the C allocator keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees several ~150 MB tensors (the embedding gradient, the
    logits). glibc serves blocks that large with mmap and returns them on free, so every step
    touches fresh pages: hundreds of thousands of page faults (on the 2-core benchmark machine
    the chapter-5 bfloat16 run took 3 min 54 s without this call and 3 min 4 s with it, for
    ~0.3 GB more peak memory; fp32: ~0.5 GB). Serving them from the heap and not trimming it
    makes later steps reuse warm pages.
    Only on Linux with glibc; elsewhere it does nothing and returns False. Scripts call it
    once at start-up; importing a module never does.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


# --- The environment variables the project reads ---------------------------------------------------

@dataclass(frozen=True)
class EnvironmentVariable:
    """One environment variable the project reads: its default and what setting it changes.

    `effect(value)` is a few words on what this value does ("" when the value says it all), or None
    when the value means the same as leaving the variable unset. `announced`: `llmfs.cli.run` names the variable on the
    command's first line when its value is not the default (the project's own LLMFS_* variables;
    the others belong to other tools, which name them in their own messages). `also`: variables
    read alongside it with the same role (torchrun's others, the lower-case proxy names).
    """

    name: str
    default: str
    meaning: str
    effect: Callable[[str], str | None]
    announced: bool = True
    also: tuple[str, ...] = ()


def _switch_on(what: str) -> Callable[[str], str | None]:
    return lambda value: what if value.strip().lower() in _TRUE else None


def _when_set(what: str = "") -> Callable[[str], str | None]:
    return lambda value: what if value.strip() else None


def environment_variables() -> tuple[EnvironmentVariable, ...]:
    """Every environment variable the project's code reads, with its default and meaning (one list,
    so none of them is a silent switch: the README's table and `llmfs.cli.run`'s first line come
    from here)."""
    return (
        EnvironmentVariable(QUICK_ENV, "0 (off)",
                            "1: quick mode: the notebooks, and the commands that take --quick, shrink models, "
                            "data and epochs to run in about a minute on a CPU",
                            _switch_on("quick mode: notebooks and every command that takes --quick")),
        EnvironmentVariable(DEVICE_ENV, "unset (best available: cuda, then mps, then cpu)",
                            "force a device (cpu, cuda, cuda:N, mps) where no --device option is given",
                            _when_set()),
        EnvironmentVariable(OUTPUT_ENV, "unset (outputs/ in the checkout, or in the current folder)",
                            "folder (an absolute path) that replaces outputs/: results go to "
                            "$LLMFS_OUTPUT_DIR/<chapter>", _when_set("outputs go there")),
        EnvironmentVariable(MIRROR_ENV, "unset",
                            "read-only folder (an absolute path) searched first for the data files (checked "
                            "by sha256)", _when_set("data files come from there first")),
        EnvironmentVariable(CACHE_ENV, "~/.cache/llms-from-scratch",
                            "where downloaded data files are kept (an absolute path)", _when_set("download cache")),
        EnvironmentVariable("LLMFS_DECODING_LAYOUT", "1 (on)",
                            "0: generation keeps the float32 weights in their training layout "
                            "(llmfs.decoding_layout; to compare speed on another CPU)",
                            lambda value: "decoding layout off" if value.strip() == "0" else None),
        EnvironmentVariable("HF_HUB_OFFLINE", "unset (downloads allowed)",
                            "1: pretrained weights come only from the local Hugging Face cache (huggingface_hub "
                            "reads it too)", _switch_on("Hugging Face cache only"), announced=False),
        EnvironmentVariable("HF_ENDPOINT", "https://huggingface.co",
                            "a Hugging Face mirror to download pretrained weights from",
                            _when_set("Hugging Face mirror"), announced=False),
        EnvironmentVariable("OLLAMA_HOST", "http://localhost:11434",
                            "the Ollama server `ch07.ollama_evaluate` and `ch07.dpo.preference_data` ask "
                            "(host:port or a URL)",
                            _when_set("Ollama server"), announced=False),
        EnvironmentVariable("WORLD_SIZE", "unset (one process)",
                            "set by torchrun (with LOCAL_RANK, RANK, ...): train data-parallel across processes "
                            "(`llmfs.distributed`, appendix A's DDP-script.py)", lambda value: None, announced=False,
                            also=("LOCAL_RANK", "RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                  "GLOO_SOCKET_IFNAME", "TORCHELASTIC_RUN_ID")),
        EnvironmentVariable("TOKENIZERS_PARALLELISM", "unset",
                            "Hugging Face tokenizers' thread switch: `python -m benchmarks.bpe` sets it around each "
                            "measurement and puts the previous value back", lambda value: None, announced=False),
        EnvironmentVariable("HTTPS_PROXY", "unset",
                            "a proxy for downloads; with one set, the quick direct reachability check of "
                            "HF_ENDPOINT is skipped", lambda value: None, announced=False,
                            also=("https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")),
    )


def environment_notice(environ: Mapping[str, str] | None = None) -> str | None:
    """The line naming the project's settings that come from the environment, or None when all are
    the defaults, e.g. `settings from the environment: LLMFS_DEVICE=cpu, LLMFS_DECODING_LAYOUT=0 (decoding
    layout off)`. Names only the announced variables (the project's own)."""
    environ = os.environ if environ is None else environ
    parts = []
    for var in environment_variables():
        value = environ.get(var.name)
        if var.announced and value is not None and (effect := var.effect(value)) is not None:
            parts.append(f"{var.name}={value}" + (f" ({effect})" if effect else ""))
    return f"settings from the environment: {', '.join(parts)}" if parts else None
