"""Chapter 6 bonus: what every IMDb classifier reports, and the table that compares them.

The book's README lists each model's training, validation and test accuracy and its training
time. Each of our classifiers returns one `result` dict with those figures plus the model's size
and the memory its run needed, so `table` can put them side by side.

Memory: on Linux the process's peak resident memory (VmHWM) is reset when a run starts (writing 5
to /proc/self/clear_refs), so the peak a run reports is the highest resident memory *during that
run*, not an earlier run's. It counts everything the process holds, the libraries loaded before
included (PyTorch alone is a few hundred MiB); memory an earlier run freed but the allocator kept
is counted again only when it is touched. For figures that compare models fairly, run each command
in its own process. On a GPU the peak of allocated CUDA memory is reported as well.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from llmfs.bench import proc_status_mib


def _reset_peak_rss() -> bool:
    """Start a new VmHWM peak at the present resident size (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def track_resources(device: torch.device | str | None = None) -> Iterator[dict]:
    """Measure the block: the dict it yields gets "seconds", "peak_mib" (the process's peak resident memory
    during the block; None without /proc) and, on CUDA, "gpu_peak_mib"."""
    device = torch.device(device or "cpu")
    stats: dict = {}
    fresh_peak = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        yield stats
    finally:
        stats["seconds"] = time.perf_counter() - start
        peak = proc_status_mib("VmHWM")
        stats["peak_mib"] = peak if fresh_peak else None
        if device.type == "cuda":
            stats["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20


def result(model: str, kind: str, accuracies: dict[str, float], train_seconds: float, peak_mib: float | None,
           parameters: int, trainable: int, **extra) -> dict:
    """One row of the comparison: accuracies per split (0..1), training time, memory and sizes."""
    return {"model": model, "kind": kind, "parameters": parameters, "trainable": trainable,
            "train_acc": accuracies["train"], "val_acc": accuracies["validation"], "test_acc": accuracies["test"],
            "train_seconds": train_seconds, "peak_mib": peak_mib, **extra}


def _size(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def table(results: list[dict]) -> str:
    """The results as a Markdown table, one row per model, in the order given."""
    lines = ["| model | kind | parameters (trainable) | train acc | val acc | test acc | training time | "
             "peak RSS |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        memory = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
        if r.get("gpu_peak_mib") is not None:
            memory += f" (GPU {r['gpu_peak_mib']:.0f} MiB)"
        lines.append(f"| {r['model']} | {r['kind']} | {_size(r['parameters'])} ({_size(r['trainable'])}) | "
                     f"{r['train_acc'] * 100:.2f}% | {r['val_acc'] * 100:.2f}% | {r['test_acc'] * 100:.2f}% | "
                     f"{r['train_seconds']:.1f} s | {memory} |")
    return "\n".join(lines)


def print_accuracies(accuracies: dict[str, float]) -> None:
    """The book's closing lines: accuracy on each full split."""
    for name, label in (("train", "Training"), ("validation", "Validation"), ("test", "Test")):
        print(f"{label} accuracy: {accuracies[name] * 100:.2f}%")
