"""Benchmark the BPE tokenizer of ch02/bpe.py: training against Hugging Face `tokenizers` and the book's
naive trainer, encoding against tiktoken, all in one run.

    python -m benchmarks.bpe            # tinyshakespeare, 1,000- and 5,000-token vocabularies (~3 minutes)
    python -m benchmarks.bpe --quick    # a slice of it and small vocabularies: a smoke test of the harness

Training: ours (`BPETokenizerSimple.train`) and Hugging Face's byte-level `BpeTrainer` on the whole
corpus, same vocabulary size (special token included), in rounds (ours, HF, ours, HF, ...) so that a busy
minute hits both; the fastest round counts. The naive trainer (`ch02.bpe.train_naive`, which recounts
every pair for every merge) would take many minutes on the whole corpus, so it runs once on its first
`--naive-chars` characters, next to ours on the same slice; both must learn the same merges.

Encoding: GPT-2's ranks, the whole corpus, ours with an empty word cache (a fresh tokenizer) and with a
warm one, tiktoken, and Hugging Face's tokenizer loaded from our `to_hf_tokenizer` export; all must give
identical ids. Writes results.md and results.json into --out and prints whether the goals are met.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks.run import machine_description
from ch02.atomic import atomic_write
from ch02.bpe import BPETokenizerSimple, bytes_to_unicode, train_naive
from ch02.download import get_data_file
from ch02.tokenizer import END_OF_TEXT, get_gpt2_tokenizer

# naive: (vocab size, characters) for the naive trainer, whose time grows with merges x characters.
FULL = {"vocab_sizes": [1000, 5000], "naive": [(1000, 50_000), (5000, 20_000)], "rounds": 3, "corpus_chars": None}
QUICK = {"vocab_sizes": [300, 400], "naive": [(300, 5_000)], "rounds": 1, "corpus_chars": 30_000}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def train_ours(text: str, vocab_size: int) -> BPETokenizerSimple:
    tokenizer = BPETokenizerSimple()
    tokenizer.train(text, vocab_size, allowed_special={END_OF_TEXT})
    return tokenizer


def train_hf(text: str, vocab_size: int, parallel: bool) -> set[bytes]:
    """Hugging Face's byte-level BPE trainer, set up like ours; returns its vocabulary as bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"  # read at every call
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, as ours
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer)
    from_char = {c: b for b, c in bytes_to_unicode().items()}
    return {bytes(from_char[c] for c in token) for token in tokenizer.get_vocab() if token != END_OF_TEXT}


def bench_training(text: str, vocab_sizes: list[int], rounds: int) -> list[dict]:
    rows = []
    for size in vocab_sizes:
        times: dict[str, list[float]] = {"ours": [], "hf-1-thread": [], "hf-parallel": []}
        for r in range(rounds):
            print(f"[train] vocab {size}, round {r + 1}/{rounds}", flush=True)
            seconds, ours = timed(lambda: train_ours(text, size))
            times["ours"].append(seconds)
            seconds, hf_vocab = timed(lambda: train_hf(text, size, parallel=False))
            times["hf-1-thread"].append(seconds)
            times["hf-parallel"].append(timed(lambda: train_hf(text, size, parallel=True))[0])
        ours_vocab = set(ours.inverse_vocab)
        rows.append({"vocab_size": size, "chars": len(text), "seconds": {k: min(v) for k, v in times.items()},
                     "runs": times, "ours_vocab_size": len(ours.vocab), "hf_vocab_size": len(hf_vocab) + 1,
                     "shared_tokens": len(ours_vocab & hf_vocab)})
    return rows


def bench_naive(corpus: str, plan: list[tuple[int, int]], rounds: int) -> list[dict]:
    rows = []
    for size, chars in plan:
        text = corpus[:chars]
        print(f"[naive] vocab {size} on {len(text):,} characters (one run; this is the slow one)", flush=True)
        naive_s, naive_merges = timed(lambda: train_naive(text, size))
        ours_s, ours = min((timed(lambda: train_ours(text, size)) for _ in range(rounds)), key=lambda t: t[0])
        rows.append({"vocab_size": size, "chars": len(text), "naive_s": naive_s, "ours_s": ours_s,
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
    times: dict[str, list[float]] = {"ours (empty cache)": [], "ours (empty cache, 1/10 of the text)": [],
                                     "ours (warm cache)": [], "tiktoken": [], "hf tokenizers": []}
    ids = {}
    for r in range(rounds):
        print(f"[encode] round {r + 1}/{rounds}", flush=True)
        fresh = gpt2_tokenizer()  # an empty word cache
        seconds, ids["ours"] = timed(lambda: fresh.encode(text))
        times["ours (empty cache)"].append(seconds)
        seconds, _ = timed(lambda: fresh.encode(text))
        times["ours (warm cache)"].append(seconds)
        fresh = gpt2_tokenizer()
        times["ours (empty cache, 1/10 of the text)"].append(timed(lambda: fresh.encode(tenth))[0])
        seconds, ids["tiktoken"] = timed(lambda: tiktoken_gpt2.encode(text))
        times["tiktoken"].append(seconds)
        seconds, encoding = timed(lambda: hf.encode(text))
        times["hf tokenizers"].append(seconds)
        ids["hf"] = encoding.ids
    chars = {name: len(tenth) if "1/10" in name else len(text) for name in times}
    return {"chars": len(text), "tokens": len(ids["ours"]),
            "chars_per_s": {name: chars[name] / min(t) for name, t in times.items()}, "runs": times,
            "identical_ids": ids["ours"] == ids["tiktoken"] == ids["hf"]}


def summarize(results: dict, machine: dict, quick: bool) -> tuple[str, list[tuple[str, bool]]]:
    corpus = results["corpus"]
    lines = ["# BPE tokenizer benchmark" + (" (quick smoke run)" if quick else ""), "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
             f"tokenizers {machine['tokenizers']}, tiktoken {machine['tiktoken']}. Corpus: {corpus} "
             f"({results['corpus_chars']:,} characters). Each figure: the fastest of {machine['rounds']} "
             "interleaved rounds, unless noted.", "", "## Training", "",
             "| vocab size | ours (s) | HF 1 thread (s) | HF parallel (s) | ours / HF 1 thread | ours / HF parallel "
             "| tokens shared with HF |", "|---:|---:|---:|---:|---:|---:|---:|"]
    goals: list[tuple[str, bool]] = []
    for r in results["train"]:
        s = r["seconds"]
        lines.append(f"| {r['vocab_size']:,} | {s['ours']:.2f} | {s['hf-1-thread']:.2f} | {s['hf-parallel']:.2f} | "
                     f"{s['ours'] / s['hf-1-thread']:.2f}x | {s['ours'] / s['hf-parallel']:.2f}x | "
                     f"{r['shared_tokens']:,} of {r['ours_vocab_size'] - 1:,} |")
        hf_best = min(s["hf-1-thread"], s["hf-parallel"])
        goals.append((f"training to {r['vocab_size']:,} tokens within 10x of HF tokenizers "
                      f"({s['ours'] / hf_best:.2f}x its faster setting)", s["ours"] <= 10 * hf_best))
    lines += ["", "## Against the book's naive trainer (recounts every pair for every merge)", "",
              "The naive trainer runs once, on the first characters of the corpus only (the whole corpus would "
              "take many minutes); ours is timed on the same slice.", "",
              "| vocab size | characters | merges learned | naive (s) | ours (s) | speed-up | same merges |",
              "|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["naive"]:
        speedup = r["naive_s"] / r["ours_s"]
        lines.append(f"| {r['vocab_size']:,} | {r['chars']:,} | {r['merges']:,} | {r['naive_s']:.2f} | "
                     f"{r['ours_s']:.3f} | {speedup:,.0f}x | {'yes' if r['same_merges'] else 'NO'} |")
        goals.append((f"training to {r['vocab_size']:,} tokens >= 20x faster than naive ({speedup:,.0f}x)",
                      speedup >= 20))
        goals.append((f"naive and incremental trainers learn the same {r['merges']:,} merges", r["same_merges"]))
    e = results["encode"]
    lines += ["", f"## Encoding with GPT-2's ranks ({e['chars']:,} characters, {e['tokens']:,} tokens)", "",
              "| encoder | characters/s | ratio vs tiktoken |", "|---|---:|---:|"]
    for name, cps in e["chars_per_s"].items():
        lines.append(f"| {name} | {cps:,.0f} | {cps / e['chars_per_s']['tiktoken']:.2f}x |")
    lines.append(f"\nIdentical ids from ours, tiktoken and HF tokenizers: {'yes' if e['identical_ids'] else 'NO'}.")
    goals.append(("encoding: identical ids to tiktoken and to HF tokenizers", e["identical_ids"]))
    full, tenth = e["chars_per_s"]["ours (empty cache)"], e["chars_per_s"]["ours (empty cache, 1/10 of the text)"]
    goals.append((f"encoding is not quadratic: the whole text at >= 0.5x the characters/s of a tenth "
                  f"({full / tenth:.2f}x)", full >= 0.5 * tenth))
    lines += ["", "## Goals", ""] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in goals]
    return "\n".join(lines) + "\n", goals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a slice of the corpus, small vocabularies, one round")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bpe")
    p.add_argument("--naive-chars", type=int, default=None,
                   help="characters the naive trainer gets, for every vocabulary size (default: "
                        + ", ".join(f"{c:,} at {v:,} tokens" for v, c in FULL["naive"]) + ")")
    args = p.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.naive_chars is not None:
        if args.naive_chars < 1:
            p.error("--naive-chars must be >= 1")
        plan["naive"] = [(size, args.naive_chars) for size, _ in plan["naive"]]
    import tiktoken
    import tokenizers

    text = get_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:plan["corpus_chars"]]
    machine = {**machine_description(), "tokenizers": tokenizers.__version__, "tiktoken": tiktoken.__version__,
               "rounds": plan["rounds"]}
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"corpus": "tinyshakespeare.txt" + (" (first characters)" if plan["corpus_chars"] else ""),
               "corpus_chars": len(text),
               "train": bench_training(text, plan["vocab_sizes"], plan["rounds"]),
               "naive": bench_naive(text, plan["naive"], plan["rounds"]),
               "encode": bench_encoding(text, plan["rounds"], args.out)}
    with atomic_write(args.out / "results.json") as f:
        json.dump({"machine": machine, "quick": args.quick, "plan": plan, "results": results}, f, indent=1)
    table, goals = summarize(results, machine, args.quick)
    with atomic_write(args.out / "results.md") as f:
        f.write(table)
    print(table)
    print(f"{sum(ok for _, ok in goals)}/{len(goals)} goals met; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
