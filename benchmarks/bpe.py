"""Benchmark the BPE tokenizer of ch02/bpe/bpe.py: training against Hugging Face `tokenizers` and the book's
naive trainer, encoding and loading against tiktoken, `tokenizers` and `transformers`, all in one run.

    python -m benchmarks.bpe            # tinyshakespeare, 1,000- and 5,000-token vocabularies (1-2 minutes)
    python -m benchmarks.bpe --quick    # a slice of it and small vocabularies: a smoke test of the harness

Training: ours (`BPETokenizerSimple.train`) and Hugging Face's byte-level `BpeTrainer` on the whole
corpus, same vocabulary size (special token included), in rounds (ours, HF, ours, HF, ...) so that a busy
minute hits both; the fastest round counts. The naive trainer (`ch02.bpe.bpe.train_naive`, which recounts
every pair for every merge) would take many minutes on the whole corpus, so it runs once on its first
`--naive-chars` characters, next to ours on the same slice; both must learn the same merges.

Encoding: GPT-2's ranks, the whole corpus, ours with an empty word cache (a fresh tokenizer) and with a
warm one, tiktoken, Hugging Face's tokenizer loaded from our `to_hf_tokenizer` export, and `transformers`'
`GPT2Tokenizer` loaded from GPT-2's vocab.json and merges.txt (written from the ranks by
`write_vocab_and_merges`); then the corpus as a list of paragraphs through the batch encoders, which use
several threads. All must give identical ids.

Loading: each of the GPT-2 tokenizers (and `transformers`' AutoTokenizer) in a fresh process, in rounds:
the time to import its library, the time to build it from its files and encode one sentence, the modules
imported, and how much the process's resident memory grew (now and at its peak), read from /proc on Linux.
A fresh process, because in this one the libraries are imported already and the memory is shared.

Writes results.md and results.json into --out and prints whether the goals are met. The ch02 bonus notebook
ch02/bpe/compare-bpe-implementations.ipynb explains the differences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
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
FULL = {"vocab_sizes": [1000, 5000], "naive": [(1000, 50_000)], "rounds": 3, "corpus_chars": None,
        "load_rounds": 3}
QUICK = {"vocab_sizes": [300, 400], "naive": [(300, 5_000)], "rounds": 1, "corpus_chars": 30_000, "load_rounds": 1}
REPO = Path(__file__).resolve().parents[1]
SAMPLE = f"Hello, do you like tea? {END_OF_TEXT} In the sunlit terraces of someunknownPlace."  # the book's 2.5


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


# --- GPT-2's Hugging Face files, written from the ranks (the same code as in the ch02 bonus notebook
# compare-bpe-implementations.ipynb, which explains it; tests/test_ch02_bpe_compare.py checks they agree) ---

def last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens whose merge made `token`: encode its bytes with the merges of lower rank only.

    A rank file stores each token's rank, the order in which training learned it. Replaying the
    merges of lower rank on the token's bytes (lowest rank first, leftmost on a tie, as `bpe_word`
    does) stops one merge short of the token: at the two parts that its own merge joined.
    """
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        rank, i = min((ranks.get(parts[i] + parts[i + 1], sys.maxsize), i) for i in range(len(parts) - 1))
        if rank >= ranks[token]:
            raise ValueError(f"{token!r} is not the merge of two tokens of lower rank")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def write_vocab_and_merges(tokenizer: BPETokenizerSimple, folder: Path) -> Path:
    """Write the files of GPT-2's Hugging Face folder (vocab.json, merges.txt and a tokenizer_config.json
    naming the class) for a tokenizer with ranks loaded; `transformers.GPT2Tokenizer.from_pretrained(folder)`
    and `AutoTokenizer.from_pretrained(folder)` then load it offline."""
    to_char = bytes_to_unicode()  # " the" -> "Ġthe": printable tokens without spaces
    ranks = tokenizer.inverse_vocab

    def printable(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {printable(token): rank for token, rank in ranks.items()} | tokenizer.special_tokens
    merges = [" ".join(map(printable, last_merge(token, ranks)))
              for token, _ in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}), encoding="utf-8")
    return folder


def write_tokenizer_files(folder: Path) -> dict[str, Path]:
    """Our Hugging Face export of GPT-2 (tokenizer.json) and GPT-2's vocab.json + merges.txt, in `folder`."""
    gpt2 = gpt2_tokenizer()
    return {"tokenizer.json": gpt2.to_hf_tokenizer(folder / "gpt2-tokenizer.json"),
            "gpt2 folder": write_vocab_and_merges(gpt2, folder / "gpt2")}


# --- Loading, each tokenizer in a fresh process ------------------------------------------------------

# What each child imports, then how it builds the tokenizer (`folder`: write_tokenizer_files's) and
# encodes one text. The book's sample has <|endoftext|>: tiktoken and ours must be allowed to see it.
LOADERS = {
    "tiktoken": ("from ch02.tokenizer import get_gpt2_tokenizer",
                 "tok = get_gpt2_tokenizer()\n"
                 "encode = lambda text: tok.encode(text, allowed_special='all')"),
    "ours": ("from ch02.bpe.bpe import BPETokenizerSimple",
             "tok = BPETokenizerSimple()\ntok.load_tiktoken_ranks()\n"
             "encode = lambda text: tok.encode(text, allowed_special='all')"),
    "hf tokenizers": ("from tokenizers import Tokenizer",
                      "tok = Tokenizer.from_file(str(folder / 'gpt2-tokenizer.json'))\n"
                      "encode = lambda text: tok.encode(text).ids"),
    "transformers GPT2Tokenizer": ("from transformers import GPT2Tokenizer",
                                   "tok = GPT2Tokenizer.from_pretrained(folder / 'gpt2')\nencode = tok.encode"),
    "transformers AutoTokenizer": ("from transformers import AutoTokenizer",
                                   "tok = AutoTokenizer.from_pretrained(folder / 'gpt2')\nencode = tok.encode"),
}
READS = {"tiktoken": "ch02/gpt2.tiktoken (ranks, base64)", "ours": "ch02/gpt2.tiktoken (ranks, base64)",
         "hf tokenizers": "our `to_hf_tokenizer` export (tokenizer.json)",
         "transformers GPT2Tokenizer": "vocab.json + merges.txt", "transformers AutoTokenizer":
         "tokenizer_config.json, vocab.json + merges.txt"}

# The child: nothing imported but json, sys and time before its first reading. VmRSS is the resident
# memory now, VmHWM its peak (its own: a child's ru_maxrss would start at its parent's peak on Linux).
LOAD_CHILD = """\
import json
import sys
import time
from pathlib import Path


def status_mib(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


spec = json.loads(sys.argv[1])
folder = Path(spec["folder"])
modules, rss = set(sys.modules), status_mib("VmRSS")
t0 = time.perf_counter()
exec(spec["import"])
t1 = time.perf_counter()
exec(spec["load"])
ids = encode(spec["text"])
t2 = time.perf_counter()
print("RESULT " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "modules": len(set(sys.modules) - modules),
                              "torch": "torch" in sys.modules, "rss_mib": status_mib("VmRSS") - rss,
                              "peak_mib": status_mib("VmHWM") - rss, "ids": ids}))
"""


def load_in_fresh_process(name: str, folder: Path, text: str = SAMPLE) -> dict:
    """Run LOADERS[name] in a new Python process (in the repository, so `ch02` imports); its report."""
    imports, load = LOADERS[name]
    spec = {"folder": str(folder), "import": imports, "load": load, "text": text}
    proc = subprocess.run([sys.executable, "-c", LOAD_CHILD, json.dumps(spec)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"loading {name} in a fresh process failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def bench_loading(folder: Path, rounds: int) -> list[dict]:
    """Every loader `rounds` times in rounds (A B C A B C); the smallest time and memory of each."""
    expected = get_gpt2_tokenizer().encode(SAMPLE, allowed_special="all")
    runs: dict[str, list[dict]] = {name: [] for name in LOADERS}
    for r in range(rounds):
        for name in LOADERS:
            print(f"[load] {name}, round {r + 1}/{rounds}", flush=True)
            runs[name].append(load_in_fresh_process(name, folder))
    rows = []
    for name, done in runs.items():
        best = {key: min(run[key] for run in done) for key in ("import_s", "load_s", "rss_mib", "peak_mib")}
        rows.append({"name": name, "reads": READS[name], **best, "modules": done[0]["modules"],
                     "torch": done[0]["torch"], "same_ids": all(run["ids"] == expected for run in done),
                     "runs": [{k: v for k, v in run.items() if k != "ids"} for run in done]})
    return rows


# --- Encoding ---------------------------------------------------------------------------------------

def bench_encoding(text: str, rounds: int, files: dict[str, Path]) -> dict:
    from tokenizers import Tokenizer
    from transformers import GPT2Tokenizer

    hf = Tokenizer.from_file(str(files["tokenizer.json"]))
    hf_transformers = GPT2Tokenizer.from_pretrained(files["gpt2 folder"])
    tiktoken_gpt2 = get_gpt2_tokenizer()
    tenth = text[:len(text) // 10]
    paragraphs = text.split("\n\n")  # the batch encoders get a list; each text goes to one thread
    runs: dict[str, list[dict[str, float]]] = {
        "ours (empty cache)": [], "ours (empty cache, 1/10 of the text)": [], "ours (warm cache)": [],
        "tiktoken": [], "hf tokenizers": [], "transformers GPT2Tokenizer": [],
        "tiktoken encode_batch (paragraphs, threads)": [], "hf tokenizers encode_batch (paragraphs, threads)": [],
        "transformers batch call (paragraphs, threads)": []}
    ids, batch_ids = {}, {}
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
        seconds, ids["transformers"] = timed(lambda: hf_transformers.encode(text))
        runs["transformers GPT2Tokenizer"].append(seconds)
        seconds, batch_ids["tiktoken"] = timed(lambda: tiktoken_gpt2.encode_batch(paragraphs))
        runs["tiktoken encode_batch (paragraphs, threads)"].append(seconds)
        seconds, encodings = timed(lambda: hf.encode_batch(paragraphs))
        runs["hf tokenizers encode_batch (paragraphs, threads)"].append(seconds)
        batch_ids["hf"] = [e.ids for e in encodings]
        seconds, batch = timed(lambda: hf_transformers(paragraphs))
        runs["transformers batch call (paragraphs, threads)"].append(seconds)
        batch_ids["transformers"] = batch["input_ids"]
    batch_ids["ours"] = [fresh.encode(p) for p in paragraphs]  # not timed: the reference for the batches
    chars = {name: len(tenth) if "1/10" in name else len(text) for name in runs}
    same = {"hf tokenizers": ids["hf"] == ids["tiktoken"], "transformers": ids["transformers"] == ids["tiktoken"],
            "ours": ids["ours"] == ids["tiktoken"],
            "batches": all(batch_ids[name] == batch_ids["ours"] for name in ("tiktoken", "hf", "transformers"))}
    return {"chars": len(text), "tokens": len(ids["ours"]), "paragraphs": len(paragraphs), "runs": runs,
            "chars_per_cpu_s": {name: chars[name] / fastest(r)["cpu"] for name, r in runs.items()},
            "chars_per_wall_s": {name: chars[name] / fastest(r)["wall"] for name, r in runs.items()},
            "identical_ids_with_tiktoken": same, "identical_ids": all(same.values())}


def summarize(results: dict, machine: dict, quick: bool) -> tuple[str, list[tuple[str, bool]]]:
    corpus = results["corpus"]
    lines = ["# BPE tokenizer benchmark" + (" (quick smoke run)" if quick else ""), "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
             f"tokenizers {machine['tokenizers']}, tiktoken {machine['tiktoken']}, transformers "
             f"{machine['transformers']}, torch {machine['torch']}. Corpus: {corpus} "
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
    cps, cpw = e["chars_per_cpu_s"], e["chars_per_wall_s"]
    lines += ["", f"## Encoding with GPT-2's ranks ({e['chars']:,} characters, {e['tokens']:,} tokens)", "",
              f"The batch rows encode the same text as a list of its {e['paragraphs']:,} paragraphs, spread over "
              "threads: compare them by wall clock.", "",
              "| encoder | characters per CPU second | ratio vs tiktoken | characters per wall second "
              "| ratio vs tiktoken (wall) |", "|---|---:|---:|---:|---:|"]
    for name, value in cps.items():
        lines.append(f"| {name} | {value:,.0f} | {value / cps['tiktoken']:.2f}x | {cpw[name]:,.0f} | "
                     f"{cpw[name] / cpw['tiktoken']:.2f}x |")
    same = e["identical_ids_with_tiktoken"]
    lines.append("\nIdentical ids to tiktoken's: " + ", ".join(f"{name} {'yes' if ok else 'NO'}"
                                                             for name, ok in same.items()) + ".")
    goals.append(("encoding: identical ids from ours, tiktoken, HF tokenizers and transformers (whole text and "
                  "paragraphs)", e["identical_ids"]))
    full, tenth = cps["ours (empty cache)"], cps["ours (empty cache, 1/10 of the text)"]
    goals.append((f"encoding is not quadratic: the whole text at >= 0.5x the characters/s of a tenth "
                  f"({full / tenth:.2f}x)", full >= 0.5 * tenth))
    lines += ["", "## Loading (each in a fresh process)", "",
              "Import: the library's import. Load: building the tokenizer from its files and encoding the book's "
              "sample sentence. Memory: how much the process's resident memory (RSS, from /proc) grew over both, "
              "at the end and at its peak, against a process that has imported only `json`, `sys` and `time`. "
              f"Smallest of {machine['load_rounds']} rounds.", "",
              "| tokenizer | reads | import (s) | load (s) | modules imported | imports torch | RSS increase (MiB) "
              "| peak increase (MiB) | tiktoken's ids |", "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for r in results["load"]:
        lines.append(f"| {r['name']} | {r['reads']} | {r['import_s']:.2f} | {r['load_s']:.2f} | {r['modules']:,} | "
                     f"{'yes' if r['torch'] else 'no'} | {r['rss_mib']:,.1f} | {r['peak_mib']:,.1f} | "
                     f"{'yes' if r['same_ids'] else 'NO'} |")
    goals.append(("loading: every tokenizer, loaded in a fresh process, gives tiktoken's ids for the book's sample",
                  all(r["same_ids"] for r in results["load"])))
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
        import transformers

        check_output_dir(args.out, option="--out")
        text = get_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:plan["corpus_chars"]]
        machine = {**machine_description(), "tokenizers": tokenizers.__version__, "tiktoken": tiktoken.__version__,
                   "transformers": transformers.__version__, "rounds": plan["rounds"],
                   "load_rounds": plan["load_rounds"]}
        with tempfile.TemporaryDirectory() as tmp:
            files = write_tokenizer_files(Path(tmp))
            # Loading first: a process that has used HF's thread pool warns (and turns it off) when it forks.
            load = bench_loading(Path(tmp), plan["load_rounds"])
            results = {"corpus": "tinyshakespeare.txt" + (" (first characters)" if plan["corpus_chars"] else ""),
                       "corpus_chars": len(text),
                       "train": bench_training(text, plan["vocab_sizes"], plan["rounds"]),
                       "naive": bench_naive(text, plan["naive"], plan["rounds"]),
                       "encode": bench_encoding(text, plan["rounds"], files), "load": load}
        table, goals = summarize(results, machine, args.quick)
        write_report(args.out, "results.json", "results.md",
                     {"machine": machine, "quick": args.quick, "plan": plan, "results": results}, table, goals)

    return run(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
