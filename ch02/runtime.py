"""Cross-cutting helpers used by every chapter: device choice, quick mode, seeding.

They live here, in the earliest chapter that needs them, so there is exactly one
copy (later chapters import them).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

QUICK_ENV = "LLMFS_QUICK"
DEVICE_ENV = "LLMFS_DEVICE"


def is_quick() -> bool:
    """True when `LLMFS_QUICK=1`: notebooks and scripts shrink models and epochs.

    Quick mode keeps every step (loss still falls, text is still generated); it only
    makes the work small enough to run in about a minute on two CPU cores.
    """
    return os.environ.get(QUICK_ENV, "0").strip().lower() in {"1", "true", "yes", "on"}


def get_device(prefer: str | None = None) -> torch.device:
    """Pick the best available device: cuda > mps > cpu.

    `prefer` (or the environment variable `LLMFS_DEVICE`) forces a choice, e.g.
    "cpu" when a PyTorch/MPS combination gives wrong results on a Mac.
    """
    choice = (prefer or os.environ.get(DEVICE_ENV, "")).strip().lower()
    if choice:
        if choice.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"{DEVICE_ENV}/prefer asks for {choice!r} but CUDA is not available; "
                               "use 'cpu' or install a CUDA build of PyTorch.")
        if choice == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise RuntimeError(f"{DEVICE_ENV}/prefer asks for 'mps' but MPS is not available; use 'cpu'.")
        try:
            device = torch.device(choice)
        except RuntimeError as exc:
            raise RuntimeError(f"{DEVICE_ENV}/prefer={choice!r} is not a device PyTorch knows; "
                               f"use 'cpu', 'cuda', 'cuda:N' or 'mps' ({exc})") from None
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"{DEVICE_ENV}/prefer asks for {choice!r} but only "
                               f"{torch.cuda.device_count()} CUDA device(s) are visible.")
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


def distributed_backend() -> str:
    """The torch.distributed backend that works here: NCCL on CUDA (Linux), Gloo otherwise.

    Choosing it automatically keeps DDP scripts running on laptops, on Windows and on
    CUDA builds without NCCL, where hard-coding "nccl" crashes.
    """
    import torch.distributed as dist

    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"
