"""Benchmark ch05.llama.qwen3 against transformers' Qwen3ForCausalLM: cached greedy decoding and loading memory.

    python -m benchmarks.llm            # a random-init Qwen3-0.6B-shaped model (a few minutes, ~4 GB disk)
    python -m benchmarks.llm --quick    # tiny config, a smoke test of the harness

A random-weight model with Qwen3-0.6B's shapes is saved with `save_pretrained` in float32 and
in bfloat16 (into --workdir, a temp folder by default). Every measurement then runs in a fresh
process, in rounds over ours / transformers (A B A B, not A A B B), and the fastest of
--repeats processes is kept:

- decoding: load the folder (ours: laid out for decoding by `llmfs.decoding_layout`, as
  `python -m ch05.llama` does; "ours-stored-layout" without it), greedy decoding with the KV cache of `--max-new-tokens` tokens after a
  16-token prompt (ours: chapter 5's `generate`; theirs: `model.generate`), after one warm-up run;
- loading: peak RSS of loading the folder and running one token through the model (so every
  weight page has been read), minus the RSS of the process before loading, against the size
  of the weights.

Writes llm.md and llm.json into --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmfs.bench import machine_description, proc_status_mib, write_report
from llmfs.cli import Parser, add_quick_argument, check_output_dir, path_argument, positive_int, run

QWEN3_06B_HF = {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                "max_position_embeddings": 40960, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
TINY_HF = {**QWEN3_06B_HF, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256}
PROMPT_TOKENS = 16


def _rss_mib() -> float:
    rss = proc_status_mib("VmRSS")
    return float("nan") if rss is None else rss


def _peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: its own, where ru_maxrss would start at the parent's peak)."""
    peak = proc_status_mib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if peak is None else peak  # KiB on Linux


def prepare(workdir: Path, quick: bool) -> dict[str, Path]:
    """Save one random-init model in float32 and in bfloat16; returns {dtype name: folder}."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    size = "tiny" if quick else "0.6b"
    dirs = {dt: workdir / f"qwen3-{size}-{dt}" for dt in ("float32", "bfloat16")}
    # Reused when a --workdir already holds them (same seed and config, so the same weights).
    if all((d / "config.json").is_file() for d in dirs.values()):
        return dirs
    torch.manual_seed(123)
    model = Qwen3ForCausalLM(Qwen3Config(**(TINY_HF if quick else QWEN3_06B_HF))).eval()
    model.save_pretrained(dirs["float32"])
    model.to(torch.bfloat16).save_pretrained(dirs["bfloat16"])
    return dirs


# --- One measurement per process ---------------------------------------------------------------

def _load(impl: str, model_dir: str, dtype_name: str):
    import torch

    dtype = getattr(torch, dtype_name)
    if impl.startswith("ours"):
        from ch05.llama.qwen3 import load_qwen3

        # Laid out for CPU decoding as it is read, as `python -m ch05.llama` loads it.
        return load_qwen3(model_dir, dtype=dtype, decoding_layout=impl != "ours-stored-layout")
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _decode(impl: str, model, ids, new_tokens: int) -> list[int]:
    if impl in ("ours", "ours-stored-layout"):
        from ch05.gpt_generate import generate

        out = generate(model, ids, max_new_tokens=new_tokens, context_size=model.cfg["context_length"],
                       use_cache=True)
    elif impl == "ours-stream":
        from llmfs.generate_stream import generate_stream

        return list(generate_stream(model, ids, max_new_tokens=new_tokens, context_size=model.cfg["context_length"]))
    else:
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, use_cache=True)
    return out[0, ids.shape[1]:].tolist()


def worker(spec: dict) -> dict:
    import torch

    if spec["impl"] == "hf":
        import transformers  # noqa: F401  (imports count as the process's baseline, not as loading)
    else:
        import ch05.llama.qwen3  # noqa: F401
    ids = torch.randint(0, spec["vocab_size"], (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(123))
    before = _rss_mib()
    t0 = time.perf_counter()
    model = _load(spec["impl"], spec["dir"], spec["dtype"])
    load_s = time.perf_counter() - t0
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    result = {**spec, "load_s": load_s, "weights_mib": weights_mib, "rss_before_mib": before}
    if spec["kind"] == "load":
        with torch.no_grad():
            model(ids[:, :1])  # every weight page read once
        result["peak_rss_mib"] = _peak_rss_mib()
        result["load_rss_ratio"] = (result["peak_rss_mib"] - before) / weights_mib
        return result
    _decode(spec["impl"], model, ids, 4)  # warm-up
    t0 = time.perf_counter()
    tokens = _decode(spec["impl"], model, ids, spec["new_tokens"])
    seconds = time.perf_counter() - t0
    return {**result, "tokens": tokens, "seconds": seconds, "tokens_per_s": len(tokens) / seconds}


def run_worker(spec: dict, timeout: float = 900) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.llm", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


# --- The run -----------------------------------------------------------------------------------

def measure(specs: list[dict], repeats: int, key: str, better=max) -> list[dict]:
    """Every spec `repeats` times in rounds; keep each spec's best run (and every run's `key`)."""
    runs: list[list[dict]] = [[] for _ in specs]
    for round_ in range(repeats):
        for i, spec in enumerate(specs):
            print(f"[{spec['kind']}] {spec['impl']} {spec['dtype']} file {spec['file_dtype']} "
                  f"(run {round_ + 1}/{repeats})", flush=True)
            runs[i].append(run_worker(spec))
    return [{**better(done, key=lambda r: r[key]), f"runs_{key}": [r[key] for r in done]} for done in runs]


def summarize(results: dict, machine: dict, quick: bool, new_tokens: int) -> tuple[str, list[tuple[str, bool]]]:
    shape = "tiny config (smoke run)" if quick else "random-init Qwen3-0.6B shapes (596M parameters, tied)"
    lines = [f"# Qwen3 decoding and loading: ours vs transformers ({shape})", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
             f"transformers {machine['transformers']}, {machine['threads']} threads; best of {machine['repeats']} "
             "processes per row, run in rounds (loading: one process).", "",
             f"## Cached greedy decoding ({PROMPT_TOKENS}-token prompt, {new_tokens} new tokens, batch 1)", "",
             "| model | dtype | tokens/s | ratio vs transformers | all runs (tokens/s) | same tokens as transformers |",
             "|---|---|---:|---:|---|---|"]
    goals: list[tuple[str, bool]] = []
    gen = {(r["impl"], r["dtype"]): r for r in results["generate"]}
    names = {"ours": "ours (`generate`)", "ours-stream": "ours (`generate_stream`)",
             "ours-stored-layout": "ours (`generate`, without `llmfs.decoding_layout`)", "hf": "transformers"}
    for dtype in ("float32", "bfloat16") if gen else ():
        hf = gen[("hf", dtype)]
        for impl, name in names.items():
            if (impl, dtype) not in gen:
                continue
            r = gen[(impl, dtype)]
            ratio = r["tokens_per_s"] / hf["tokens_per_s"]
            runs = ", ".join(f"{v:.1f}" for v in r["runs_tokens_per_s"])
            same = "" if impl == "hf" else ("yes" if r["tokens"] == hf["tokens"] else "no")
            lines.append(f"| {name} | {dtype} | {r['tokens_per_s']:.1f} | {ratio:.2f}x | {runs} | {same} |")
        ratio = gen[("ours", dtype)]["tokens_per_s"] / hf["tokens_per_s"]
        goals.append((f"{dtype} decoding with `generate` >= 1.0x transformers ({ratio:.2f}x)", ratio >= 1.0))
    lines += ["", "## Loading: peak RSS while loading and running one token", "",
              "| model | file dtype -> weights dtype | weights (MiB) | RSS before (MiB) | peak RSS (MiB) | "
              "(peak - before) / weights | load time (s) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in results["load"]:
        lines.append(f"| {'ours' if r['impl'] == 'ours' else 'transformers'} | {r['file_dtype']} -> {r['dtype']} | "
                     f"{r['weights_mib']:,.0f} | {r['rss_before_mib']:,.0f} | {r['peak_rss_mib']:,.0f} | "
                     f"{r['load_rss_ratio']:.2f}x | {r['load_s']:.2f} |")
        if r["impl"] == "ours" and r["file_dtype"] == r["dtype"] and not quick:
            goals.append((f"loading {r['dtype']}: peak RSS <= 1.3x the weights ({r['load_rss_ratio']:.2f}x)",
                          r["load_rss_ratio"] <= 1.3))
    lines += ["", "## Goals", ""] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in goals]
    return "\n".join(lines) + "\n", goals


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.llm [options]`; returns the exit code."""
    p = Parser(prog="python -m benchmarks.llm",
               description="Qwen3 decoding speed and loading memory, ours vs transformers.")
    add_quick_argument(p, "tiny config: checks the harness, not the speed")
    p.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="tokens to decode per timed run (default 32; every run decodes all of them)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="processes per measurement (default 2; --quick: 1)")
    p.add_argument("--workdir", type=path_argument, default=None,
                   help="keep the model folders here and reuse them (default: a temp dir)")
    p.add_argument("--out", type=path_argument, default=Path(__file__).resolve().parent / "results",
                   help="folder for llm.md and llm.json (default benchmarks/results)")
    p.add_argument("--only", choices=("generate", "load"), default=None, help="run one of the two sections")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    repeats = args.repeats or (1 if args.quick else 2)

    def benchmark() -> None:
        import transformers

        check_output_dir(args.out, option="--out")  # before minutes of measuring
        if args.workdir is not None:
            check_output_dir(args.workdir, option="--workdir")
        machine = {**machine_description(), "transformers": transformers.__version__, "repeats": repeats}
        with tempfile.TemporaryDirectory() as tmp:
            dirs = prepare(args.workdir or Path(tmp), args.quick)
            vocab = (TINY_HF if args.quick else QWEN3_06B_HF)["vocab_size"]
            base = {"vocab_size": vocab, "new_tokens": args.max_new_tokens}
            gen = [{**base, "kind": "generate", "impl": impl, "dtype": dt, "file_dtype": dt, "dir": str(dirs[dt])}
                   for dt in ("float32", "bfloat16")
                   for impl in ("ours", "ours-stream", "hf") + (("ours-stored-layout",) if dt == "float32" else ())]
            load = [{**base, "kind": "load", "impl": impl, "dtype": dt, "file_dtype": fdt, "dir": str(dirs[fdt])}
                    for impl, dt, fdt in (("ours", "float32", "float32"), ("hf", "float32", "float32"),
                                          ("ours", "bfloat16", "bfloat16"), ("hf", "bfloat16", "bfloat16"),
                                          ("ours", "bfloat16", "float32"))]
            results = {"generate": [] if args.only == "load" else measure(gen, repeats, "tokens_per_s"),
                       # memory varies little between runs: one process each
                       "load": [] if args.only == "generate" else measure(load, 1, "peak_rss_mib", better=min)}
        table, goals = summarize(results, machine, args.quick, args.max_new_tokens)
        write_report(args.out, "llm.json", "llm.md", {"machine": machine, "quick": args.quick, "results": results},
                     table, goals)

    return run(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
