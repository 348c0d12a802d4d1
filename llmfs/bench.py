"""What the benchmarks (`benchmarks/`) share: the machine they ran on, and their reports.

Every benchmark table names the CPU and its limits beside its figures (`machine_description`), and
writes its results as JSON and a Markdown table, atomically (`write_report`).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from llmfs.atomic import atomic_write
from llmfs.onednn_linear import onednn_linear_supported
from llmfs.runtime import cpu_bf16_supported


def write_report(out: Path, json_name: str, md_name: str, data: dict, table: str,
                 goals: list[tuple[str, bool]]) -> None:
    """Write the results (JSON) and the table (Markdown) atomically into `out`; print the table and the goals met."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / json_name) as f:
        json.dump(data, f, indent=1)
    with atomic_write(out / md_name) as f:
        f.write(table)
    print(table)
    print(f"{sum(ok for _, ok in goals)}/{len(goals)} goals met; results in {out}")


def proc_status_mib(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now, VmHWM: its peak), in MiB;
    None where there is no /proc (not Linux).

    VmHWM rather than getrusage's ru_maxrss: a child started by fork + exec inherits its parent's ru_maxrss,
    so a fresh measuring process would report the parent's peak; VmHWM is the process's own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def machine_description() -> dict:
    """The CPU model, cores, threads and library versions: what every benchmark table names beside its figures."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "bf16_cpu": cpu_bf16_supported(),
            "onednn_linear": onednn_linear_supported()}
