"""Benchmark LoRA fine-tuning steps of a Qwen3-0.6B-shaped model on the CPU, with and without gradient checkpointing.

    python -m benchmarks.lora_finetune            # Qwen3-0.6B shapes (random weights), 2 threads: ~5 minutes idle
    python -m benchmarks.lora_finetune --quick    # tiny config, a smoke test of the harness (seconds)

What `python -m ch07.gpt_instruction_finetuning --model <Qwen3-0.6B folder> --lora-rank 16` does per step:
our `Qwen3Model` (ch05.llama.qwen3; random weights of Qwen3-0.6B's shapes, float32: no download),
appendix E's LoRA adapters on every linear layer of the blocks (q,k,v,o,gate,up,down), the base frozen,
AdamW on the adapters (`llmfs.trainer.make_optimizer`), chapter 5's loss on a batch of random token ids.
Each row runs in a fresh process (so its peak RSS is its own): one warm-up step, then `--steps` timed
steps; tokens/s counts the batch's tokens per step. Peak RSS is the process's (model included); the
"training memory" column is the peak minus the RSS after the model was built, i.e. activations,
gradients and optimizer state. `--gradient-checkpointing` (`llmfs.grad_checkpoint`) should cut that
memory at the price of a second forward pass per block.

Writes lora_finetune.md and lora_finetune.json into --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.llm import QWEN3_06B_HF, TINY_HF
from llmfs.bench import machine_description, proc_status_mib, write_report
from llmfs.cli import Parser, add_quick_argument, check_output_dir, path_argument, positive_int, run

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _mib(field: str) -> float:
    value = proc_status_mib(field)
    return float("nan") if value is None else value


def worker(spec: dict) -> dict:
    """One row: build the model, add LoRA, time `steps` training steps; runs in its own process."""
    import torch

    from appendix_e.lora import add_lora
    from ch05.gpt_train import calc_loss_batch
    from ch05.llama.qwen3 import Qwen3Model, qwen3_config_from_hf
    from llmfs.grad_checkpoint import enable_gradient_checkpointing
    from llmfs.trainer import make_optimizer

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(123)
    cfg = {**qwen3_config_from_hf({**spec["hf"], "model_type": "qwen3"}), "dtype": torch.float32,
           "context_length": spec["seq_len"]}  # RoPE tables only as long as the batch needs
    model = Qwen3Model(cfg)
    with torch.no_grad():  # transformers' initialization (std 0.02), so the logits and the loss are realistic
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    trainable = add_lora(model, spec["rank"], spec["rank"], TARGETS)
    if spec["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    model.train()
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    b, n = spec["batch"], spec["seq_len"]
    ids = torch.randint(0, cfg["vocab_size"], (b, n + 1), generator=generator)
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[:, : n // 2] = -100  # the prompt half is masked, as chapter 7 masks instructions
    rss_model = _mib("VmRSS")

    def step() -> float:
        optimizer.zero_grad()
        loss = calc_loss_batch(inputs, targets, model, "cpu")
        loss.backward()
        optimizer.step()
        return loss.item()

    step()  # warm-up: allocations, kernels
    times, losses = [], []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    best = min(times)
    peak = _mib("VmHWM")
    return {**{k: v for k, v in spec.items() if k != "hf"}, "params": sum(p.numel() for p in model.parameters()),
            "trainable": trainable, "step_s": times, "tokens_per_s": b * n / best,
            "mean_tokens_per_s": b * n * len(times) / sum(times), "rss_model_mib": rss_model, "peak_rss_mib": peak,
            "train_mem_mib": peak - rss_model, "losses": losses}


def run_worker(spec: dict, timeout: float = 1800) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.lora_finetune", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def summarize(rows: list[dict], machine: dict, quick: bool) -> tuple[str, list[tuple[str, bool]]]:
    shape = "tiny config (smoke run)" if quick else "random-init Qwen3-0.6B shapes (596M parameters, tied)"
    r0 = rows[0]
    lines = [f"# LoRA fine-tuning steps on the CPU, with and without gradient checkpointing ({shape})", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
             f"{r0['threads']} threads. Our Qwen3Model, float32, LoRA rank {r0['rank']} on q,k,v,o,gate,up,down "
             f"({r0['trainable']:,} trainable of {r0['params']:,} parameters), AdamW; batch {r0['batch']} x "
             f"{r0['seq_len']} tokens, loss on the second half; best of {r0['steps']} steps after a warm-up, "
             "one fresh process per row.", "",
             "| gradient checkpointing | tokens/s (best step) | tokens/s (mean) | RSS after building (MiB) | "
             "peak RSS (MiB) | training memory: peak - built (MiB) | loss after the steps |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'yes' if r['gradient_checkpointing'] else 'no'} | {r['tokens_per_s']:,.1f} | "
                     f"{r['mean_tokens_per_s']:,.1f} | {r['rss_model_mib']:,.0f} | {r['peak_rss_mib']:,.0f} | "
                     f"{r['train_mem_mib']:,.0f} | {r['losses'][-1]:.4f} |")
    by = {r["gradient_checkpointing"]: r for r in rows}
    goals: list[tuple[str, bool]] = []
    if True in by and False in by:
        same = abs(by[True]["losses"][-1] - by[False]["losses"][-1]) < 1e-3
        goals.append((f"the same losses with and without checkpointing ({by[True]['losses'][-1]:.4f} vs "
                      f"{by[False]['losses'][-1]:.4f})", same))
        if not quick:
            ratio = by[True]["train_mem_mib"] / by[False]["train_mem_mib"]
            goals.append((f"checkpointing needs less training memory ({ratio:.2f}x)", ratio < 1.0))
    return "\n".join(lines) + "\n", goals


def parser() -> Parser:
    p = Parser(prog="python -m benchmarks.lora_finetune",
               description="LoRA fine-tuning steps of a Qwen3-0.6B-shaped model: tokens/s and peak RSS, with and "
                           "without gradient checkpointing.")
    add_quick_argument(p, "tiny config: checks the harness, not the speed")
    p.add_argument("--batch-size", type=positive_int, default=None, help="sequences per step (default 4; quick: 2)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default 256; quick: 32)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per row (default 3; quick: 2)")
    p.add_argument("--rank", type=positive_int, default=16, help="LoRA rank (and alpha; default 16)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=path_argument, default=Path(__file__).resolve().parent / "results",
                   help="folder for lora_finetune.md and .json (default benchmarks/results)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.lora_finetune [options]`; returns the exit code."""
    args = parser().parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    def benchmark() -> None:
        check_output_dir(args.out, option="--out")  # before minutes of measuring
        machine = machine_description()
        spec = {"hf": TINY_HF if args.quick else QWEN3_06B_HF, "threads": args.threads, "rank": args.rank,
                "batch": args.batch_size or (2 if args.quick else 4), "seq_len": args.seq_len or (32 if args.quick else 256),
                "steps": args.steps or (2 if args.quick else 3)}
        rows = []
        for checkpointing in (False, True):
            print(f"gradient checkpointing {'on' if checkpointing else 'off'} ...", flush=True)
            rows.append(run_worker({**spec, "gradient_checkpointing": checkpointing}))
        table, goals = summarize(rows, machine, args.quick)
        write_report(args.out, "lora_finetune.json", "lora_finetune.md",
                     {"machine": machine, "quick": args.quick, "results": rows}, table, goals)

    return run(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
