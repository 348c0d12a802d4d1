"""Benchmark training from memory-mapped shards (ch05/gutenberg/pretraining_simple.py) against training from memory.

    python -m benchmarks.pretrain_shards            # chapter 4's small model, 30 steps x 3 rounds
    python -m benchmarks.pretrain_shards --quick    # a tiny model, a few steps: a smoke test of the harness

The corpus: tinyshakespeare and the-verdict as documents (`benchmarks.prepare_corpus.make_documents`),
prepared into shards of --shard-tokens tokens. The same windows are read two ways: `ShardDataset` over the
shards' memory maps, and chapter 2's `GPTDatasetV1` over the same ids held in memory (every window stacked in
one tensor, as the book's loaders do). Both loaders shuffle with a generator of the same seed, so they give
the same batches; the same model (same seed) trains --steps steps on each with chapter 5's loss and AdamW, in
interleaved rounds (the fastest counts). Measured: training tokens/s (forward, backward, step, the batch
loading included) and the loaders alone (tokens/s read). The machine's other load moves the figures; the CPU
model is named beside them.

Writes results.md and results.json into --out and prints whether the goals are met.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.prepare_corpus import make_documents, write_corpus
from ch02.dataloader import GPTDatasetV1
from ch04.gpt import QUICK_CONFIG, GPTModel
from ch05.gpt_train import calc_loss_batch
from ch05.gutenberg.prepare_dataset import ShardSet, prepare
from ch05.gutenberg.pretraining_simple import ShardDataset
from llmfs.runtime import set_seed
from llmfs.trainer import make_optimizer

FULL = {"cfg": {**QUICK_CONFIG, "drop_rate": 0.1}, "batch_size": 8, "steps": 30, "rounds": 3, "doc_chars": 20_000,
        "corpus_chars": None, "shard_tokens": 50_000}
QUICK = {"cfg": {**QUICK_CONFIG, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 1},
         "batch_size": 4, "steps": 4, "rounds": 1, "doc_chars": 5_000, "corpus_chars": 20_000, "shard_tokens": 2_000}
NAMES = ("shards (memory-mapped)", "memory (GPTDatasetV1)")


class IdsTokenizer:
    """Hands GPTDatasetV1 ids already made (the shards' stream) as if it had tokenized a text."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids

    def encode(self, text, allowed_special=None) -> list[int]:
        return self.ids.tolist()


def loaders(shards: ShardSet, plan: dict, seed: int) -> dict[str, DataLoader]:
    """The two training loaders, shuffled by generators of the same seed: the same batches."""
    ctx, batch = plan["cfg"]["context_length"], plan["batch_size"]
    # create_dataloaders' training loader (without its val split: the benchmark prepares none)
    from_shards = DataLoader(ShardDataset(shards.memmaps("train"), ctx, ctx), batch_size=batch, shuffle=True,
                             drop_last=True, generator=torch.Generator().manual_seed(seed))
    ids = np.concatenate(shards.memmaps("train"))
    in_memory = GPTDatasetV1("", IdsTokenizer(ids), ctx, ctx)
    memory = DataLoader(in_memory, batch_size=batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    return {NAMES[0]: from_shards, NAMES[1]: memory}


def train_steps(loader: DataLoader, plan: dict, device: str, seed: int = 123) -> dict:
    """`steps` optimizer steps of a freshly seeded model; (seconds, losses, the batches' checksum)."""
    set_seed(seed)
    model = GPTModel(plan["cfg"]).to(device)
    optimizer = make_optimizer(model, 4e-4, 0.1)
    model.train()
    losses, checksum, batches = [], 0, iter(loader)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(plan["steps"]):
        inputs, targets = next(batches)
        checksum += int(inputs.sum()) + int(targets.sum())
        optimizer.zero_grad(set_to_none=True)
        loss = calc_loss_batch(inputs, targets, model, device)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # waits for the device: the step is done
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "losses": losses, "checksum": checksum}


def read_batches(loader: DataLoader, steps: int) -> float:
    """Seconds to read `steps` batches (the loader alone)."""
    start, batches = time.perf_counter(), iter(loader)
    for _ in range(steps):
        next(batches)
    return time.perf_counter() - start


def bench(plan: dict, device: str) -> dict:
    docs = make_documents(plan["doc_chars"], plan["corpus_chars"])
    tokens_per_step = plan["batch_size"] * plan["cfg"]["context_length"]
    runs = {name: [] for name in NAMES}
    reads = {name: [] for name in NAMES}
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(Path(tmp) / "corpus", docs, 1)
        manifest = prepare(Path(tmp) / "corpus", Path(tmp) / "shards", workers=1,
                           shard_tokens=plan["shard_tokens"], val_fraction=0.0, progress=False)
        shards = ShardSet(Path(tmp) / "shards")
        train_tokens = shards.num_tokens("train")
        for name in NAMES:  # a warm-up, not timed: the first run of a process pays one-time costs
            train_steps(loaders(shards, plan, seed=0)[name], {**plan, "steps": 2}, device)
        for r in range(plan["rounds"]):
            print(f"[pretrain_shards] round {r + 1}/{plan['rounds']} ({train_tokens:,} train tokens in "
                  f"{len(manifest['shards'])} shards, {plan['steps']} steps of {tokens_per_step:,} tokens)", flush=True)
            order = NAMES if r % 2 == 0 else NAMES[::-1]  # interleaved, alternating who goes first
            for name in order:
                runs[name].append(train_steps(loaders(shards, plan, seed=r)[name], plan, device))
                reads[name].append(read_batches(loaders(shards, plan, seed=r)[name], plan["steps"]))
        steps_per_epoch = len(loaders(shards, plan, seed=0)[NAMES[0]])
    best = {name: min(run["seconds"] for run in runs[name]) for name in NAMES}
    same_batches = all(a["checksum"] == b["checksum"] for a, b in zip(runs[NAMES[0]], runs[NAMES[1]], strict=True))
    same_losses = all(a["losses"] == b["losses"] for a, b in zip(runs[NAMES[0]], runs[NAMES[1]], strict=True))
    return {"names": list(NAMES), "train_tokens": train_tokens, "shards": len(manifest["shards"]),
            "steps_per_epoch": steps_per_epoch, "tokens_per_step": tokens_per_step, "runs": runs,
            "best_seconds": best,
            "tokens_per_s": {n: plan["steps"] * tokens_per_step / s for n, s in best.items()},
            "read_tokens_per_s": {n: plan["steps"] * tokens_per_step / min(reads[n]) for n in NAMES},
            "same_batches": same_batches, "same_losses": same_losses}


def summarize(results: dict, machine: dict, plan: dict, quick: bool, device: str) -> tuple[str, list]:
    tps, reads = results["tokens_per_s"], results["read_tokens_per_s"]
    cfg = plan["cfg"]
    lines = ["# Training from shards vs from memory" + (" (quick smoke run)" if quick else ""), "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores (shared with other work: the figures move with "
             f"its load), device {device}, PyTorch {machine['torch']}, {machine['threads']} threads. Model: GPTModel "
             f"(emb_dim {cfg['emb_dim']}, {cfg['n_layers']} layers, context {cfg['context_length']}), batch "
             f"{plan['batch_size']}, {plan['steps']} steps per run; corpus {results['train_tokens']:,} train tokens in "
             f"{results['shards']} shards. Each figure: the fastest of {plan['rounds']} interleaved rounds "
             "(all runs in results.json).", "",
             "| data | training tokens/s | ratio | loader alone, tokens/s |", "|---|---:|---:|---:|"]
    base = tps[NAMES[1]]
    for name in NAMES:
        lines.append(f"| {name} | {tps[name]:,.0f} | {tps[name] / base:.2f}x | {reads[name]:,.0f} |")
    ratio = tps[NAMES[0]] / base
    goals = [("the same batches from both (checksums) and the same losses, step by step",
              results["same_batches"] and results["same_losses"]),
             (f"training from shards at >= 0.95x the tokens/s of training from memory ({ratio:.2f}x)", ratio >= 0.95),
             (f"the shard loader alone reads >= 10x the tokens training consumes "
              f"({reads[NAMES[0]] / tps[NAMES[0]]:.0f}x)", reads[NAMES[0]] >= 10 * tps[NAMES[0]])]
    lines += ["", "## Goals", ""] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in goals]
    return "\n".join(lines) + "\n", goals


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.pretrain_shards [options]`; returns the exit code."""
    from llmfs.bench import machine_description, write_report
    from llmfs.cli import (
        Parser,
        add_quick_argument,
        check_output_dir,
        device_name,
        path_argument,
        positive_int,
        run,
    )

    p = Parser(prog="python -m benchmarks.pretrain_shards", description=__doc__.splitlines()[0])
    add_quick_argument(p, "a tiny model, a few steps, one round")
    p.add_argument("--out", type=path_argument, default=Path(__file__).resolve().parent / "results" / "pretrain_shards",
                   help="folder for results.md and results.json (default benchmarks/results/pretrain_shards)")
    p.add_argument("--steps", type=positive_int, default=None, help=f"steps per run (default {FULL['steps']})")
    p.add_argument("--rounds", type=positive_int, default=None, help=f"rounds (default {FULL['rounds']})")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu (default) or cuda")
    args = p.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    plan.update({k: v for k, v in (("steps", args.steps), ("rounds", args.rounds)) if v is not None})

    def benchmark() -> None:
        check_output_dir(args.out, option="--out")
        machine = machine_description()
        results = bench(plan, args.device)
        table, goals = summarize(results, machine, plan, args.quick, args.device)
        write_report(args.out, "results.json", "results.md",
                     {"machine": machine, "quick": args.quick, "plan": plan, "device": args.device,
                      "results": results}, table, goals)

    return run(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
