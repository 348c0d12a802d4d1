"""Benchmark the BPE tokenizer of ch02/bpe/bpe.py: training against Hugging Face `tokenizers` and the book's
naive trainer, encoding against tiktoken, all in one run.

    python -m benchmarks.bpe            # tinyshakespeare, 1,000- and 5,000-token vocabularies (~2 minutes)
    python -m benchmarks.bpe --quick    # a slice of it and small vocabularies: a smoke test of the harness

Training: ours (`BPETokenizerSimple.train`) and Hugging Face's byte-level `BpeTrainer` on the whole
corpus, same vocabulary size (special token included), in rounds (ours, HF, ours, HF, ...) so that a busy
minute hits both; the fastest round counts. The naive trainer (`ch02.bpe.bpe.train_naive`, which recounts
every pair for every merge) would take many minutes on the whole corpus, so it runs once on its first
`--naive-chars` characters, next to ours on the same slice; both must learn the same merges.

Encoding: GPT-2's ranks, the whole corpus, ours with an empty word cache (a fresh tokenizer) and with a
warm one, tiktoken, and Hugging Face's tokenizer loaded from our `to_hf_tokenizer` export; all must give
identical ids. Writes results.md and results.json into --out and prints whether the goals are met.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

from ch02.bpe.bpe import BPETokenizerSimple, bytes_to_unicode, train_naive
from ch02.tokenizer import END_OF_TEXT, get_gpt2_tokenizer
from llmfs.bench import machine_description, write_report
from llmfs.cli import Parser, add_quick_argument, check_output_dir, path_argument, positive_int, run
from llmfs.download import get_data_file

# naive: (vocab size, characters) for the naive trainer, whose time grows with merges x characters.
# At 5,000 tokens the naive trainer would need minutes even on a slice (201 s for 4,176 merges on 50,000
# characters in a trial, ours 0.18 s), so it runs at 1,000 tokens only.
FULL = {"vocab_sizes": [1000, 5000], "naive": [(1000, 50_000)], "rounds": 3, "corpus_chars": None}
QUICK = {"vocab_sizes": [300, 400], "naive": [(300, 5_000)], "rounds": 1, "corpus_chars": 30_000}


def timed(fn: Callable[[], object]) -> tuple[dict[str, float], object]:
    """Run fn; return its wall-clock and CPU seconds (this process, all threads) and its result.

    CPU time is what a single-threaded run costs whatever else the machine is doing, so the ratios
    between single-threaded runs use it; a multi-threaded run (HF parallel) is compared by wall clock.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}, result


def fastest(runs: list[dict[str, float]]) -> dict[str, float]:
    return {"wall": min(r["wall"] for r in runs), "cpu": min(r["cpu"] for r in runs)}


def train_ours(text: str, vocab_size: int) -> BPETokenizerSimple:
    tokenizer = BPETokenizerSimple()
    tokenizer.train(text, vocab_size, allowed_special={END_OF_TEXT})
    return tokenizer


def train_hf(text: str, vocab_size: int, parallel: bool) -> set[bytes]:
    """Hugging Face's byte-level BPE trainer, set up like ours; returns its vocabulary as bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, as ours
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"  # read at every call
    try:
        tokenizer.train_from_iterator([text], trainer)
    finally:  # only for this measurement
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    from_char = {c: b for b, c in bytes_to_unicode().items()}
    return {bytes(from_char[c] for c in token) for token in tokenizer.get_vocab() if token != END_OF_TEXT}


def bench_training(text: str, vocab_sizes: list[int], rounds: int) -> list[dict]:
    rows = []
    for size in vocab_sizes:
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "hf-1-thread": [], "hf-parallel": []}
        for r in range(rounds):
            print(f"[train] vocab {size}, round {r + 1}/{rounds}", flush=True)
            seconds, ours = timed(lambda: train_ours(text, size))
            runs["ours"].append(seconds)
            seconds, hf_vocab = timed(lambda: train_hf(text, size, parallel=False))
            runs["hf-1-thread"].append(seconds)
            runs["hf-parallel"].append(timed(lambda: train_hf(text, size, parallel=True))[0])
        ours_vocab = set(ours.inverse_vocab)
        rows.append({"vocab_size": size, "chars": len(text), "seconds": {k: fastest(v) for k, v in runs.items()},
                     "runs": runs, "ours_vocab_size": len(ours.vocab), "hf_vocab_size": len(hf_vocab) + 1,
                     "shared_tokens": len(ours_vocab & hf_vocab)})
    return rows


def bench_naive(corpus: str, plan: list[tuple[int, int]], rounds: int) -> list[dict]:
    rows = []
    for size, chars in plan:
        text = corpus[:chars]
        print(f"[naive] vocab {size} on {len(text):,} characters (one run; this is the slow one)", flush=True)
        naive, naive_merges = timed(lambda: train_naive(text, size))
        runs = []
        for _ in range(rounds):
            seconds, ours = timed(lambda: train_ours(text, size))
            runs.append(seconds)
        rows.append({"vocab_size": size, "chars": len(text), "naive": naive, "ours": fastest(runs),
                     "same_merges": naive_merges == ours.bpe_merges, "merges": len(ours.bpe_merges)})
    return rows


def gpt2_tokenizer() -> BPETokenizerSimple:
    tokenizer = BPETokenizerSimple()
    tokenizer.load_tiktoken_ranks()
    return tokenizer


def bench_encoding(text: str, rounds: int, tmp_dir: Path) -> dict:
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(gpt2_tokenizer().to_hf_tokenizer(tmp_dir / "gpt2-tokenizer.json")))
    tiktoken_gpt2 = get_gpt2_tokenizer()
    tenth = text[:len(text) // 10]
    runs: dict[str, list[dict[str, float]]] = {
        "ours (empty cache)": [], "ours (empty cache, 1/10 of the text)": [], "ours (warm cache)": [],
        "tiktoken": [], "hf tokenizers": []}
    ids = {}
    for r in range(rounds):
        print(f"[encode] round {r + 1}/{rounds}", flush=True)
        fresh = gpt2_tokenizer()  # an empty word cache
        seconds, ids["ours"] = timed(lambda: fresh.encode(text))
        runs["ours (empty cache)"].append(seconds)
        runs["ours (warm cache)"].append(timed(lambda: fresh.encode(text))[0])
        fresh = gpt2_tokenizer()
        runs["ours (empty cache, 1/10 of the text)"].append(timed(lambda: fresh.encode(tenth))[0])
        seconds, ids["tiktoken"] = timed(lambda: tiktoken_gpt2.encode(text))
        runs["tiktoken"].append(seconds)
        seconds, encoding = timed(lambda: hf.encode(text))
        runs["hf tokenizers"].append(seconds)
        ids["hf"] = encoding.ids
    chars = {name: len(tenth) if "1/10" in name else len(text) for name in runs}
    return {"chars": len(text), "tokens": len(ids["ours"]), "runs": runs,
            "chars_per_cpu_s": {name: chars[name] / fastest(r)["cpu"] for name, r in runs.items()},
            "chars_per_wall_s": {name: chars[name] / fastest(r)["wall"] for name, r in runs.items()},
            "identical_ids": ids["ours"] == ids["tiktoken"] == ids["hf"]}


def summarize(results: dict, machine: dict, quick: bool) -> tuple[str, list[tuple[str, bool]]]:
    corpus = results["corpus"]
    lines = ["# BPE tokenizer benchmark" + (" (quick smoke run)" if quick else ""), "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
             f"tokenizers {machine['tokenizers']}, tiktoken {machine['tiktoken']}. Corpus: {corpus} "
             f"({results['corpus_chars']:,} characters). Each figure: the fastest of {machine['rounds']} "
             "interleaved rounds, unless noted. *CPU s* is the process's CPU time, which other work on a shared "
             "machine hardly changes: single-threaded runs are compared by it; HF's parallel trainer by wall "
             "clock (all runs, wall and CPU, in results.json).", "", "## Training", "",
             "| vocab size | ours (CPU s) | HF 1 thread (CPU s) | ours / HF 1 thread | ours (wall s) "
             "| HF parallel (wall s) | ours / HF parallel | tokens shared with HF |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    goals: list[tuple[str, bool]] = []
    for r in results["train"]:
        ours, hf1, hfp = r["seconds"]["ours"], r["seconds"]["hf-1-thread"], r["seconds"]["hf-parallel"]
        one, par = ours["cpu"] / hf1["cpu"], ours["wall"] / hfp["wall"]
        lines.append(f"| {r['vocab_size']:,} | {ours['cpu']:.2f} | {hf1['cpu']:.2f} | {one:.2f}x | "
                     f"{ours['wall']:.2f} | {hfp['wall']:.2f} | {par:.2f}x | "
                     f"{r['shared_tokens']:,} of {r['ours_vocab_size'] - 1:,} |")
        goals.append((f"training to {r['vocab_size']:,} tokens within 10x of HF tokenizers "
                      f"({one:.2f}x its one-thread CPU time, {par:.2f}x its parallel wall time)",
                      one <= 10 and par <= 10))
    lines += ["", "## Against the book's naive trainer (recounts every pair for every merge)", "",
              "The naive trainer runs once, on the first characters of the corpus only (the whole corpus would "
              "take many minutes); ours is timed on the same slice.", "",
              "| vocab size | characters | merges learned | naive (CPU s) | ours (CPU s) | speed-up | same merges |",
              "|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["naive"]:
        speedup = r["naive"]["cpu"] / r["ours"]["cpu"]
        lines.append(f"| {r['vocab_size']:,} | {r['chars']:,} | {r['merges']:,} | {r['naive']['cpu']:.2f} | "
                     f"{r['ours']['cpu']:.3f} | {speedup:,.0f}x | {'yes' if r['same_merges'] else 'NO'} |")
        goals.append((f"training to {r['vocab_size']:,} tokens >= 20x faster than naive ({speedup:,.0f}x)",
                      speedup >= 20))
        goals.append((f"naive and incremental trainers learn the same {r['merges']:,} merges", r["same_merges"]))
    e = results["encode"]
    cps = e["chars_per_cpu_s"]
    lines += ["", f"## Encoding with GPT-2's ranks ({e['chars']:,} characters, {e['tokens']:,} tokens)", "",
              "| encoder | characters per CPU second | ratio vs tiktoken |", "|---|---:|---:|"]
    for name, value in cps.items():
        lines.append(f"| {name} | {value:,.0f} | {value / cps['tiktoken']:.2f}x |")
    lines.append(f"\nIdentical ids from ours, tiktoken and HF tokenizers: {'yes' if e['identical_ids'] else 'NO'}.")
    goals.append(("encoding: identical ids to tiktoken and to HF tokenizers", e["identical_ids"]))
    full, tenth = cps["ours (empty cache)"], cps["ours (empty cache, 1/10 of the text)"]
    goals.append((f"encoding is not quadratic: the whole text at >= 0.5x the characters/s of a tenth "
                  f"({full / tenth:.2f}x)", full >= 0.5 * tenth))
    lines += ["", "## Goals", ""] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in goals]
    return "\n".join(lines) + "\n", goals


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.bpe [options]`; returns the exit code."""
    p = Parser(prog="python -m benchmarks.bpe", description=__doc__.splitlines()[0])
    add_quick_argument(p, "a slice of the corpus, small vocabularies, one round")
    p.add_argument("--out", type=path_argument, default=Path(__file__).resolve().parent / "results" / "bpe",
                   help="folder for results.md and results.json (default benchmarks/results/bpe)")
    p.add_argument("--naive-chars", type=positive_int, default=None,
                   help="characters the naive trainer gets, for every vocabulary size (default: "
                        + ", ".join(f"{c:,} at {v:,} tokens" for v, c in FULL["naive"]) + ")")
    args = p.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.naive_chars is not None:
        plan["naive"] = [(size, args.naive_chars) for size, _ in plan["naive"]]

    def benchmark() -> None:
        import tiktoken
        import tokenizers

        check_output_dir(args.out, option="--out")
        text = get_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:plan["corpus_chars"]]
        machine = {**machine_description(), "tokenizers": tokenizers.__version__, "tiktoken": tiktoken.__version__,
                   "rounds": plan["rounds"]}
        results = {"corpus": "tinyshakespeare.txt" + (" (first characters)" if plan["corpus_chars"] else ""),
                   "corpus_chars": len(text),
                   "train": bench_training(text, plan["vocab_sizes"], plan["rounds"]),
                   "naive": bench_naive(text, plan["naive"], plan["rounds"]),
                   "encode": bench_encoding(text, plan["rounds"], args.out)}
        table, goals = summarize(results, machine, args.quick)
        write_report(args.out, "results.json", "results.md",
                     {"machine": machine, "quick": args.quick, "plan": plan, "results": results}, table, goals)

    return run(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
