"""One measurement in its own process, so peak memory belongs to one model.

    python -m benchmarks.worker '{"kind": "train", "impl": "ours", ...}'

Prints one JSON line with the result. Used by `benchmarks.run`; not meant to be called by hand.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch04.gpt import GPTModel
from llmfs.decoding_layout import layout_for_decoding
from llmfs.onednn_linear import onednn_linear
from llmfs.runtime import reuse_freed_memory
from llmfs.trainer import autocast_context, make_optimizer


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


class HFWrapper(nn.Module):
    """Give transformers' GPT2LMHeadModel our call signature: ids -> logits."""

    def __init__(self, cfg: dict):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_cfg = GPT2Config(
            vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
            n_layer=cfg["n_layers"], n_head=cfg["n_heads"], resid_pdrop=cfg["drop_rate"],
            embd_pdrop=cfg["drop_rate"], attn_pdrop=cfg["drop_rate"],
        )
        self.model = GPT2LMHeadModel(hf_cfg)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx, use_cache=False).logits


def build(spec: dict) -> nn.Module:
    cfg = spec["cfg"]
    if spec["impl"] == "hf":
        return HFWrapper(cfg)
    variant = {
        "ours": {"tie_weights": True},                  # same parameter count as GPT-2 / HF
        "ours-onednn": {"tie_weights": True},           # the same, with the opt-in oneDNN fp32 linear path
        "ours-stored-layout": {"tie_weights": True},    # generation without llmfs.decoding_layout
        "ours-untied": {"tie_weights": False},          # the book's chapter-4 layout
        "ours-explicit": {"tie_weights": True, "use_sdpa": False},  # the chapter's hand-written attention
    }[spec["impl"]]
    return GPTModel({**cfg, **variant})


def train_context(spec: dict):
    """The chapter-5 trainer's forward context: bfloat16 autocast, or float32 on PyTorch's default
    path; "ours-onednn" is the opt-in `--onednn` path (linear layers through oneDNN)."""
    if spec["dtype"] == "bfloat16":
        return autocast_context("cpu", torch.bfloat16)
    return onednn_linear(spec["impl"] == "ours-onednn")


def measure_train(spec: dict) -> dict:
    torch.manual_seed(spec.get("seed", 123))
    model = build(spec)
    model.train()
    # The same optimizer for every model: the one the chapter-5 trainer uses (fused AdamW where
    # PyTorch has it), so the table compares models, not optimizer implementations.
    opt = make_optimizer(model, lr=4e-4, weight_decay=0.1)
    b, n, vocab = spec["batch"], spec["ctx"], spec["cfg"]["vocab_size"]
    gen = torch.Generator().manual_seed(123)
    data = torch.randint(0, vocab, (b, n + 1), generator=gen)
    inputs, targets = data[:, :-1], data[:, 1:]
    times, losses = [], []
    for step in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with train_context(spec):
            logits = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if step >= spec["warmup"]:
            times.append(dt)
    med = statistics.median(times)
    return {"tokens_per_s": b * n / med, "step_s": med, "peak_rss_mib": peak_rss_mib(), "losses": losses,
            "params": sum(p.numel() for p in model.parameters())}


def measure_generate(spec: dict) -> dict:
    from ch05.gpt_generate import generate

    torch.manual_seed(spec.get("seed", 123))
    model = build(spec).eval()
    if spec["impl"] in ("ours", "ours-onednn"):
        # What the generation commands do after loading (llmfs.decoding_layout); "ours-stored-layout"
        # keeps nn.Linear's own [out, in] weights, to show what the layout brings on this CPU.
        layout_for_decoding(model)
    prompt = torch.randint(0, spec["cfg"]["vocab_size"], (1, spec["prompt_len"]),
                           generator=torch.Generator().manual_seed(123))
    stamps: list[float] = []
    target = model.model if spec["impl"] == "hf" else model
    handle = target.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    runs = []
    # A short warm-up run (first calls allocate and pick kernels), then the timed run.
    for new in (min(10, spec["new_tokens"]), spec["new_tokens"]):
        stamps.clear()
        start = time.perf_counter()
        with torch.inference_mode():
            if spec["impl"] == "hf":
                out = model.model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                           use_cache=True, pad_token_id=0)
            else:
                with onednn_linear(spec["impl"] == "ours-onednn"):
                    out = generate(model, prompt, new, spec["cfg"]["context_length"], use_cache=spec["cache"])
        total = time.perf_counter() - start
        lat = [stamps[0] - start] + [b - a for a, b in zip(stamps, stamps[1:])]
        runs.append((total, lat[:new], out[0, spec["prompt_len"]:].tolist()))
    handle.remove()
    total, lat, tokens = runs[-1]
    return {"tokens_per_s": new / total, "latency_ms": [x * 1000 for x in lat], "tokens": tokens,
            "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    spec = json.loads(sys.argv[1])
    # Before anything is allocated: the same allocator setting the chapter-5 trainer starts with,
    # applied to every model alike (False measures glibc's default instead).
    kept = reuse_freed_memory() if spec.get("keep_freed_memory", True) else False
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    result = {"train": measure_train, "generate": measure_generate}[spec["kind"]](spec)
    print("RESULT " + json.dumps({**spec, **result, "freed_memory_kept": kept}))


if __name__ == "__main__":
    main()
