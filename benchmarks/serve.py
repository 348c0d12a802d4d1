"""Benchmark `ch07.serve`: requests per second and time to first token, against the model called directly.

    python -m benchmarks.serve            # GPT-2 124M shape, random weights (no download), 2-4 minutes
    python -m benchmarks.serve --quick    # a tiny model: a smoke test of the harness

The server runs as `python -m ch07.serve` in its own process; clients stream /api/generate
with httpx (greedy, a fixed prompt and answer length). The reference is the same generation
run in this process through `llmfs.chat` with no HTTP at all, measured in the same run and
interleaved with the served rounds, so a busy machine slows both alike. Concurrent clients
queue on the server's one model, so requests/s stays about the same while the time to first
token grows with the queue.
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

PROMPT = "Every effort moves you"
QUICK_CONFIG = {**TINY_CONFIG, "vocab_size": 50257, "drop_rate": 0.0}  # the GPT-2 tokenizer's ids must fit


def start_server(model_path: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """`python -m ch07.serve` on a free port; returns the process and its base URL once it answers."""
    import os

    env = {**os.environ, "LLMFS_DEVICE": "cpu", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "ch07.serve", "--model", str(model_path), "--port", "0",
                             "--name", "bench"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    line = proc.stderr.readline()
    while "OLLAMA_HOST=" not in line:
        if not line:
            raise RuntimeError(f"the server did not start: {proc.stderr.read()[-2000:]}")
        line = proc.stderr.readline()
    # Keep reading its log so a full pipe never blocks the server.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, "http://" + re.search(r"OLLAMA_HOST=(\S+)", line).group(1)


def served_request(client: httpx.Client, payload: dict) -> dict:
    """One streamed request: seconds to the first chunk with text and to the end, and the text."""
    start = time.perf_counter()
    first, text = None, []
    with client.stream("POST", "/api/generate", json=payload) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            chunk = json.loads(line)
            if chunk.get("response") and first is None:
                first = time.perf_counter() - start
            text.append(chunk.get("response", ""))
    return {"ttft": first, "seconds": time.perf_counter() - start, "text": "".join(text)}


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
        for piece in chat.generation(ids, options):
            if piece and first is None:
                first = time.perf_counter() - t0
            text.append(piece)
        results.append({"ttft": first, "seconds": time.perf_counter() - t0, "text": "".join(text)})
    return {"wall": time.perf_counter() - start, "results": results}


def summarize(rounds: list[dict]) -> dict:
    results = [r for rnd in rounds for r in rnd["results"]]
    ttft = sorted(r["ttft"] for r in results)
    return {"requests": len(results), "requests_per_s": len(results) / sum(rnd["wall"] for rnd in rounds),
            "ttft_ms_median": 1000 * statistics.median(ttft), "ttft_ms_max": 1000 * ttft[-1],
            "latency_ms_median": 1000 * statistics.median(r["seconds"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.serve [options]`; returns the exit code."""
    p = Parser(prog="python -m benchmarks.serve", description="Requests/s and time to first token of ch07.serve.")
    add_quick_argument(p, "tiny model, few requests (a smoke test)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="answer length cap in tokens (default 32; quick: 8)")
    p.add_argument("--requests", type=positive_int, default=None,
                   help="requests per round, at least one per client (default 4; quick: 4)")
    p.add_argument("--clients", type=positive_int, nargs="+", default=[1, 4, 16], help="concurrent clients per round")
    p.add_argument("--rounds", type=positive_int, default=1, help="interleaved rounds of each measurement")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads, on both sides (default 1: steadier on a shared machine)")
    p.add_argument("--out", type=path_argument, default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.out is not None and args.out.is_dir():
        p.error(f"argument --out: {args.out} is a folder; give a file name, e.g. {args.out / 'serve.json'}")
    return run(lambda: benchmark(args))


def benchmark(args: argparse.Namespace) -> None:
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
        proc, host = start_server(model_path, args.threads)
        try:
            served_round(host, payload, 1, 1)  # warm-up, both sides
            direct_round(chat, options, 1)
            rounds = {"direct": [], **{f"served x{c}": [] for c in args.clients}}
            for _ in range(args.rounds):
                rounds["direct"].append(direct_round(chat, options, requests))
                for c in args.clients:
                    rounds[f"served x{c}"].append(served_round(host, payload, max(requests, c), c))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    texts = {r["text"] for rnds in rounds.values() for rnd in rnds for r in rnd["results"]}
    if len(texts) != 1:
        raise RuntimeError(f"greedy answers differ between runs: {texts}")
    summary = {name: summarize(rnds) for name, rnds in rounds.items()}
    machine = machine_description()
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores, torch {machine['torch']}, "
          f"{args.threads} threads); "
          f"model: {'tiny' if args.quick else 'GPT-2 124M shape'}, prompt {len(chat.encode(PROMPT))} tokens, "
          f"{tokens} new tokens, greedy\n")
    print("| how | clients | requests | requests/s | vs direct | time to first token, median (max) "
          "| latency, median |")
    print("|---|---|---|---|---|---|---|")
    base = summary["direct"]["requests_per_s"]
    for name, s in summary.items():
        clients = name.split("x")[-1] if name.startswith("served") else "-"
        print(f"| {name.split(' ')[0]} | {clients} | {s['requests']} | {s['requests_per_s']:.2f} | "
              f"{s['requests_per_s'] / base:.2f}x | {s['ttft_ms_median']:.1f} ({s['ttft_ms_max']:.1f}) ms | "
              f"{s['latency_ms_median']:.0f} ms |")
    if args.out:
        report = {"machine": machine, "tokens": tokens, "threads": args.threads, "summary": summary}
        with atomic_write(args.out) as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
