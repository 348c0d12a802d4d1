"""Benchmark the training-speed ladder of ch05/training_speed: the book's training step, then one PyTorch
performance trick added at a time (fused AdamW, SDPA attention, fused LayerNorm/GELU, tied weights, bf16
autocast, the allocator setting, a larger batch, torch.compile), each rung measured the same way.

    python -m benchmarks.training_speed            # GPT-2 124M, batch 2 x 256 (~3 minutes on 2 idle cores; --rounds 3: ~10)
    python -m benchmarks.training_speed --quick    # a tiny model: a smoke test of the harness (no compile)
    python -m benchmarks.training_speed --rungs 0,1,2

Every rung runs in its own fresh process (`ch05.training_speed.training_speed.measure_in_fresh_process`):
the allocator setting (`llmfs.runtime.reuse_freed_memory`) is made at start-up, and the process's peak memory
(VmHWM minus its RSS before the model was built) then belongs to that rung alone. Each process trains
--warmup + --steps steps on one fixed random batch (the same data for every rung: same seed), reports
tokens/s over the median timed step, minor page faults per step and the losses, and then checks that the
rung computes the same function as rung 0 with the same weights (dropout off; tolerances in the table).
Rungs are measured in rounds (0 1 2 ... 0 1 2 ...), the fastest round kept. With --device auto (default)
every rung also runs on the GPU when CUDA is available (peak = `torch.cuda.max_memory_allocated`); the GPU
columns say "no GPU" otherwise. bf16 runs only where the hardware has native bfloat16
(`llmfs.runtime.cpu_bf16_supported`, `torch.cuda.is_bf16_supported`); elsewhere the rung is skipped and the
later rungs stay in float32. Writes results.md and results.json into --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ch04.gpt import GPT_CONFIG_124M
from ch05.training_speed.training_speed import (
    ATOL_BF16,
    ATOL_FP32,
    LADDER,
    bf16_supported,
    measure_in_fresh_process,
    rung_tricks,
)
from llmfs.bench import machine_description, write_report
from llmfs.cli import Parser, add_quick_argument, check_output_dir, path_argument, positive_int, run

FULL = {"cfg": {**GPT_CONFIG_124M, "context_length": 256}, "batch": 2, "ctx": 256, "warmup": 2, "steps": 5}
QUICK = {"cfg": {**GPT_CONFIG_124M, "vocab_size": 1000, "context_length": 32, "emb_dim": 64, "n_heads": 4,
                 "n_layers": 2}, "batch": 2, "ctx": 32, "warmup": 1, "steps": 2}
COMPILE_RUNG = next(i for i, (_, trick) in enumerate(LADDER) if trick == "compile")
BF16_RUNG = next(i for i, (_, trick) in enumerate(LADDER) if trick == "bf16")


def rung_list(text: str) -> list[int]:
    """--rungs: comma-separated rung numbers, 0 to the last rung."""
    try:
        rungs = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be rung numbers from 0 to {len(LADDER) - 1} separated by "
                                         f"commas, got {text}") from None
    if not rungs or rungs[0] < 0 or rungs[-1] >= len(LADDER):
        raise argparse.ArgumentTypeError(f"must be rung numbers from 0 to {len(LADDER) - 1} separated by "
                                         f"commas, got {text}")
    return rungs


def plan(rungs: list[int], devices: list[str], base: dict, quick: bool, compile_named: bool) -> list[dict]:
    """One entry per (device, rung): a spec to measure (`base` plus the device and the rung's tricks), or a
    skip with its reason."""
    entries = []
    for device in devices:
        bf16 = bf16_supported(device)
        for rung in rungs:
            entry = {"device": device, "rung": rung, "name": LADDER[rung][0], "added": LADDER[rung][1]}
            if rung == BF16_RUNG and not bf16:
                entry["skipped"] = ("no native bfloat16 on this CPU (AVX512-BF16 or AMX): it would be slower than "
                                    "float32" if device == "cpu" else "this GPU has no bfloat16")
            elif rung == COMPILE_RUNG and quick and not compile_named:
                entry["skipped"] = "--quick: compiling takes longer than the smoke run (name it with --rungs to run it)"
            else:
                entry["spec"] = {**base, "device": device, "tricks": sorted(rung_tricks(rung, bf16))}
            entries.append(entry)
    return entries


def measure_all(entries: list[dict], rounds: int) -> list[dict]:
    """Every measured entry `rounds` times, in rounds; keep each entry's fastest run (and every run's tokens/s)."""
    runs: list[list[dict]] = [[] for _ in entries]
    for r in range(rounds):
        for entry, done in zip(entries, runs):
            if "spec" in entry:
                print(f"[{entry['device']}] rung {entry['rung']} {entry['name']} (round {r + 1}/{rounds})", flush=True)
                done.append(measure_in_fresh_process(entry["spec"]))
    out = []
    for entry, done in zip(entries, runs):
        if done:
            best = max(done, key=lambda x: x["tokens_per_s"])
            entry = {**entry, "result": best, "runs_tokens_per_s": [x["tokens_per_s"] for x in done]}
            check = best["check"]
            tol = ATOL_BF16 if "bf16" in entry["spec"]["tricks"] else ATOL_FP32
            entry["check_diff"] = abs(check["rung"] - check["reference"])
            entry["check_atol"] = tol
            entry["same_function"] = entry["check_diff"] <= tol
        out.append(entry)
    return out


def _ratio(value: float | None, ref: float | None) -> str:
    return f"{value / ref:.2f}x" if value and ref else ""


def summarize(results: list[dict], machine: dict, base: dict, quick: bool, devices: list[str], gpu: str | None,
              rounds: int) -> tuple[str, list[tuple[str, bool]]]:
    cfg = base["cfg"]
    shape = ("tiny model (smoke run)" if quick else "GPT-2 124M") + (
        f": {cfg['n_layers']} layers, width {cfg['emb_dim']}, vocabulary {cfg['vocab_size']:,}, dropout "
        f"{cfg['drop_rate']}; batch {base['batch']} x {base['ctx']} tokens")
    lines = [f"# Training-speed tricks, one at a time ({shape})", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads, torch "
             f"{machine['torch']}, native CPU bf16: {'yes' if machine['bf16_cpu'] else 'no'}; GPU: {gpu or 'none'}. "
             f"Each rung in a fresh process, {base['warmup']} warm-up + {base['steps']} timed steps (tokens/s of "
             f"the median step), fastest of {rounds} round(s). Peak memory: VmHWM minus the RSS before the model "
             "was built (CPU), `torch.cuda.max_memory_allocated` (GPU). Each rung is cumulative: it adds one trick "
             "to the rungs above it. *Same function*: rung 0's weights in the rung's model give rung 0's loss "
             f"(dropout off) within {ATOL_FP32:g} (float32) or {ATOL_BF16:g} (bf16); the tied rungs compare with "
             "rung 0's model whose head is a copy of its embedding.", "",
             "| rung | CPU tokens/s | vs rung 0 | vs previous | CPU peak (MiB) | page faults / step | "
             f"loss after {base['warmup'] + base['steps']} steps | same function | GPU tokens/s | GPU vs rung 0 | "
             "GPU peak (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    by = {(r["device"], r["rung"]): r for r in results}
    goals: list[tuple[str, bool]] = []
    first: dict[str, float | None] = {}
    previous: dict[str, float | None] = {}
    rungs = sorted({r["rung"] for r in results})
    for rung in rungs:
        cells = []
        for device in ("cpu", "cuda"):
            r = by.get((device, rung))
            if device == "cuda" and "cuda" not in devices:
                cells.append(["no GPU"] * 3)
                continue
            if r is None:  # --device cuda: no CPU runs
                cells.append(["not run"] + [""] * 6)
                continue
            if "result" not in r:
                cells.append((["skipped: " + r["skipped"]] + [""] * 6) if device == "cpu"
                             else ["skipped: " + r["skipped"], "", ""])
                continue
            res = r["result"]
            tps = res["tokens_per_s"]
            first.setdefault(device, tps)
            vs_prev = _ratio(tps, previous.get(device))
            previous[device] = tps
            peak = f"{res['peak_mib']:,.0f}" if res["peak_mib"] is not None else "n/a"
            if device == "cpu":
                same = f"{'yes' if r['same_function'] else 'NO'} ({r['check_diff']:.1e})"
                cells.append([f"{tps:,.0f}", _ratio(tps, first[device]), vs_prev, peak,
                              f"{res['page_faults_per_step']:,.0f}", f"{res['losses'][-1]:.4f}", same])
            else:
                cells.append([f"{tps:,.0f}", _ratio(tps, first[device]), peak])
            goals.append((f"{device} rung {rung} ({r['name']}) computes rung 0's function "
                          f"(|diff| {r['check_diff']:.1e} <= {r['check_atol']:g})", r["same_function"]))
        name = f"{rung} {LADDER[rung][0]}"
        lines.append("| " + " | ".join([name] + [c for cell in cells for c in cell]) + " |")
    for device in devices:
        a, b = by.get((device, 0)), by.get((device, 1))
        if a and b and "result" in a and "result" in b:
            diff = max(abs(x - y) for x, y in zip(a["result"]["losses"], b["result"]["losses"]))
            goals.append((f"{device}: fused AdamW gives the book's AdamW's losses at every step (max |diff| "
                          f"{diff:.1e} <= {ATOL_FP32:g})", diff <= ATOL_FP32))
    lines += ["", "## Goals", ""] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in goals]
    return "\n".join(lines) + "\n", goals


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.training_speed [options]`; returns the exit code."""
    p = Parser(prog="python -m benchmarks.training_speed", description=__doc__.splitlines()[0])
    add_quick_argument(p, "a tiny model, fewer steps, no torch.compile unless named in --rungs")
    p.add_argument("--rungs", type=rung_list, default=None,
                   help=f"rungs to measure, e.g. 0,1,5 (default: all, 0-{len(LADDER) - 1}: "
                        + ", ".join(f"{i} {name}" for i, (name, _) in enumerate(LADDER)) + ")")
    p.add_argument("--rounds", type=positive_int, default=1, help="processes per rung, in rounds (default 1)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"timed steps per process (default {FULL['steps']}; --quick: {QUICK['steps']})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): the CPU, and the GPU too when CUDA is available; cuda: the GPU only")
    p.add_argument("--out", type=path_argument, default=Path(__file__).resolve().parent / "results" / "training_speed",
                   help="folder for results.md and results.json (default benchmarks/results/training_speed)")
    args = p.parse_args(argv)

    def benchmark() -> None:
        import torch

        from llmfs.runtime import get_device

        check_output_dir(args.out, option="--out")
        if args.device == "cuda":
            get_device("cuda")  # one clear line when there is no CUDA
            devices = ["cuda"]
        else:
            devices = ["cpu"] + (["cuda"] if args.device == "auto" and torch.cuda.is_available() else [])
        base = {**(QUICK if args.quick else FULL), **({"steps": args.steps} if args.steps else {})}
        rungs = args.rungs if args.rungs is not None else list(range(len(LADDER)))
        gpu = torch.cuda.get_device_name(0) if "cuda" in devices else None
        entries = plan(rungs, devices, base, args.quick, compile_named=args.rungs is not None and COMPILE_RUNG in rungs)
        results = measure_all(entries, args.rounds)
        machine = {**machine_description(), "gpu": gpu, "rounds": args.rounds}
        table, goals = summarize(results, machine, base, args.quick, devices, gpu, args.rounds)
        write_report(args.out, "results.json", "results.md",
                     {"machine": machine, "quick": args.quick, "plan": base,
                      "devices": devices, "atol": {"float32": ATOL_FP32, "bfloat16": ATOL_BF16},
                      "results": results}, table, goals)

    return run(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
