"""Benchmark the multi-head attention implementations of ch03/mha at GPT-2 124M's sizes: time, peak memory, equality.

    python -m benchmarks.attention            # d 768, 12 heads, batch 4 x 1,024 tokens (~1-4 minutes on 2 cores)
    python -m benchmarks.attention --quick    # tiny sizes: a smoke test of the harness (seconds)

Every implementation of ch03/mha/mha_implementations.py, plus chapter 3's `MultiHeadAttention` with the book's
explicit math (`use_sdpa=False`, the reference) and with PyTorch's fused kernel (`use_sdpa=True`), gets the
reference's weights (`copy_weights`), dropout 0, and the same input:

- equality: the output and the gradient of the input (of `out.sum()`) against the reference's, within a tolerance
  relative to the reference's largest value (float32: 1e-5; bfloat16 on a GPU, against a float32 reference: 3e-2);
- time: forward (`torch.no_grad()`, eval mode) and forward + backward (train mode), the median of --repeats
  rounds after one warm-up round; every round runs every implementation in turn (A B C ... A B C), so a busy
  minute on a shared machine hits all of them;
- CPU peak memory: in a fresh process per implementation and mode, the high-water mark of the process's resident
  memory (`VmHWM`) minus its RSS just before the measured call (FlexAttention is compiled by a call before, and
  the mark reset after it, by writing 5 to /proc/self/clear_refs); on a GPU `torch.cuda.max_memory_allocated()`
  minus the memory allocated before the call.

FlexAttention needs torch >= 2.5 and a C++ compiler (CPU) for `torch.compile`; where it does not run, its row
says why. It has no backward pass on the CPU. GPU columns are filled when CUDA is available (`--device auto`,
the default; bfloat16 where the GPU supports it), else they say "no GPU". Writes results.md and results.json
into --out (default benchmarks/results/attention/).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ch03.attention import MultiHeadAttention
from ch03.mha.mha_implementations import (
    MHACombinedQKV,
    MHAEinsum,
    MHAFlexAttention,
    MHAPyTorchClass,
    MHASDPACausal,
    MHASDPAMask,
    MHAWrapper,
    copy_weights,
    flex_attention_status,
)
from llmfs.bench import machine_description, proc_status_mib, write_report
from llmfs.cli import Parser, add_quick_argument, check_output_dir, path_argument, positive_int, run
from llmfs.errors import InvalidInput

# key -> (label in the table, constructor with MultiHeadAttention's arguments)
VARIANTS: dict[str, tuple[str, Callable[..., nn.Module]]] = {
    "wrapper": ("book's `MultiHeadAttentionWrapper` (`MHAWrapper`)", MHAWrapper),
    "reference": ("`MultiHeadAttention(use_sdpa=False)` (the book's math; reference)",
                  partial(MultiHeadAttention, use_sdpa=False)),
    "mha-sdpa": ("`MultiHeadAttention(use_sdpa=True)` (the project's default)",
                 partial(MultiHeadAttention, use_sdpa=True)),
    "combined-qkv": ("combined QKV (`MHACombinedQKV`)", MHACombinedQKV),
    "einsum": ("einsum (`MHAEinsum`)", MHAEinsum),
    "sdpa-mask": ("SDPA, boolean mask (`MHASDPAMask`)", MHASDPAMask),
    "sdpa-causal": ("SDPA, `is_causal=True` (`MHASDPACausal`)", MHASDPACausal),
    "nn-mha": ("`nn.MultiheadAttention`, `need_weights=False` (`MHAPyTorchClass`)", MHAPyTorchClass),
    "nn-mha-weights": ("`nn.MultiheadAttention`, `need_weights=True`", partial(MHAPyTorchClass, need_weights=True)),
    "flex": ("FlexAttention, compiled (`MHAFlexAttention`)", MHAFlexAttention),
}
# GPT-2 124M's attention; batch 4: the slowest forward pass takes about a second on 2 CPU cores, the whole run minutes
FULL = {"d_model": 768, "num_heads": 12, "batch": 4, "context": 1024, "repeats": 3}
QUICK = {"d_model": 64, "num_heads": 4, "batch": 2, "context": 64, "repeats": 1}
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}  # max |out - ref| <= TOLERANCE * max |ref|
SEED = 123


def make_reference(cfg: dict, device: torch.device) -> nn.Module:
    torch.manual_seed(SEED)
    return MultiHeadAttention(cfg["d_model"], cfg["d_model"], cfg["context"], 0.0, cfg["num_heads"],
                              use_sdpa=False).to(device)


def make_variant(key: str, cfg: dict, device: torch.device, dtype: torch.dtype, reference: nn.Module) -> nn.Module:
    module = VARIANTS[key][1](cfg["d_model"], cfg["d_model"], cfg["context"], 0.0, cfg["num_heads"])
    return copy_weights(reference, module.to(device)).to(dtype)


def make_input(cfg: dict, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(cfg["batch"], cfg["context"], cfg["d_model"], generator=generator).to(device, dtype)


def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inference: eval mode, no autograd graph."""
    module.eval()
    with torch.no_grad():
        return module(x)


def forward_backward(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A training step's attention work: forward, backward of out.sum(); returns (output, input gradient)."""
    module.train()
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = module(x)
    out.sum().backward()
    return out.detach(), x.grad


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def one_line_reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]


def bench_device(device: torch.device, dtype: torch.dtype, cfg: dict, keys: list[str], repeats: int) -> dict:
    """Equality, times (and on a GPU peak memory) of every variant on one device."""
    reference = make_reference(cfg, device)
    x = make_input(cfg, device, torch.float32)
    ref_out, ref_grad = forward_backward(reference, x)  # float32, also for a bfloat16 run
    x = x.to(dtype)
    tolerance = TOLERANCE[str(dtype).removeprefix("torch.")]
    rows: dict[str, dict] = {}
    modules: dict[str, nn.Module] = {}
    for key in keys:  # warm-up round: also the equality check, and whether the variant runs here at all
        print(f"[{device.type}] warm-up and equality: {key}", flush=True)
        row: dict = {"forward_s": [], "train_s": []}
        module = make_variant(key, cfg, device, dtype, reference)
        try:
            out = forward(module, x)
        except Exception as exc:  # FlexAttention without a working torch.compile (older torch, no compiler)
            if key != "flex":
                raise
            rows[key] = {"skipped": one_line_reason(exc)}
            continue
        row["out_error"] = relative_error(out, ref_out)
        # FlexAttention has no backward on the CPU (torch 2.13); asked first, since a refused call would leave
        # a broken entry in the compiled function's cache.
        no_backward = flex_attention_status(device.type, backward=True) if key == "flex" else None
        if no_backward:
            row["train_skipped"] = no_backward
        else:
            _, grad = forward_backward(module, x)
            row["grad_error"] = relative_error(grad, ref_grad)
        row["equal"] = row["out_error"] <= tolerance and row.get("grad_error", 0.0) <= tolerance
        rows[key], modules[key] = row, module
    for round_ in range(repeats):
        for key, module in modules.items():
            print(f"[{device.type}] round {round_ + 1}/{repeats}: {key}", flush=True)
            rows[key]["forward_s"].append(timed(lambda: forward(module, x), device))
            if "train_skipped" not in rows[key]:
                rows[key]["train_s"].append(timed(lambda: forward_backward(module, x), device))
    for key, module in modules.items():
        row = rows[key]
        row["forward_median_s"] = statistics.median(row["forward_s"])
        row["train_median_s"] = statistics.median(row["train_s"]) if row["train_s"] else None
        if device.type == "cuda":  # the allocator's own statistics: no fresh process needed
            for mode, fn in (("forward", forward), ("train", forward_backward)):
                if mode == "train" and "train_skipped" in row:
                    continue
                module.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                fn(module, x)
                torch.cuda.synchronize(device)
                row[f"{mode}_peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "tolerance": tolerance,
            "rows": rows}


# --- CPU peak memory, in a fresh process ---------------------------------------------------------

def _status_mib(field: str) -> float:
    value = proc_status_mib(field)
    if value is None:
        raise OSError(f"no {field} in /proc/self/status")
    return value


def _reset_peak() -> bool:
    """Return freed heap memory to the system and reset VmHWM to the current RSS (Linux >= 4.0)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(spec: dict) -> dict:
    """Peak RSS of one call (spec: key, mode, cfg) in this process, above the RSS just before it."""
    cfg, device = spec["cfg"], torch.device("cpu")
    module = make_variant(spec["key"], cfg, device, torch.float32, make_reference(cfg, device))
    x = make_input(cfg, device, torch.float32)
    fn = forward if spec["mode"] == "forward" else forward_backward
    if spec["key"] == "flex":
        fn(module, x)  # compiles; the reset below keeps the compiler's own memory out
        module.zero_grad(set_to_none=True)
    reset = _reset_peak()
    before = _status_mib("VmRSS")
    fn(module, x)
    return {**spec, "peak_mib": _status_mib("VmHWM") - before, "rss_before_mib": before, "peak_reset": reset}


def run_memory_workers(specs: list[dict], one_process: bool, timeout: float = 600) -> list[dict]:
    """Each spec in a fresh process (in quick mode all in one, to keep the smoke test short)."""
    batches = [specs] if one_process else [[spec] for spec in specs]
    results = []
    for batch in batches:
        print(f"[memory] {', '.join(s['key'] + ' ' + s['mode'] for s in batch)}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.attention", "--worker", json.dumps(batch)],
                              capture_output=True, text=True, timeout=timeout)
        found = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or len(found) != len(batch):
            raise RuntimeError(f"memory worker failed for {batch}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results += found
    return results


# --- The report ------------------------------------------------------------------------------------

def _cell(value: float | None, ref: float | None, fmt: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:{fmt}} ({ref / value:.1f}x)" if ref else f"{value:{fmt}}"


def summarize(results: dict, machine: dict, cfg: dict, quick: bool) -> tuple[str, list[tuple[str, bool]]]:
    cpu, gpu, memory = results.get("cpu"), results.get("gpu"), results.get("cpu_memory", {})
    matrix_mib = cfg["batch"] * cfg["num_heads"] * cfg["context"] ** 2 * 4 / 2**20
    lines = ["# Multi-head attention implementations" + (" (quick smoke run)" if quick else ""), "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads, torch "
             f"{machine['torch']}; GPU: {results['gpu_name']}. Sizes: d_in = d_out = {cfg['d_model']}, "
             f"{cfg['num_heads']} heads, batch {cfg['batch']} x {cfg['context']:,} tokens, causal, dropout 0 "
             f"(one float32 attention matrix of every head: {matrix_mib:,.0f} MiB).", "",
             f"Times: median of {cfg['repeats']} rounds after a warm-up round (all rounds in results.json); in "
             "parentheses the speed-up over the reference (the book's math). Forward: `torch.no_grad()`, eval "
             "mode; fwd+bwd: forward and `out.sum().backward()`. CPU peak: the process's peak RSS above its RSS "
             "before the call, a fresh process per cell. Equal: output and input gradient within "
             f"{TOLERANCE['float32']:g} x the reference's largest value (float32)"
             + (f", {gpu['tolerance']:g} on the GPU ({gpu['dtype']}, against a float32 reference)" if gpu else "")
             + ".", "",
             "| implementation | CPU forward (s) | CPU fwd+bwd (s) | CPU forward peak (MiB) | CPU fwd+bwd peak (MiB) "
             "| equal (max rel. error out / grad) | GPU forward (ms) | GPU fwd+bwd (ms) | GPU fwd+bwd peak (MiB) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    gpu_missing = results["gpu_name"] if results["gpu_name"] in ("no GPU", "not run") else None

    def equal_cell(row: dict) -> str:
        grad = f"{row['grad_error']:.1e}" if "grad_error" in row else "no backward"
        return f"{'yes' if row['equal'] else 'NO'} ({row['out_error']:.1e} / {grad})"

    for key, (label, _) in VARIANTS.items():
        cells = [label]
        for bench, scale in ((cpu, 1.0), (gpu, 1000.0)):
            if bench is None:
                if bench is gpu:
                    cells += [gpu_missing or "not run"] * 3
                else:
                    cells += ["not run"] * 4 + ["not run"]
                continue
            row = bench["rows"].get(key)
            ref = bench["rows"].get("reference", {})
            if row is None or "skipped" in row:
                reason = "not run" if row is None else f"does not run: {row['skipped']}"
                cells += [reason] + ["n/a"] * (4 if bench is cpu else 2)
                continue
            fwd, train = row["forward_median_s"] * scale, row["train_median_s"]
            train = None if train is None else train * scale
            ref_fwd = ref.get("forward_median_s", 0) * scale
            ref_train = (ref.get("train_median_s") or 0) * scale
            fmt = ".3f" if bench is cpu else ".2f"
            cells += [_cell(fwd, ref_fwd, fmt),
                      _cell(train, ref_train, fmt) if train is not None else "no backward on this device"]
            if bench is cpu:
                mem = {m: memory.get(f"{key}/{m}") for m in ("forward", "train")}
                cells += [f"{mem['forward']:,.0f}" if mem["forward"] is not None else "n/a",
                          f"{mem['train']:,.0f}" if mem["train"] is not None else "n/a", equal_cell(row)]
            else:
                cells.append(f"{row['train_peak_mib']:,.0f}" if "train_peak_mib" in row else "n/a")
                cells[5] += f"; GPU: {equal_cell(row)}"
        lines.append("| " + " | ".join(cells) + " |")
    goals: list[tuple[str, bool]] = []
    for name, bench in (("CPU", cpu), ("GPU", gpu)):
        if bench is None:
            continue
        ran = {k: r for k, r in bench["rows"].items() if "skipped" not in r}
        goals.append((f"{name}: every implementation that runs gives the reference's output and input gradient "
                      f"({len(ran)} of {len(bench['rows'])} ran)", all(r["equal"] for r in ran.values())))
        ref, sdpa = bench["rows"]["reference"], bench["rows"].get("sdpa-causal")
        if sdpa is None or "skipped" in sdpa:
            continue
        goals.append((f"{name}: SDPA with is_causal=True trains faster than the book's math "
                      f"({ref['train_median_s'] / sdpa['train_median_s']:.1f}x)",
                      sdpa["train_median_s"] < ref["train_median_s"]))
    if memory.get("reference/train") and memory.get("sdpa-causal/train"):
        ratio = memory["reference/train"] / memory["sdpa-causal/train"]
        goals.append((f"CPU: SDPA with is_causal=True needs less memory for forward + backward than the book's "
                      f"math ({ratio:.1f}x less)", ratio > 1))
    skipped = [f"{name}: {r['skipped']}" for name, b in (("CPU", cpu), ("GPU", gpu)) if b
               for k, r in b["rows"].items() if "skipped" in r]
    if skipped:
        lines += ["", "FlexAttention did not run: " + "; ".join(skipped)]
    lines += ["", "## Goals", ""] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in goals]
    return "\n".join(lines) + "\n", goals


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.attention [options]`; returns the exit code."""
    p = Parser(prog="python -m benchmarks.attention", description=__doc__.splitlines()[0])
    add_quick_argument(p, f"tiny sizes (d {QUICK['d_model']}, {QUICK['num_heads']} heads, batch {QUICK['batch']} "
                          f"x {QUICK['context']} tokens), one round, memory in one process")
    p.add_argument("--batch", type=positive_int, default=None, help=f"batch size (default {FULL['batch']})")
    p.add_argument("--context", type=positive_int, default=None,
                   help=f"tokens per sequence (default {FULL['context']:,}, GPT-2's context length)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help=f"timed rounds after the warm-up round (default {FULL['repeats']}; --quick: 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): the CPU, and CUDA too when available; cpu; cuda: CUDA only")
    p.add_argument("--only", default=None,
                   help="comma-separated implementations to run (default all): " + ", ".join(VARIANTS))
    p.add_argument("--out", type=path_argument, default=Path(__file__).resolve().parent / "results" / "attention",
                   help="folder for results.md and results.json (default benchmarks/results/attention)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        for spec in json.loads(args.worker):
            print("RESULT " + json.dumps(memory_worker(spec)), flush=True)
        return 0
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: v for k, v in (("batch", args.batch), ("context", args.context), ("repeats", args.repeats))
                if v is not None})
    keys = list(VARIANTS) if args.only is None else [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown or not keys:
        p.error(f"argument --only: unknown implementation(s) {unknown or [args.only]}; choose from "
                + ", ".join(VARIANTS))
    if "reference" not in keys:
        keys.insert(0, "reference")  # everything is compared with it

    def benchmark() -> None:
        cuda = torch.cuda.is_available()
        if args.device == "cuda" and not cuda:
            raise InvalidInput("--device cuda: CUDA is not available on this machine; use --device auto or cpu")
        check_output_dir(args.out, option="--out")
        machine = machine_description()
        gpu_name = torch.cuda.get_device_name() if cuda and args.device != "cpu" else (
            "not run" if cuda else "no GPU")
        results: dict = {"gpu_name": gpu_name}
        if args.device in ("auto", "cpu"):
            results["cpu"] = bench_device(torch.device("cpu"), torch.float32, cfg, keys, cfg["repeats"])
            specs = [{"key": k, "mode": mode, "cfg": cfg} for k in keys
                     if "skipped" not in results["cpu"]["rows"][k] for mode in ("forward", "train")
                     if not (mode == "train" and "train_skipped" in results["cpu"]["rows"][k])]
            measured = run_memory_workers(specs, one_process=args.quick)
            results["cpu_memory"] = {f"{m['key']}/{m['mode']}": m["peak_mib"] for m in measured}
            results["cpu_memory_runs"] = measured
        if cuda and args.device != "cpu":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
            results["gpu"] = bench_device(torch.device("cuda"), dtype, cfg, keys, cfg["repeats"])
        table, goals = summarize(results, machine, cfg, args.quick)
        write_report(args.out, "results.json", "results.md",
                     {"machine": machine, "quick": args.quick, "config": cfg, "tolerance": TOLERANCE,
                      "variants": {k: VARIANTS[k][0] for k in keys}, "results": results}, table, goals)

    return run(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
