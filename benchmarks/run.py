"""Benchmark our GPTModel against transformers' GPT2LMHeadModel, in one run, one process per measurement.

    python -m benchmarks.run            # GPT-2 124M dimensions (several minutes on a laptop)
    python -m benchmarks.run --quick    # tiny config, a smoke test of the harness

Writes `results.md`, `results.json` and PNG plots into --out (default benchmarks/results/)
and prints the ratios and whether each performance goal is met. Timings use fixed seeds,
2 warm-up steps and the median of the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ch04.gpt import GPT_CONFIG_124M
from llmfs.atomic import atomic_path, atomic_write
from llmfs.bench import machine_description
from llmfs.cli import Parser, add_quick_argument, check_output_dir, path_argument, positive_int, run

TINY_CONFIG = {"vocab_size": 1000, "context_length": 64, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
               "drop_rate": 0.1, "qkv_bias": False}
SECTIONS = ("train", "generate", "scaling", "amp")


def run_worker(spec: dict, timeout: float = 1800) -> dict:
    """Run one measurement in a fresh interpreter and parse its RESULT line."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def total_memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # not on every platform
        return None


def train_memory_gib(spec: dict) -> float:
    """Rough peak memory (GiB) of a training step, to skip shapes this machine cannot hold.

    Weights, gradients and AdamW state (16 bytes a parameter), the logits with their
    log-softmax and gradient (3 x batch x context x vocab floats), the attention weights with
    dropout (scores, softmax, mask, result: 4 x batch x heads x context^2 floats per layer,
    which dominate at long contexts), and ~1 GiB for the interpreter and libraries.
    """
    cfg, b, n = spec["cfg"], spec["batch"], spec["ctx"]
    params = (cfg["vocab_size"] + cfg["context_length"]) * cfg["emb_dim"] + 12 * cfg["emb_dim"] ** 2 * cfg["n_layers"]
    floats = 4 * params + 3 * b * n * cfg["vocab_size"] + 4 * b * cfg["n_heads"] * n**2 * cfg["n_layers"]
    return 4 * floats / 2**30 + 1.0


def plan(quick: bool, shapes: list[tuple[int, int]] | None = None) -> dict:
    cfg = TINY_CONFIG if quick else GPT_CONFIG_124M
    steps = {"warmup": 2, "steps": 7}
    base = {"kind": "train", "cfg": cfg, "dtype": "float32", **steps}
    shapes = shapes or ([(2, 32)] if quick else [(2, 256), (8, 1024)])
    ctxs = [16, 64] if quick else [128, 256, 512, 1024]
    gen = {"kind": "generate", "cfg": cfg, "prompt_len": 10, "new_tokens": 40 if quick else 200}
    return {
        # The book-layout variants only at the first shape; larger shapes (a minute a step on
        # a 2-core CPU) compare ours with HF over the minimum of 5 timed steps.
        "train": [{**base, "impl": impl, "batch": b, "ctx": n, **({} if i == 0 else {"steps": 5})}
                  for i, (b, n) in enumerate(shapes)
                  for impl in (("ours", "hf", "ours-onednn", "ours-untied", "ours-explicit") if i == 0
                               else ("ours", "hf"))],
        "generate": [{**gen, "impl": "ours", "cache": True}, {**gen, "impl": "ours", "cache": False},
                     {**gen, "impl": "hf", "cache": True}, {**gen, "impl": "ours-onednn", "cache": True},
                     {**gen, "impl": "ours-stored-layout", "cache": True}],
        "scaling": [{**base, "impl": "ours", "batch": 1, "ctx": n} for n in ctxs],
        "amp": [{**base, "impl": impl, "batch": shapes[0][0], "ctx": shapes[0][1], "dtype": dt, "steps": 8}
                for impl in ("ours", "hf") for dt in ("float32", "bfloat16")],
    }


def measure_section(section: str, specs: list[dict], repeats: int, keep_freed_memory: bool = True) -> list[dict]:
    """Run every spec `repeats` times, round by round, and keep each spec's fastest run.

    Rounds (A B C, A B C) rather than A A B B C C: on a shared machine a slow minute then
    hits every model once instead of one model twice. The fastest run is the one least
    disturbed by other work; every run's tokens/s is kept in `runs_tokens_per_s`.
    """
    runs: list[list[dict]] = [[] for _ in specs]
    for round_ in range(repeats):
        for i, spec in enumerate(specs):
            if runs[i] and "skipped" in runs[i][0]:
                continue  # reported once
            spec = {**spec, "keep_freed_memory": keep_freed_memory}
            label = f" (run {round_ + 1}/{repeats})" if repeats > 1 else ""
            print(f"[{section}] {spec['impl']} {spec.get('batch', '')}x{spec.get('ctx', '')} "
                  f"{spec.get('dtype', '')}{' cache' if spec.get('cache') else ''}{label}", flush=True)
            need, have = (train_memory_gib(spec) if spec["kind"] == "train" else 0.0), total_memory_gib()
            if have is not None and need > 0.9 * have:
                # Swapping would take hours, and the kernel would kill the process anyway.
                reason = f"skipped: needs ~{need:.0f} GiB of memory, this machine has {have:.0f} GiB"
                print("  " + reason, flush=True)
                runs[i].append({**spec, "skipped": reason})
                continue
            try:
                runs[i].append(run_worker(spec))
            except (RuntimeError, subprocess.TimeoutExpired) as err:  # keep the other measurements
                print(f"  failed: {str(err)[:500]}", flush=True)
    results = []
    for spec, done in zip(specs, runs):
        ok = [r for r in done if "skipped" not in r]
        if not ok:
            results.append(done[0] if done else {**spec, "skipped": "failed (see the log)"})
            continue
        best = max(ok, key=lambda r: r["tokens_per_s"])
        results.append({**best, "runs_tokens_per_s": [r["tokens_per_s"] for r in ok]})
    return results


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def summarize(results: dict, machine: dict, quick: bool) -> tuple[str, list[tuple[str, bool]]]:
    lines = ["# Benchmark results" + (" (quick smoke run, tiny config)" if quick else " (GPT-2 124M dimensions)"),
             "", f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
             f"{machine['threads']} threads, Python {machine['python']}, native bf16: {machine['bf16_cpu']}", ""]
    memory = ("handed back to the OS at once (glibc default)." if machine["freed_memory"] == "released" else
              "kept for reuse in every process, as the chapter-5 trainer does by default "
              "(`llmfs.runtime.reuse_freed_memory`).")
    lines += [f"Each figure: the fastest of {machine['repeats']} separate processes"
              f"{' (all runs in results.json)' if machine['repeats'] > 1 else ''}; freed memory {memory}", ""]
    goals: list[tuple[str, bool]] = []

    def train_row(r):
        return r["tokens_per_s"], r["peak_rss_mib"]

    onednn = ("every model uses PyTorch's default path, as the chapter scripts do; ours-onednn is `ours` "
              "with the opt-in `--onednn` path (`llmfs.onednn_linear`)."
              if machine.get("onednn_linear") else "every model uses PyTorch's default path (the opt-in oneDNN "
              "linear path is not available here).")
    lines += ["## Training step (forward + backward + fused AdamW, the same for every model; fp32, dropout 0.1)", "",
              f"In fp32 {onednn}", "",
              "| model | batch x context | params | tokens/s | ratio vs HF | peak RSS (MiB) |",
              "|---|---|---:|---:|---:|---:|"]
    by_shape: dict = {}
    for r in results["train"]:
        by_shape.setdefault((r["batch"], r["ctx"]), {})[r["impl"]] = r
    for (b, n), rows in by_shape.items():
        if any("skipped" in r for r in rows.values()):  # no ratio without both models
            for impl, r in rows.items():
                lines.append(f"| {impl} | {b} x {n} | | {r.get('skipped') or fmt(r['tokens_per_s'])} | | |")
            continue
        hf_tps, hf_mem = train_row(rows["hf"])
        for impl, r in rows.items():
            tps, mem = train_row(r)
            lines.append(f"| {impl} | {b} x {n} | {r['params']:,} | {fmt(tps)} | {tps / hf_tps:.2f}x | {fmt(mem, 0)} |")
        ours_tps, ours_mem = train_row(rows["ours"])
        goals.append((f"training {b}x{n}: ours >= 1.0x HF tokens/s ({ours_tps / hf_tps:.2f}x)", ours_tps >= hf_tps))
        goals.append((f"training {b}x{n}: ours peak RSS <= HF ({fmt(ours_mem, 0)} vs {fmt(hf_mem, 0)} MiB)",
                      ours_mem <= hf_mem))

    g = {(f"{r['impl']}-cache" if r["impl"] != "hf" and r["cache"] else "ours-no-cache" if r["impl"] != "hf"
          else "hf"): r for r in results["generate"] if "skipped" not in r}
    gen_path = ("Ours: `ch05.gpt_generate.generate` on PyTorch's default path, with the weight layout the "
                "generation commands use (`llmfs.decoding_layout`); ours-stored-layout-cache: without it "
                "(nn.Linear's own [out, in] weights); ours-onednn-cache: under the opt-in `--onednn` path.")
    lines += ["", f"## Generation (greedy, batch 1, 10-token prompt, {g['hf']['new_tokens']} new tokens)", "",
              gen_path, "",
              "| model | tokens/s | ratio vs HF | latency 10th token (ms) | latency last token (ms) |",
              "|---|---:|---:|---:|---:|"]
    for name, r in g.items():
        lat = r["latency_ms"]
        lines.append(f"| {name} | {fmt(r['tokens_per_s'])} | {r['tokens_per_s'] / g['hf']['tokens_per_s']:.2f}x | "
                     f"{fmt(lat[9], 2)} | {fmt(lat[-1], 2)} |")
    c, nc, hf = g["ours-cache"], g["ours-no-cache"], g["hf"]
    goals += [
        (f"KV-cache generation >= 1.0x HF generate ({c['tokens_per_s'] / hf['tokens_per_s']:.2f}x)",
         c["tokens_per_s"] >= hf["tokens_per_s"]),
        (f"KV cache >= 5x our no-cache path ({c['tokens_per_s'] / nc['tokens_per_s']:.2f}x)",
         c["tokens_per_s"] >= 5 * nc["tokens_per_s"]),
        (f"cached latency of last token <= 1.5x 10th ({c['latency_ms'][-1] / c['latency_ms'][9]:.2f}x)",
         c["latency_ms"][-1] <= 1.5 * c["latency_ms"][9]),
        ("cached and uncached greedy tokens identical", c["tokens"] == nc["tokens"]),
    ]

    lines += ["", "## Scaling with context length (ours, batch 1, fp32)", "",
              "| context | tokens/s | peak RSS (MiB) |", "|---:|---:|---:|"]
    for r in results["scaling"]:
        lines.append(f"| {r['ctx']} | {fmt(r['tokens_per_s'])} | {fmt(r['peak_rss_mib'], 0)} |")

    amp = {(r["impl"], r["dtype"]): r for r in results["amp"]}
    lines += ["", "## Mixed precision (bfloat16 autocast on CPU)", "",
              "| model | dtype | tokens/s | speed-up vs fp32 | final loss (short run) |", "|---|---|---:|---:|---:|"]
    for (impl, dt), r in amp.items():
        speed = r["tokens_per_s"] / amp[(impl, "float32")]["tokens_per_s"]
        lines.append(f"| {impl} | {dt} | {fmt(r['tokens_per_s'])} | {speed:.2f}x | {r['losses'][-1]:.4f} |")
    o32, o16, h16 = amp[("ours", "float32")], amp[("ours", "bfloat16")], amp[("hf", "bfloat16")]
    rel = abs(o16["losses"][-1] - o32["losses"][-1]) / o32["losses"][-1]
    if machine["bf16_cpu"]:
        goals += [
            (f"bf16 >= 2.0x our fp32 ({o16['tokens_per_s'] / o32['tokens_per_s']:.2f}x)",
             o16["tokens_per_s"] >= 2 * o32["tokens_per_s"]),
            (f"bf16 ours >= 1.0x HF bf16 ({o16['tokens_per_s'] / h16['tokens_per_s']:.2f}x)",
             o16["tokens_per_s"] >= h16["tokens_per_s"]),
        ]
    goals.append((f"bf16 short-run loss within 5% of fp32 ({100 * rel:.2f}%)", rel <= 0.05))

    lines += ["", "## Goals", ""] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in goals]
    return "\n".join(lines) + "\n", goals


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ctx = [r["ctx"] for r in results["scaling"]]
    ax1.plot(ctx, [r["tokens_per_s"] for r in results["scaling"]], marker="o")
    ax1.set_xlabel("context length")
    ax1.set_ylabel("training tokens/s")
    ax2.plot(ctx, [r["peak_rss_mib"] for r in results["scaling"]], marker="o", color="tab:red")
    ax2.set_xlabel("context length")
    ax2.set_ylabel("peak RSS (MiB)")
    fig.tight_layout()
    with atomic_path(out / "scaling_train.png") as tmp:
        fig.savefig(tmp, format="png")
    paths.append(out / "scaling_train.png")

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in results["generate"]:
        label = "hf" if r["impl"] == "hf" else ("ours, KV cache" if r["cache"] else "ours, no cache")
        ax.plot(range(1, len(r["latency_ms"]) + 1), r["latency_ms"], label=label)
    ax.set_xlabel("generated token")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "scaling_generate.png") as tmp:
        fig.savefig(tmp, format="png")
    paths.append(out / "scaling_generate.png")
    plt.close("all")
    return paths


def section_names(text: str) -> list[str]:
    """--only: comma-separated names from SECTIONS."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(map(repr, unknown)) or repr(text)}; "
                                         f"choose from {', '.join(SECTIONS)} (comma-separated)")
    return names


def train_shapes(text: str) -> list[tuple[int, int]]:
    """--train-shapes: 'BATCHxCONTEXT,...' with whole numbers >= 1."""
    shapes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", item)
        if not match or min(int(match[1]), int(match[2])) < 1:
            raise argparse.ArgumentTypeError(f"{item!r} is not BATCHxCONTEXT with whole numbers >= 1 "
                                             "(e.g. 2x256,8x1024)")
        shapes.append((int(match[1]), int(match[2])))
    return shapes


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.run [options]`; returns the exit code."""
    p = Parser(prog="python -m benchmarks.run", description="Benchmark our GPT against transformers' GPT-2.")
    add_quick_argument(p, "tiny config: checks the harness, not the speed")
    p.add_argument("--out", type=path_argument, default=Path(__file__).resolve().parent / "results",
                   help="folder for results.md, results.json and the plots (default benchmarks/results)")
    p.add_argument("--only", type=section_names, default=list(SECTIONS),
                   help=f"comma-separated sections (default all: {','.join(SECTIONS)}); the report and plots "
                        "need all of them, a subset writes results.json only")
    p.add_argument("--train-shapes", type=train_shapes, default=None,
                   help="batch x context of the training table, e.g. '2x256,8x1024' (the default); "
                        "8x1024 takes about a minute per step on a 2-core CPU")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="processes per measurement, the fastest kept (default 2; --quick: 1)")
    p.add_argument("--release-freed-memory", action="store_true",
                   help="measure with glibc's default of handing freed memory back to the OS (the trainer's "
                        "--release-freed-memory); by default every model runs with the trainer's default")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 2)
    context = (TINY_CONFIG if args.quick else GPT_CONFIG_124M)["context_length"]
    if any(n > context for _, n in args.train_shapes or ()):
        p.error(f"argument --train-shapes: a context longer than the model's {context} tokens")

    def benchmark() -> None:
        check_output_dir(args.out, option="--out")  # before minutes of measuring
        machine = {**machine_description(), "repeats": repeats,
                   "freed_memory": "released" if args.release_freed_memory else "kept"}
        todo = plan(args.quick, args.train_shapes)
        results = {section: measure_section(section, todo[section], repeats,
                                            keep_freed_memory=not args.release_freed_memory)
                   if section in args.only else [] for section in SECTIONS}
        with atomic_write(args.out / "results.json") as f:
            json.dump({"machine": machine, "quick": args.quick, "results": results}, f, indent=1)
        if set(args.only) >= set(SECTIONS):
            table, goals = summarize(results, machine, args.quick)
            with atomic_write(args.out / "results.md") as f:
                f.write(table)
            plot(results, args.out)
            print(table)
            print(f"{sum(ok for _, ok in goals)}/{len(goals)} goals met; results in {args.out}")

    return run(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
