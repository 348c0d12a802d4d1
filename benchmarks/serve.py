"""Benchmark `ch07.serve`: tokens and requests per second and time to first token, against the model called directly.

    python -m benchmarks.serve            # GPT-2 124M shape, random weights (no download), 2-4 minutes
    python -m benchmarks.serve --quick    # a tiny model: a smoke test of the harness

The server runs as `python -m ch07.serve` in its own process, once for each `--max-batch-size`
(default 1, one request at a time, and 8, the server's default: continuous batching,
`llmfs.batched`); clients stream /api/generate with httpx (greedy, a fixed prompt and answer
length). The reference is the same generation run in this process through `llmfs.chat` with no
HTTP at all, one at a time ("direct") and c at a time in one batch ("direct", max batch c:
`llmfs.batched` without the server), measured in the same run and interleaved with the served
rounds, so a busy machine slows all alike. One request at a time, concurrent clients queue on the server's one model:
tokens/s (summed over the streams) stays about that of one stream while the time to first token
grows with the queue. Batched, up to `--max-batch-size` streams decode together, each step reading
the weights once for all of them: tokens/s grows with the streams. Every answer must be the
direct call's text, batched or not.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from benchmarks.run import TINY_CONFIG
from ch04.gpt import GPT_CONFIG_124M, GPTModel
from llmfs.atomic import atomic_write
from llmfs.bench import machine_description
from llmfs.checkpoint import save_model
from llmfs.cli import Parser, add_quick_argument, check_output_dir, path_argument, positive_int, run
from llmfs.errors import InvalidInput
from llmfs.serve import DEFAULT_MAX_BATCH_SIZE, ONEDNN_MIN_ROWS

PROMPT = "Every effort moves you"
QUICK_CONFIG = {**TINY_CONFIG, "vocab_size": 50257, "drop_rate": 0.0}  # the GPT-2 tokenizer's ids must fit


def start_server(model_path: Path, threads: int, max_batch_size: int = 1,
                 onednn: bool = False) -> tuple[subprocess.Popen, str]:
    """`python -m ch07.serve` on a free port; returns the process and its base URL once it answers."""
    import os

    env = {**os.environ, "LLMFS_DEVICE": "cpu", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "ch07.serve", "--model", str(model_path), "--port", "0",
                             "--name", "bench", "--max-batch-size", str(max_batch_size),
                             *(["--onednn"] if onednn else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stderr.readline()
    while "OLLAMA_HOST=" not in line:
        if not line:
            raise RuntimeError(f"the server did not start: {proc.stderr.read()[-2000:]}")
        line = proc.stderr.readline()
    # Keep reading its log so a full pipe never blocks the server.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, "http://" + re.search(r"OLLAMA_HOST=(\S+)", line).group(1)


def served_request(client: httpx.Client, payload: dict) -> dict:
    """One streamed request: seconds to the first chunk with text and to the end, the text and its tokens."""
    start = time.perf_counter()
    first, text, tokens = None, [], 0
    with client.stream("POST", "/api/generate", json=payload) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            chunk = json.loads(line)
            if "error" in chunk:
                raise RuntimeError(f"the server failed: {chunk['error']}")
            if chunk.get("response") and first is None:
                first = time.perf_counter() - start
            text.append(chunk.get("response", ""))
            tokens = chunk.get("eval_count", tokens)
    return {"ttft": first, "seconds": time.perf_counter() - start, "text": "".join(text), "tokens": tokens}


def served_round(host: str, payload: dict, requests: int, clients: int) -> dict:
    """`requests` requests from `clients` threads at once (each with its own connection)."""
    results, errors, lock = [], [], threading.Lock()
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]

    def run(n):
        try:
            with httpx.Client(base_url=host, timeout=600) as client:
                for _ in range(n):
                    r = served_request(client, payload)
                    with lock:
                        results.append(r)
        except Exception as exc:  # re-raised below: an exception in a thread would be lost
            errors.append(exc)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(n,)) for n in per_client]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients} clients failed; the first: {errors[0]!r}")
    return {"wall": time.perf_counter() - start, "results": results}


def direct_round(chat, options, requests: int) -> dict:
    """The same generations in this process, without a server."""
    ids = chat.encode(chat.generate_prompt(PROMPT))
    results = []
    start = time.perf_counter()
    for _ in range(requests):
        t0, first, text = time.perf_counter(), None, []
        gen = chat.generation(ids, options)
        for piece in gen:
            if piece and first is None:
                first = time.perf_counter() - t0
            text.append(piece)
        results.append({"ttft": first, "seconds": time.perf_counter() - t0, "text": "".join(text),
                        "tokens": gen.eval_count})
    return {"wall": time.perf_counter() - start, "results": results}


def direct_batched_round(chat, options, requests: int, clients: int) -> dict:
    """The same generations in this process, `clients` at a time decoded as one batch (`llmfs.batched`,
    stepped as the server's scheduler steps it, without HTTP): what batching gives before any serving cost."""
    from llmfs.batched import BatchedGeneration

    ids = chat.encode(chat.generate_prompt(PROMPT))
    results = []
    start = time.perf_counter()
    for done in range(0, requests, clients):
        batch = BatchedGeneration(chat.model, chat.context_length)
        gens = [chat.generation(ids, options, batch) for _ in range(min(clients, requests - done))]
        t0, first, texts, open_gens = time.perf_counter(), None, [[] for _ in gens], set(range(len(gens)))
        while open_gens:
            batch.step()
            for i in sorted(open_gens):
                piece = next(gens[i], None)
                if piece is None or gens[i].done_reason is not None:
                    open_gens.discard(i)
                    gens[i].close()
                texts[i].append(piece or "")
            first = first or time.perf_counter() - t0
        seconds = time.perf_counter() - t0
        results += [{"ttft": first, "seconds": seconds, "text": "".join(t), "tokens": g.eval_count}
                    for t, g in zip(texts, gens)]
    return {"wall": time.perf_counter() - start, "results": results}


def summarize(rounds: list[dict]) -> dict:
    results = [r for rnd in rounds for r in rnd["results"]]
    ttft = sorted(r["ttft"] for r in results)
    wall = sum(rnd["wall"] for rnd in rounds)
    return {"requests": len(results), "requests_per_s": len(results) / wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,  # summed over the concurrent streams
            "ttft_ms_median": 1000 * statistics.median(ttft), "ttft_ms_max": 1000 * ttft[-1],
            "latency_ms_median": 1000 * statistics.median(r["seconds"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.serve [options]`; returns the exit code."""
    p = Parser(prog="python -m benchmarks.serve", description="Tokens/s, requests/s and time to first token of ch07.serve, batched or not.")
    add_quick_argument(p, "tiny model, few requests (a smoke test)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="answer length cap in tokens (default 32; quick: 8)")
    p.add_argument("--requests", type=positive_int, default=None,
                   help="requests per round, at least one per client (default 4; quick: 4)")
    p.add_argument("--clients", type=positive_int, nargs="+", default=[1, 4, 8, 16],
                   help="concurrent clients (streams) per round (default 1 4 8 16)")
    p.add_argument("--max-batch-size", type=positive_int, nargs="+", default=[1, DEFAULT_MAX_BATCH_SIZE],
                   help="one server for each: its --max-batch-size (default 1, one request at a time, and "
                        f"{DEFAULT_MAX_BATCH_SIZE}, the server's default)")
    p.add_argument("--rounds", type=positive_int, default=1, help="interleaved rounds of each measurement")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads, on both sides (default 1: steadier on a shared machine)")
    p.add_argument("--onednn", action="store_true",
                   help="both sides compute float32 linear layers with oneDNN (the server's --onednn; x86 CPUs)")
    p.add_argument("--out", type=path_argument, default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.out is not None and args.out.is_dir():
        p.error(f"argument --out: {args.out} is a folder; give a file name, e.g. {args.out / 'serve.json'}")
    return run(lambda: benchmark(args))


def benchmark(args: argparse.Namespace) -> None:
    from llmfs.onednn_linear import check_onednn, onednn_linear

    check_onednn(args.onednn)
    with onednn_linear(args.onednn, min_rows=ONEDNN_MIN_ROWS):  # the direct side as the servers with --onednn
        measure(args)


def measure(args: argparse.Namespace) -> None:
    from ch07.cli import load_chat_model
    from llmfs.chat import parse_options

    if args.out is not None:
        check_output_dir(args.out.parent, option="--out")  # before minutes of measuring
    tokens = args.max_new_tokens or (8 if args.quick else 32)
    requests = args.requests or 4
    cfg = QUICK_CONFIG if args.quick else {**GPT_CONFIG_124M, "drop_rate": 0.0}
    if tokens > cfg["context_length"]:  # the server would answer 400 (its ceiling is the context)
        raise InvalidInput(f"--max-new-tokens {tokens} is more than the {cfg['context_length']}-token context of the "
                           f"{'tiny' if args.quick else 'GPT-2 124M-shaped'} model; give at most {cfg['context_length']}")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(123)
        model_path = Path(tmp) / "model.pth"
        save_model(GPTModel(cfg), model_path)
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        chat = load_chat_model(model_path, device="cpu")
        # The same options served (Ollama's names on the wire) and direct: what the server makes of them.
        payload = {"model": "bench", "prompt": PROMPT, "options": {"temperature": 0, "num_predict": tokens}}
        options = parse_options(payload["options"])
        servers = {}
        try:
            for size in args.max_batch_size:
                servers[size] = start_server(model_path, args.threads, size, args.onednn)
            for _, host in servers.values():
                served_round(host, payload, 1, 1)  # warm-up, every side
            direct_round(chat, options, 1)
            batched = [c for c in args.clients if c > 1]  # the direct batched baseline: one batch of c
            rounds = {"direct": [], **{f"direct b{c} x{c}": [] for c in batched},
                      **{f"served b{b} x{c}": [] for b in servers for c in args.clients}}
            for _ in range(args.rounds):
                rounds["direct"].append(direct_round(chat, options, requests))
                for c in batched:
                    rounds[f"direct b{c} x{c}"].append(direct_batched_round(chat, options, max(requests, c), c))
                for b, (_, host) in servers.items():
                    for c in args.clients:
                        rounds[f"served b{b} x{c}"].append(served_round(host, payload, max(requests, c), c))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    texts = {r["text"] for rnds in rounds.values() for rnd in rnds for r in rnd["results"]}
    if len(texts) != 1:
        raise RuntimeError(f"greedy answers differ between runs (batched or not, they must not): {texts}")
    summary = {name: summarize(rnds) for name, rnds in rounds.items()}
    machine = machine_description()
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores, torch {machine['torch']}, "
          f"{args.threads} threads{', oneDNN linear layers' if args.onednn else ''}); "
          f"model: {'tiny' if args.quick else 'GPT-2 124M shape'}, prompt {len(chat.encode(PROMPT))} tokens, "
          f"{tokens} new tokens, greedy\n")
    print("| how | max batch | clients | requests | tokens/s | vs direct | requests/s "
          "| time to first token, median (max) | latency, median |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = summary["direct"]["tokens_per_s"]
    for name, s in summary.items():
        batch, clients = name.split(" ")[1:] if " " in name else ("-", "-")
        print(f"| {name.split(' ')[0]} | {batch.lstrip('b')} | {clients.lstrip('x')} | {s['requests']} | "
              f"{s['tokens_per_s']:.1f} | {s['tokens_per_s'] / base:.2f}x | {s['requests_per_s']:.2f} | "
              f"{s['ttft_ms_median']:.1f} ({s['ttft_ms_max']:.1f}) ms | {s['latency_ms_median']:.0f} ms |")
    for b in servers:
        one, many = summary.get(f"served b{b} x1"), summary.get(f"served b{b} x8")
        if b > 1 and one and many:
            print(f"\n8 streams with --max-batch-size {b}: {many['tokens_per_s'] / one['tokens_per_s']:.2f}x the "
                  "tokens/s of one stream (the goal: at least 4x); every answer equals the direct call's")
    if args.out:
        report = {"machine": machine, "tokens": tokens, "threads": args.threads, "onednn": args.onednn,
                  "max_batch_sizes": args.max_batch_size, "summary": summary}
        with atomic_write(args.out) as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
