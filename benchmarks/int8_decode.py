"""Cached greedy decoding with int8 weights (`llmfs.int8`) against float32, bfloat16 and transformers,
beside the memory bandwidth that bounds it.

    python -m benchmarks.int8_decode            # GPT-2 124M and Qwen3-0.6B shapes, random weights
    python -m benchmarks.int8_decode --quick    # tiny configs: checks the harness, not the speed

Why the bandwidth: one cached decoding step reads every weight matrix once for a single token, so
tokens/s can be at most (memory bandwidth) / (bytes of weights read per token). Each row shows its
bytes per token and that limit, so the table says how close each path gets, not only who wins.

- Models: random-weight folders written with `save_pretrained` (GPT-2 124M: `GPT2LMHeadModel`;
  Qwen3-0.6B: `benchmarks.llm.prepare`, tied head of 151,936 rows), loaded the way
  `python -m ch05.llama --model <folder> [--dtype bfloat16] [--int8]` loads them (`load_llm`:
  decoding layout, then int8 when asked); "transformers" loads the same folder in float32.
- Each row runs in a fresh process, rows in rounds (A B C D A B C D), the fastest of --repeats kept:
  load, a 4-token warm-up, then --max-new-tokens greedy tokens after a 16-token prompt with the KV
  cache (ours: chapter 5's `generate`; transformers: `model.generate`). Peak RSS is the process's
  VmHWM (loading included: int8 is made from the float32 weights), "RSS after" its VmRSS once decoded.
- Bytes per token: the weight matrices the step multiplies by (linear layers and the head; an int8
  layer counts its int8 bytes and scales; the embedding lookup reads one row and is left out).
- Bandwidth: `measure_bandwidth` times a sum over a large float32 tensor (reads only, as decoding
  does) and a copy between two (read + write), with PyTorch's threads, best of a few runs.

Writes int8_decode.md and int8_decode.json into --out (default benchmarks/results/). The functions
(`prepare_folders`, `decode_rows`, `measure_bandwidth`, `summarize`) are meant to be reused by a
script that joins these rows with others (llama.cpp, served throughput).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmfs.bench import machine_description, proc_status_mib, write_report
from llmfs.cli import Parser, add_quick_argument, check_output_dir, path_argument, positive_int, run

PROMPT_TOKENS = 16
# (label, how load_llm loads it): dtype of the weights, int8 mode or not; "hf": transformers in float32.
IMPLS = {"ours-float32": ("float32", False), "ours-bfloat16": ("bfloat16", False),
         "ours-int8": ("float32", "weights"), "ours-int8-dynamic": ("float32", "dynamic"),
         "hf-float32": ("float32", False)}
GPT2_124M_HF = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}
GPT2_TINY_HF = {**GPT2_124M_HF, "n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 4}
# The goals: int8 decoding against our own float32 (tokens/s ratio).
GOALS = {"qwen3-0.6b": 2.0, "gpt2-124m": 1.5}


def prepare_folders(workdir: Path, quick: bool) -> dict[str, Path]:
    """Random-weight float32 model folders, {model name: folder}; reused when already there."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from benchmarks.llm import prepare as prepare_qwen3

    gpt2_dir = workdir / ("gpt2-tiny" if quick else "gpt2-124m")
    if not (gpt2_dir / "config.json").is_file():
        torch.manual_seed(123)
        GPT2LMHeadModel(GPT2Config(**(GPT2_TINY_HF if quick else GPT2_124M_HF))).eval().save_pretrained(gpt2_dir)
    qwen3_dir = prepare_qwen3(workdir, quick)["float32"]
    return {"gpt2-124m": gpt2_dir, "qwen3-0.6b": qwen3_dir}


# --- One row per process -----------------------------------------------------------------------

def weights_read_per_token(model) -> int:
    """Bytes of the weight matrices one decoding step multiplies by (see the module docstring)."""
    import torch.nn as nn

    from llmfs.int8 import Int8Linear

    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, Int8Linear):
            total += m.weight.numel() + m.scales.numel() * m.scales.element_size()
    return total


def _load(impl: str, model_dir: str):
    import torch

    if impl.startswith("hf"):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    from ch05.llama.generate_llm import load_llm
    from ch05.llama.qwen3 import load_qwen3
    from llmfs.int8 import quantize_int8

    dtype, int8 = getattr(torch, IMPLS[impl][0]), IMPLS[impl][1]
    if json.loads((Path(model_dir) / "config.json").read_text())["model_type"] == "gpt2":
        return load_llm(model_dir, dtype=dtype, device="cpu", int8=int8).model
    # Qwen3: load_llm's steps without the tokenizer (the folder has none): laid out while read, then int8.
    model = load_qwen3(model_dir, dtype=dtype, decoding_layout=True)
    return quantize_int8(model, int8) if int8 else model


def _decode(impl: str, model, ids, new_tokens: int) -> list[int]:
    if impl.startswith("hf"):
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, use_cache=True)
    else:
        from ch05.gpt_generate import generate

        out = generate(model, ids, max_new_tokens=new_tokens, context_size=model.cfg["context_length"],
                       use_cache=True)
    return out[0, ids.shape[1]:].tolist()


def worker(spec: dict) -> dict:
    """Load spec["dir"] as spec["impl"], decode, and return the row (run in a fresh process)."""
    import torch

    ids = torch.randint(0, spec["vocab_size"], (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(123))
    t0 = time.perf_counter()
    model = _load(spec["impl"], spec["dir"])
    load_s = time.perf_counter() - t0
    _decode(spec["impl"], model, ids, 4)  # warm-up
    t0 = time.perf_counter()
    tokens = _decode(spec["impl"], model, ids, spec["new_tokens"])
    seconds = time.perf_counter() - t0
    return {**spec, "load_s": load_s, "tokens": tokens, "seconds": seconds, "tokens_per_s": len(tokens) / seconds,
            "bytes_per_token": None if spec["impl"].startswith("hf") else weights_read_per_token(model),
            "peak_rss_mib": proc_status_mib("VmHWM"), "rss_after_mib": proc_status_mib("VmRSS")}


def run_worker(spec: dict, timeout: float = 1800) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.int8_decode", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def available_impls(impls: tuple[str, ...]) -> tuple[str, ...]:
    """`impls` without "ours-int8-dynamic" where PyTorch has no fbgemm (it needs an x86 CPU)."""
    from llmfs.int8 import dynamic_kernel_available

    return tuple(i for i in impls if IMPLS.get(i, ("", False))[1] != "dynamic" or dynamic_kernel_available())


def decode_rows(folders: dict[str, Path], new_tokens: int, repeats: int, quick: bool,
                impls: tuple[str, ...] | None = None) -> list[dict]:
    """One row per (model, impl): the fastest of `repeats` processes, run in rounds, with every run's tokens/s.

    A transformers row gets the bytes per token of our float32 row of the same model (the same weights).
    `impls` (default: all of IMPLS) is cut to those this machine runs (`available_impls`)."""
    impls = available_impls(tuple(IMPLS) if impls is None else impls)
    from benchmarks.llm import QWEN3_06B_HF, TINY_HF

    vocab = {"gpt2-124m": (GPT2_TINY_HF if quick else GPT2_124M_HF)["vocab_size"],
             "qwen3-0.6b": (TINY_HF if quick else QWEN3_06B_HF)["vocab_size"]}
    specs = [{"model": name, "impl": impl, "dir": str(folder), "vocab_size": vocab[name], "new_tokens": new_tokens}
             for name, folder in folders.items() for impl in impls]
    runs: list[list[dict]] = [[] for _ in specs]
    for round_ in range(repeats):
        for i, spec in enumerate(specs):
            print(f"{spec['model']} {spec['impl']} (run {round_ + 1}/{repeats})", flush=True)
            runs[i].append(run_worker(spec))
    rows = [{**max(done, key=lambda r: r["tokens_per_s"]), "runs_tokens_per_s": [r["tokens_per_s"] for r in done]}
            for done in runs]
    for row in rows:
        if row["bytes_per_token"] is None:
            ours = [r for r in rows if r["model"] == row["model"] and r["impl"] == "ours-float32"]
            row["bytes_per_token"] = ours[0]["bytes_per_token"] if ours else None
    return rows


# --- Memory bandwidth ---------------------------------------------------------------------------

def measure_bandwidth(size_mib: int = 1024, repeats: int = 5) -> dict:
    """GB/s (1e9 bytes) of reading a float32 tensor of `size_mib` (a sum) and of copying it (read + write),
    best of `repeats`, with PyTorch's current threads."""
    import torch

    a = torch.ones(size_mib * 2**20 // 4)
    b = torch.empty_like(a)
    nbytes = a.numel() * 4
    read, copy = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        read.append(nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        b.copy_(a)
        copy.append(2 * nbytes / (time.perf_counter() - t0) / 1e9)
    return {"size_mib": size_mib, "read_gb_s": max(read), "copy_gb_s": max(copy), "threads": torch.get_num_threads()}


# --- The report ---------------------------------------------------------------------------------

def summarize(rows: list[dict], bandwidth: dict, machine: dict, quick: bool, new_tokens: int
              ) -> tuple[str, list[tuple[str, bool]]]:
    """The Markdown table (one line per row) and the goals, each with whether it is met."""
    shapes = "tiny configs (smoke run)" if quick else "random weights with GPT-2 124M and Qwen3-0.6B shapes"
    lines = [f"# Cached greedy decoding with int8 weights ({shapes})", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, transformers "
             f"{machine['transformers']}, {machine['threads']} threads; fastest of {machine['repeats']} processes "
             f"per row, run in rounds. Batch 1, {PROMPT_TOKENS}-token prompt, {new_tokens} new tokens.", "",
             f"Memory bandwidth ({bandwidth['size_mib']} MiB float32 tensor, {bandwidth['threads']} threads): "
             f"read {bandwidth['read_gb_s']:.1f} GB/s, copy (read + write) {bandwidth['copy_gb_s']:.1f} GB/s. "
             "Limit = read bandwidth / bytes per token.", "",
             "| model | implementation | tokens/s | vs ours float32 | MB read per token | limit (tokens/s) | "
             "% of limit | peak RSS (MiB) | RSS after (MiB) | all runs (tokens/s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    goals: list[tuple[str, bool]] = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by_impl = {r["impl"]: r for r in rows if r["model"] == model}
        base = by_impl.get("ours-float32")
        for impl, r in by_impl.items():
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
            mb = r["bytes_per_token"] / 1e6 if r["bytes_per_token"] else float("nan")
            limit = bandwidth["read_gb_s"] * 1e3 / mb if r["bytes_per_token"] else float("nan")
            runs = ", ".join(f"{v:.1f}" for v in r["runs_tokens_per_s"])
            lines.append(f"| {model} | {impl} | {r['tokens_per_s']:.1f} | {ratio} | {mb:,.1f} | {limit:,.1f} | "
                         f"{100 * r['tokens_per_s'] / limit:.0f}% | {r['peak_rss_mib']:,.0f} | "
                         f"{r['rss_after_mib']:,.0f} | {runs} |")
        for impl, what in (("ours-int8", "int8"), ("ours-int8-dynamic", "int8 dynamic (opt-in)")):
            if base and impl in by_impl and model in GOALS:
                ratio = by_impl[impl]["tokens_per_s"] / base["tokens_per_s"]
                goals.append((f"{model}: {what} >= {GOALS[model]:g}x our float32 ({ratio:.2f}x)",
                              ratio >= GOALS[model]))
    lines += ["", "## Goals", ""] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in goals]
    return "\n".join(lines) + "\n", goals


def add_decode_arguments(p: Parser, kept: str, report: str) -> None:
    """The options of a decoding benchmark (this one, `benchmarks.inference`): size, tokens, repeats, folders."""
    add_quick_argument(p, "tiny configs: checks the harness, not the speed")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="tokens per timed run (default 32; --quick: 8)")
    p.add_argument("--repeats", type=positive_int, default=None, help="processes per row (default 2; --quick: 1)")
    p.add_argument("--workdir", type=path_argument, default=None,
                   help=f"keep the {kept} here and reuse them (default: a temp dir)")
    p.add_argument("--out", type=path_argument, default=Path(__file__).resolve().parent / "results",
                   help=f"folder for {report}.md and {report}.json (default benchmarks/results)")


def decode_settings(args: argparse.Namespace) -> tuple[int, int]:
    """(processes per row, new tokens per run) from `add_decode_arguments`' options."""
    return args.repeats or (1 if args.quick else 2), args.max_new_tokens or (8 if args.quick else 32)


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.int8_decode [options]`; returns the exit code."""
    p = Parser(prog="python -m benchmarks.int8_decode",
               description="Decoding speed and memory with int8 weights vs float32, bfloat16 and transformers.")
    add_decode_arguments(p, "model folders", "int8_decode")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    repeats, new_tokens = decode_settings(args)

    def benchmark() -> None:
        import transformers

        check_output_dir(args.out, option="--out")  # before minutes of measuring
        if args.workdir is not None:
            check_output_dir(args.workdir, option="--workdir")
        machine = {**machine_description(), "transformers": transformers.__version__, "repeats": repeats}
        bandwidth = measure_bandwidth(64 if args.quick else 1024)
        with tempfile.TemporaryDirectory() as tmp:
            folders = prepare_folders(args.workdir or Path(tmp), args.quick)
            rows = decode_rows(folders, new_tokens, repeats, args.quick)
        table, goals = summarize(rows, bandwidth, machine, args.quick, new_tokens)
        write_report(args.out, "int8_decode.json", "int8_decode.md",
                     {"machine": machine, "quick": args.quick, "bandwidth": bandwidth, "rows": rows}, table, goals)

    return run(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
