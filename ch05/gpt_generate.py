"""Chapter 5, section 5.3: decoding strategies, plus a key/value cache for fast generation.

`generate` extends chapter 4's greedy loop with temperature scaling, top-k and
top-p (nucleus) filtering and an end-of-text stop. With `use_cache=True` each
step feeds only the newest token and reuses the keys/values of earlier ones,
so a token costs the same whether it is the 10th or the 200th.
"""

from __future__ import annotations

import torch
import torch.nn as nn


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
    """Pick the next token id from last-position logits (batch, vocab) -> (batch, 1)."""
    if temperature == 0.0:
        # Greedy: filtering cannot change the argmax, so skip it.
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits, top_k, top_p) / temperature
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    top_p: float | None = None,
    use_cache: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append up to `max_new_tokens` tokens to `idx` (batch, num_tokens).

    temperature 0 is greedy decoding; otherwise logits are divided by the
    temperature and sampled, after optional top-k / top-p filtering. Generation
    stops early when every sequence in the batch produced `eos_id` (the eos
    token is kept in the output).

    With `use_cache=True` the result is identical to `use_cache=False`. GPT-2
    uses absolute positions, so once the text is longer than `context_size` the
    window slides and the cache has to be rebuilt from the cropped window each
    step: from there on a step costs as much as without a cache.
    """
    _check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    was_training = model.training
    model.eval()
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    try:
        for step in range(max_new_tokens):
            if not use_cache:
                logits = model(idx[:, -context_size:])[:, -1, :]
            elif step == 0 or idx.shape[1] > context_size:
                # (Re)fill the cache with the current window of at most context_size tokens.
                model.reset_kv_cache()
                logits = model(idx[:, -context_size:], use_cache=True)[:, -1, :]
            else:
                # The cache holds every token but the newest one: feed just that.
                logits = model(idx[:, -1:], use_cache=True)[:, -1, :]
            nxt = next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished |= nxt == eos_id
            idx = torch.cat([idx, nxt], dim=1)  # (batch, num_tokens + 1)
            if eos_id is not None and bool(finished.all()):
                break
    finally:
        if use_cache:
            model.reset_kv_cache()
        model.train(was_training)
    return idx
