"""Fast local inference, side by side in one run: our float32 / bfloat16 / int8 decoding, transformers and
llama.cpp on the same weights, against the memory bandwidth; then served throughput with and without batching.

    python -m benchmarks.inference            # GPT-2 124M and Qwen3-0.6B shapes, random weights (~4 minutes on 2 idle cores)
    python -m benchmarks.inference --quick    # tiny configs: checks the harness, not the speed

Decoding (batch 1, a 16-token prompt, greedy, KV cache), every row in a fresh process, rows in rounds,
the fastest of --repeats kept:

- ours and transformers: `benchmarks.int8_decode` (its folders, loaders and rows);
- llama.cpp: the same folders written as GGUF by `ch07.export_gguf` (f32, and q8_0: 8-bit blocks of 32
  weights with one float16 scale, 8.5 bits a weight), decoded through llama-cpp-python
  (`benchmarks.llamacpp_decode`) on the same prompt ids. Its tokens/s counts the prompt and every new
  token over the whole time, as ours does. The Qwen3 folder gets a small byte-level tokenizer.json first
  (the exporter needs one; the benchmark feeds token ids, so its merges change nothing).

"MB read per token" is what one step must read of the weight matrices (`int8_decode.weights_read_per_token`
for ours; llama.cpp's f32 reads what our float32 reads, q8_0 34/128 of it), and "limit" that divided
into the measured read bandwidth: the fastest any implementation could decode on this machine.

Served throughput: `benchmarks.serve` (the server in its own process, streaming clients) at 1, 4, 8 and 16
concurrent streams, with `--max-batch-size 1` (one request at a time) and the default (continuous
batching), on the same number of threads as the decoding rows; on x86, batched once more with the
server's opt-in `--onednn` (oneDNN for products of 2 rows or more: faster batched steps on the AMD EPYC).

Writes inference.md and inference.json (and benchmarks.serve's serve.json, serve_onednn.json) into --out (default
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import int8_decode
from llmfs.bench import machine_description, proc_status_mib, write_report
from llmfs.cli import Parser, check_output_dir, run

OUR_IMPLS = ("ours-float32", "ours-bfloat16", "ours-int8", "ours-int8-dynamic", "hf-float32")  # x86: dynamic
GGUF_TYPES = ("f32", "q8_0")
Q8_0_FRACTION = 34 / 128  # q8_0: 32 int8 weights + one float16 scale = 34 bytes where float32 takes 128
# The goals on the Qwen3-0.6B shapes (int8 against llama.cpp's q8_0), beside int8_decode.GOALS.
LLAMA_CPP_GOAL = 0.7
SERVE_STREAMS = (1, 4, 8, 16)


def add_tokenizer(model_dir: Path) -> None:
    """A small byte-level BPE tokenizer.json with Qwen3's special tokens, for the GGUF export (ids only matter)."""
    if (model_dir / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Every effort moves you forward, one token at a time."] * 4, trainer=trainer)
    tok.save(str(model_dir / "tokenizer.json"))


def export_ggufs(folders: dict[str, Path], workdir: Path) -> dict[str, dict[str, Path]]:
    """{model: {gguf type: file}}: each folder as GGUF (GPT-2 through our GPTModel, Qwen3 from its folder)."""
    from ch07.cli import load_chat_model
    from ch07.export_gguf.export_gguf import export_gguf, export_hf_folder

    files: dict[str, dict[str, Path]] = {}
    for name, folder in folders.items():
        files[name] = {}
        for outtype in GGUF_TYPES:
            path = workdir / f"{name}-{outtype}.gguf"
            if not path.is_file():
                print(f"exporting {name} as {outtype}", flush=True)
                if name.startswith("gpt2"):
                    export_gguf(load_chat_model(str(folder), device="cpu").model, path, outtype, overwrite=True)
                else:
                    add_tokenizer(folder)
                    export_hf_folder(folder, path, outtype, overwrite=True)
            files[name][outtype] = path
    return files


def llamacpp_worker(spec: dict) -> dict:
    """Decode spec["file"] with llama.cpp on int8_decode's prompt ids (run in a fresh process)."""
    import torch

    from benchmarks.llamacpp_decode import llamacpp_decode

    ids = torch.randint(0, spec["vocab_size"], (1, int8_decode.PROMPT_TOKENS),
                        generator=torch.Generator().manual_seed(123))[0].tolist()
    r = llamacpp_decode(spec["file"], spec["new_tokens"], prompt_ids=ids, repeats=1)
    prompt_s = r["prompt_tokens"] / r["prompt_tokens_per_s"]
    decode_s = max(r["n_tokens"] - 1, 1) / r["tokens_per_s"]
    return {**spec, "tokens": r["tokens"], "seconds": prompt_s + decode_s, "load_s": r["load_s"],
            "tokens_per_s": r["n_tokens"] / (prompt_s + decode_s), "llama_cpp": r["llama_cpp"],
            "peak_rss_mib": proc_status_mib("VmHWM"), "rss_after_mib": proc_status_mib("VmRSS")}


def run_llamacpp_worker(spec: dict, timeout: float = 1800) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.inference", "--llamacpp-worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"llama.cpp worker failed for {spec}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def llamacpp_rows(files: dict[str, dict[str, Path]], ours: list[dict], new_tokens: int, repeats: int) -> list[dict]:
    """One row per (model, GGUF type), fastest of `repeats` processes in rounds; the tokens compared with ours."""
    vocab = {r["model"]: r["vocab_size"] for r in ours}
    specs = [{"model": m, "impl": f"llama.cpp-{t}", "file": str(f), "vocab_size": vocab[m], "new_tokens": new_tokens}
             for m, by_type in files.items() for t, f in by_type.items()]
    runs: list[list[dict]] = [[] for _ in specs]
    for round_ in range(repeats):
        for i, spec in enumerate(specs):
            print(f"{spec['model']} {spec['impl']} (run {round_ + 1}/{repeats})", flush=True)
            runs[i].append(run_llamacpp_worker(spec))
    rows = []
    for done in runs:
        row = {**max(done, key=lambda r: r["tokens_per_s"]), "runs_tokens_per_s": [r["tokens_per_s"] for r in done]}
        base = next(r for r in ours if r["model"] == row["model"] and r["impl"] == "ours-float32")
        fraction = Q8_0_FRACTION if row["impl"].endswith("q8_0") else 1.0
        row["bytes_per_token"] = base["bytes_per_token"] * fraction
        row["equal_tokens"] = next((i for i, (a, b) in enumerate(zip(row["tokens"], base["tokens"])) if a != b),
                                   min(len(row["tokens"]), len(base["tokens"])))
        rows.append(row)
    return rows


def serve_rows(out: Path, quick: bool, threads: int) -> dict:
    """benchmarks.serve at SERVE_STREAMS, with and without batching, on `threads` torch threads; its JSON
    report (also left in `out` as serve.json). Where oneDNN linear layers run (x86), batched again with the
    server's opt-in `--onednn` (report under "onednn"; serve_onednn.json)."""
    from llmfs.onednn_linear import onednn_linear_supported

    def measure(name: str, *extra: str) -> dict:
        cmd = [sys.executable, "-m", "benchmarks.serve", "--clients", *map(str, SERVE_STREAMS), "--threads",
               str(threads), "--out", str(out / name), *extra, *(["--quick"] if quick else [])]
        print("served throughput: python " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        return json.loads((out / name).read_text())

    report = measure("serve.json")
    if onednn_linear_supported():
        report["onednn"] = measure("serve_onednn.json", "--onednn", "--max-batch-size", str(max(report["max_batch_sizes"])))
    return report


def serve_table(serve: dict, quick: bool = False) -> tuple[list[str], list[tuple[str, bool]]]:
    """Tokens/s summed over the streams, one request at a time and batched (and batched with --onednn), and
    the goal (8 streams >= 4x one) for each batched column."""
    summary, onednn = serve["summary"], serve.get("onednn")
    sizes = serve["max_batch_sizes"]
    columns = [(f"--max-batch-size {b}", summary, b) for b in sizes]
    if onednn:
        columns += [(f"--max-batch-size {b} --onednn", onednn["summary"], b) for b in onednn["max_batch_sizes"]]
    shape = "a tiny model" if quick else "GPT-2 124M shape"
    lines = ["", f"## Served throughput (`benchmarks.serve`: {shape}, {serve['tokens']} new tokens, greedy, "
                 f"{serve['threads']} threads; tokens/s summed over the streams; every answer equal to the direct call's)",
             "", "| streams | " + " | ".join(name for name, _, _ in columns) + " |",
             "|---:|" + "---:|" * len(columns)]
    for c in SERVE_STREAMS:
        cells = [rows.get(f"served b{b} x{c}") for _, rows, b in columns]
        lines.append(f"| {c} | " + " | ".join(f"{s['tokens_per_s']:.1f}" if s else "" for s in cells) + " |")
    lines.append(f"\nDirect calls without HTTP, one at a time: {summary['direct']['tokens_per_s']:.1f} tokens/s.")
    if onednn:
        lines.append("`--onednn` (opt-in, x86): the server's products of 2 rows or more (batched steps, prompts) run "
                     "through oneDNN; one row stays on PyTorch's default path.")
    goals = []
    for name, rows, b in columns:
        one, eight = rows.get(f"served b{b} x1"), rows.get(f"served b{b} x8")
        if b > 1 and one and eight:
            ratio = eight["tokens_per_s"] / one["tokens_per_s"]
            how = "batching" + (" and --onednn" if "--onednn" in name else "")
            goals.append((f"served, 8 streams >= 4x one stream with {how} ({ratio:.2f}x)", ratio >= 4.0))
    return lines, goals


def summarize(rows: list[dict], bandwidth: dict, machine: dict, quick: bool, new_tokens: int,
              serve: dict | None) -> tuple[str, list[tuple[str, bool]]]:
    """int8_decode's table with the llama.cpp rows, its goals plus int8 against q8_0, and the served rows."""
    table, goals = int8_decode.summarize(rows, bandwidth, machine, quick, new_tokens)
    table = table.replace("# Cached greedy decoding with int8 weights", "# Fast local inference, side by side", 1)
    body, _, _ = table.partition("\n## Goals")
    extra = ["", "llama.cpp rows: llama-cpp-python " + next((r["llama_cpp"] for r in rows if "llama_cpp" in r), "?")
             + ", the file exported by `ch07.export_gguf`; greedy tokens equal to ours float32 (of "
             + f"{new_tokens}): " + ", ".join(f"{r['model']} {r['impl']} {r['equal_tokens']}" for r in rows
                                              if "equal_tokens" in r) + "."]
    for model in dict.fromkeys(r["model"] for r in rows):
        by_impl = {r["impl"]: r for r in rows if r["model"] == model}
        for impl, what in (("ours-int8", "int8"), ("ours-int8-dynamic", "int8 dynamic (opt-in)")):
            if model == "qwen3-0.6b" and impl in by_impl and "llama.cpp-q8_0" in by_impl:
                ratio = by_impl[impl]["tokens_per_s"] / by_impl["llama.cpp-q8_0"]["tokens_per_s"]
                goals.append((f"{model}: {what} >= {LLAMA_CPP_GOAL:g}x llama.cpp q8_0 ({ratio:.2f}x)",
                              ratio >= LLAMA_CPP_GOAL))
    serve_lines: list[str] = []
    if serve is not None:
        serve_lines, serve_goals = serve_table(serve, quick)
        goals.extend(serve_goals)
    lines = [body.rstrip("\n"), *extra, *serve_lines, "", "## Goals", ""]
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in goals]
    return "\n".join(lines) + "\n", goals


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.inference [options]`; returns the exit code."""
    p = Parser(prog="python -m benchmarks.inference",
               description="Decoding speed of ours (float32, bfloat16, int8), transformers and llama.cpp side by "
                           "side, against the memory bandwidth; then served throughput with and without batching.")
    int8_decode.add_decode_arguments(p, "model folders and GGUF files", "inference")
    p.add_argument("--skip-serve", action="store_true", help="decoding only, without benchmarks.serve")
    p.add_argument("--llamacpp-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.llamacpp_worker is not None:
        print("RESULT " + json.dumps(llamacpp_worker(json.loads(args.llamacpp_worker))), flush=True)
        return 0
    repeats, new_tokens = int8_decode.decode_settings(args)

    def benchmark() -> None:
        import transformers

        check_output_dir(args.out, option="--out")  # before many minutes of measuring
        if args.workdir is not None:
            check_output_dir(args.workdir, option="--workdir")
        machine = {**machine_description(), "transformers": transformers.__version__, "repeats": repeats}
        bandwidth = int8_decode.measure_bandwidth(64 if args.quick else 1024)
        with tempfile.TemporaryDirectory() as tmp:
            workdir = args.workdir or Path(tmp)
            folders = int8_decode.prepare_folders(workdir, args.quick)
            files = export_ggufs(folders, workdir)
            ours = int8_decode.decode_rows(folders, new_tokens, repeats, args.quick, OUR_IMPLS)
            rows = ours + llamacpp_rows(files, ours, new_tokens, repeats)
        rows.sort(key=lambda r: (list(folders).index(r["model"]), r["impl"].startswith("llama.cpp")))
        serve = None if args.skip_serve else serve_rows(args.out, args.quick, machine["threads"])
        table, goals = summarize(rows, bandwidth, machine, args.quick, new_tokens, serve)
        write_report(args.out, "inference.json", "inference.md",
                     {"machine": machine, "quick": args.quick, "bandwidth": bandwidth, "rows": rows, "serve": serve},
                     table, goals)

    return run(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
