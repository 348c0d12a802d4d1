"""Benchmark the corpus preparation of ch05/gutenberg/prepare_dataset.py against tokenizing with tiktoken alone.

    python -m benchmarks.prepare_corpus            # tinyshakespeare + the-verdict as ~60 documents, x16 (~18 MB)
    python -m benchmarks.prepare_corpus --quick    # a slice of it, twice: a smoke test of the harness

The corpus: tinyshakespeare split at blank lines into documents of about --doc-chars characters, and
the-verdict, each already in the form the preparation gives a document (blank lines collapsed, ends
stripped), written --repeat times into folders rep00/, rep01/, ... so that the prepared ids can be compared
with tiktoken's for each whole document.

Measured, in interleaved rounds (the fastest counts): `prepare` with 1 worker and with --workers workers
(reading, encoding detection, header stripping, tokenizing, writing shards and the manifest; the workers'
start-up included), and the baselines, tiktoken's `encode_ordinary` on each document in one process and
`encode_ordinary_batch` over all documents with --workers threads (the files read first, not timed:
tiktoken alone). Throughput in MB of text and in tokens per wall-clock second. The machine's other load
changes the figures; the CPU model is named beside them.

Writes results.md and results.json into --out and prints whether the goals are met.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ch02.tokenizer import get_gpt2_tokenizer
from ch05.gutenberg.prepare_dataset import EOT_ID, prepare
from llmfs.download import get_data_file

# llmfs.bench and llmfs.cli import PyTorch: imported in main(), since every worker process that `prepare`
# spawns imports this module (the main module) again, and would pay seconds of start-up for it.

FULL = {"repeat": 16, "rounds": 3, "doc_chars": 20_000, "corpus_chars": None}
QUICK = {"repeat": 2, "rounds": 1, "doc_chars": 5_000, "corpus_chars": 20_000}


def normalized(text: str) -> str:
    """A document as the preparation gives it: the book's blank-line regex, ends stripped."""
    return re.sub(r"\n\s*\n", "\n\n", text).strip()


def make_documents(doc_chars: int, corpus_chars: int | None) -> list[str]:
    """tinyshakespeare in documents of about doc_chars characters (cut at blank lines), then the-verdict."""
    shakespeare = get_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:corpus_chars]
    verdict = get_data_file("the-verdict.txt").read_text(encoding="utf-8")[:corpus_chars]
    docs, current = [], []
    for paragraph in shakespeare.split("\n\n"):
        current.append(paragraph)
        if sum(len(p) for p in current) >= doc_chars:
            docs.append(normalized("\n\n".join(current)))
            current = []
    if current:
        docs.append(normalized("\n\n".join(current)))
    return [d for d in [*docs, normalized(verdict)] if d]


def write_corpus(folder: Path, docs: list[str], repeat: int) -> list[Path]:
    """Write the documents `repeat` times; return the files in the order the preparation reads them."""
    files = []
    for r in range(repeat):
        for i, doc in enumerate(docs):
            path = folder / f"rep{r:02d}" / f"doc{i:04d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(doc, encoding="utf-8")
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def timed(fn) -> tuple[dict[str, float], object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}, result


def bench(plan: dict, workers: int) -> dict:
    enc = get_gpt2_tokenizer()
    docs = make_documents(plan["doc_chars"], plan["corpus_chars"])
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        files = write_corpus(corpus, docs, plan["repeat"])
        texts = [p.read_text(encoding="utf-8") for p in files]  # for the baselines, read before timing
        mb = sum(p.stat().st_size for p in files) / 1e6
        names = ["prepare, 1 worker", f"prepare, {workers} workers", "tiktoken encode_ordinary, 1 process",
                 f"tiktoken encode_ordinary_batch, {workers} threads"]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        tokens: dict[str, int] = {}
        same = {}
        for r in range(plan["rounds"]):
            print(f"[prepare_corpus] round {r + 1}/{plan['rounds']} ({mb:.1f} MB, {len(files)} files)", flush=True)
            for name, n in ((names[0], 1), (names[1], workers)):
                out = Path(tmp) / f"out-{n}"
                seconds, manifest = timed(lambda: prepare(corpus, out, workers=n, shard_tokens=1 << 22,
                                                          val_fraction=0.0, overwrite=True, progress=False))
                runs[name].append(seconds)
                ids = np.concatenate([np.fromfile(out / s["file"], dtype="<u2") for s in manifest["shards"]])
                tokens[name] = len(ids) - manifest["documents"]  # without the <|endoftext|> after each document
                same[name] = ids
            seconds, plain = timed(lambda: [enc.encode_ordinary(t) for t in texts])
            runs[names[2]].append(seconds)
            seconds, batch = timed(lambda: enc.encode_ordinary_batch(texts, num_threads=workers))
            runs[names[3]].append(seconds)
        tokens[names[2]] = sum(map(len, plain))
        tokens[names[3]] = sum(map(len, batch))
        expected = np.array([t for ids in plain for t in [*ids, EOT_ID]], dtype="<u2")
        identical = {name: bool(np.array_equal(same[name], expected)) for name in names[:2]}
        identical["encode_ordinary_batch"] = batch == plain
    best = {name: min(r["wall"] for r in rs) for name, rs in runs.items()}
    return {"mb": mb, "files": len(files), "documents": len(docs) * plan["repeat"], "runs": runs,
            "best_wall_s": best, "tokens": tokens, "mb_per_s": {n: mb / s for n, s in best.items()},
            "tokens_per_s": {n: tokens[n] / s for n, s in best.items()}, "identical_ids": identical,
            "names": names}


def summarize(results: dict, machine: dict, quick: bool, workers: int) -> tuple[str, list[tuple[str, bool]]]:
    names, mbs, tps = results["names"], results["mb_per_s"], results["tokens_per_s"]
    lines = ["# Corpus preparation benchmark" + (" (quick smoke run)" if quick else ""), "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores (shared with other work: the figures move with "
             f"its load), Python {machine['python']}, tiktoken {machine['tiktoken']}. Corpus: tinyshakespeare and "
             f"the-verdict as {results['documents']:,} documents in {results['files']:,} files, "
             f"{results['mb']:.1f} MB. Each figure: the fastest of {machine['rounds']} interleaved rounds, wall "
             "clock (all runs in results.json).", "",
             "| run | seconds | MB/s | tokens/s | ratio vs tiktoken, 1 process |", "|---|---:|---:|---:|---:|"]
    base = mbs[names[2]]
    for name in names:
        lines.append(f"| {name} | {results['best_wall_s'][name]:.2f} | {mbs[name]:.2f} | {tps[name]:,.0f} | "
                     f"{mbs[name] / base:.2f}x |")
    same = results["identical_ids"]
    lines.append("\nIdentical ids to tiktoken's on each whole document: "
                 + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in same.items()) + ".")
    one, many = mbs[names[0]], mbs[names[1]]
    goals = [("prepared ids identical to tiktoken's encode_ordinary of each whole document, with "
              f"<|endoftext|> after each ({', '.join(names[:2])})", all(same.values())),
             (f"preparing with 1 worker at >= 0.5x the throughput of tiktoken alone in one process "
              f"({one / base:.2f}x)", one >= 0.5 * base),
             (f"{workers} workers faster than 1 ({many / one:.2f}x; needs {workers} idle cores)", many > one)]
    lines += ["", "## Goals", ""] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in goals]
    return "\n".join(lines) + "\n", goals


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.prepare_corpus [options]`; returns the exit code."""
    from llmfs.bench import machine_description, write_report
    from llmfs.cli import (
        Parser,
        add_quick_argument,
        check_output_dir,
        path_argument,
        positive_int,
        run,
        whole_number,
    )

    p = Parser(prog="python -m benchmarks.prepare_corpus", description=__doc__.splitlines()[0])
    add_quick_argument(p, "a slice of the corpus, twice, one round")
    p.add_argument("--out", type=path_argument, default=Path(__file__).resolve().parent / "results" / "prepare_corpus",
                   help="folder for results.md and results.json (default benchmarks/results/prepare_corpus)")
    p.add_argument("--repeat", type=positive_int, default=None, help=f"copies of the corpus (default {FULL['repeat']})")
    p.add_argument("--rounds", type=positive_int, default=None, help=f"rounds (default {FULL['rounds']})")
    p.add_argument("--workers", type=whole_number(2), default=2,
                   help="workers and threads of the parallel runs (default 2)")
    args = p.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    plan.update({k: v for k, v in (("repeat", args.repeat), ("rounds", args.rounds)) if v is not None})

    def benchmark() -> None:
        import tiktoken

        check_output_dir(args.out, option="--out")
        machine = {**machine_description(), "tiktoken": tiktoken.__version__, "rounds": plan["rounds"]}
        results = bench(plan, args.workers)
        table, goals = summarize(results, machine, args.quick, args.workers)
        write_report(args.out, "results.json", "results.md",
                     {"machine": machine, "quick": args.quick, "plan": plan, "workers": args.workers,
                      "results": results}, table, goals)

    return run(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
