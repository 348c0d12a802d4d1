"""Chapter 5, section 5.3: decoding strategies, plus a key/value cache for fast generation.

`generate` extends chapter 4's greedy loop with temperature scaling, top-k and
top-p (nucleus) filtering and an end-of-text stop. With `use_cache=True` each
step feeds only the newest token and reuses the keys/values of earlier ones,
so a token costs the same whether it is the 10th or the 200th.
`load_model_for_generation` builds a model from whatever a reader has: a GPT-2 name,
Hugging Face GPT-2 files, or what `python -m ch05.gpt_train` wrote.

From the command line (`ch05.cli`), with OpenAI's GPT-2 weights (section 5.5) or a model
trained by `python -m ch05.gpt_train`:

    python -m ch05.gpt_generate --model gpt2 --prompt "Every effort moves you" \
        --max-new-tokens 50 --temperature 0.7 --top-k 50 --seed 123
    python -m ch05.gpt_generate --model outputs/ch05/checkpoint.pth --prompt "Every effort moves you"
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ch02.runtime import eval_mode


def _check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set every logit outside the top-k / nucleus to -inf so softmax gives it probability 0.

    logits: (batch, vocab_size).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (batch, 1)
        logits = logits.masked_fill(logits < kth_best, -torch.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the best always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id from last-position logits (batch, vocab) -> (batch, 1).

    Order of operations (as in most libraries): scale by the temperature, then keep the
    top-k, then the nucleus (top-p) of the *scaled* distribution, then sample.
    """
    _check_sampling_args(temperature, top_k, top_p)
    if temperature == 0.0:
        # Greedy: filtering cannot change the argmax, so skip it.
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    # Subtracting the row maximum first changes no probability but keeps a tiny temperature
    # from overflowing to inf (inf - inf = nan): the best token becomes 0, the rest -large.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    probs = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def next_logits(model: nn.Module, idx: torch.Tensor, step: int, context_size: int,
                use_cache: bool) -> torch.Tensor:
    """The last position's logits (batch, vocab) for generation step `step`, with or without the KV cache."""
    if not use_cache:
        return model(idx[:, -context_size:])[:, -1, :]
    if step == 0 or idx.shape[1] > context_size:
        # (Re)fill the cache with the current window of at most context_size tokens.
        model.reset_kv_cache()
        return model(idx[:, -context_size:], use_cache=True)[:, -1, :]
    # The cache holds every token but the newest one: feed just that.
    return model(idx[:, -1:], use_cache=True)[:, -1, :]


# no_grad rather than inference_mode: under torch.autocast, inference mode turns off autocast's
# cache of low-precision weights, so every new token would cast all weights to bfloat16 again.
@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
             top_p: float | None = None, use_cache: bool = False,  # New: nucleus sampling, KV cache
             generator: torch.Generator | None = None) -> torch.Tensor:  # New: a seeded RNG of its own
    """The book's `generate` (listing 5.4): append up to `max_new_tokens` tokens to `idx` (batch, num_tokens).

    temperature 0 is greedy decoding; otherwise the logits are divided by the temperature
    and sampled, after optional top-k / top-p filtering (`next_token`). As in the book,
    generation stops *before* appending `eos_id`; in a batch it stops when every sequence
    has produced it, and a sequence that finished earlier is padded with `eos_id`.

    With `use_cache=True` the result is identical to `use_cache=False`. GPT-2 uses absolute
    positions, so once the text is longer than `context_size` the window slides and the
    cache is rebuilt from the cropped window each step (then a step costs as much as without).
    """
    _check_sampling_args(temperature, top_k, top_p)  # New: clear errors for bad settings
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    with eval_mode(model):  # New: no dropout while generating; the model's mode comes back afterwards
        try:
            for step in range(max_new_tokens):
                logits = next_logits(model, idx, step, context_size, use_cache)
                idx_next = next_token(logits, temperature, top_k, top_p, generator)  # (batch, 1)
                if eos_id is not None:
                    finished |= idx_next == eos_id
                    if bool(finished.all()):  # the book's `if idx_next == eos_id: break`, for a batch
                        break
                    idx_next = idx_next.masked_fill(finished, eos_id)
                idx = torch.cat((idx, idx_next), dim=1)  # (batch, num_tokens + 1)
        finally:
            if use_cache:
                model.reset_kv_cache()
    return idx


# --- Loading a model to generate with ----------------------------------------------------------

def _is_hf_gpt2_file(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    return bool(keys & {"wte.weight", "transformer.wte.weight"})


def load_model_for_generation(spec: str | os.PathLike, device: torch.device | str = "cpu",
                              n_heads: int | None = None) -> tuple[nn.Module, str]:
    """A GPTModel in eval mode from what `--model` names, and a short description of it.

    `spec` is one of: a GPT-2 name ("gpt2", "gpt2-medium", ..., "124M", ...); a Hugging Face
    GPT-2 folder or .safetensors file; or a file written by chapter 5 (checkpoint.pth,
    model.pth, model.safetensors) or the folder holding it. The config of our own files comes
    from the checkpoint, the safetensors metadata or config.json beside model.pth; failing
    those it is inferred from tensor shapes (`n_heads` then settles the head count).
    """
    from safetensors.torch import load_file

    from ch04.gpt import GPTModel
    from ch05.checkpoint import (
        check_state_dict,
        config_from_state_dict,
        fill_tied,
        load_state_file,
        saved_config,
        sidecar_config,
    )
    from ch05.gpt_download import load_pretrained_gpt2

    path = Path(spec).expanduser()
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "model.pth", "checkpoint.pth") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds none of model.safetensors, model.pth, checkpoint.pth")
        path = found[0]
    if not path.is_file():
        # A GPT-2 name (or a missing path, which load_pretrained_gpt2 reports clearly).
        model = load_pretrained_gpt2(str(spec), device=device)
        return model, f"OpenAI GPT-2 {spec!r}"
    if path.suffix == ".safetensors" and _is_hf_gpt2_file(path):
        return load_pretrained_gpt2(path, device=device), f"GPT-2 checkpoint {path}"

    if path.suffix == ".safetensors":
        state, cfg = load_file(str(path)), saved_config(path)
    else:
        data = load_state_file(path)
        if "model_state_dict" in data:  # a training checkpoint
            state, cfg = data["model_state_dict"], data.get("config")
        else:
            state, cfg = data, sidecar_config(path)
    if cfg is None:
        cfg = config_from_state_dict(state, n_heads=n_heads)
    elif n_heads is not None:
        cfg = {**cfg, "n_heads": n_heads}
    model = GPTModel({**cfg, "drop_rate": 0.0})
    state = fill_tied(state)
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state)
    return model.to(device).eval(), f"{path} ({cfg['n_layers']} layers, emb_dim {cfg['emb_dim']})"


if __name__ == "__main__":
    import sys

    from ch05.cli import generate_main

    sys.exit(generate_main())
