"""One decoding step, shared by the book's `generate` (`ch05.gpt_generate`) and the streaming
generation of servers and apps (`llmfs.generate_stream`): the same logits and the same draws,
so both give the same tokens for the same seed.

`next_logits` runs the model on the window (or only the newest token, with the KV cache);
`next_token` scales by the temperature, keeps the top-k and the top-p nucleus, then samples
(temperature 0: the argmax).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmfs.errors import InvalidInput


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse settings that cannot sample (a user's mistake: one line from the commands)."""
    if temperature < 0:
        raise InvalidInput(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise InvalidInput(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise InvalidInput(f"top_p must be in (0, 1], got {top_p}")


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
    check_sampling_args(temperature, top_k, top_p)
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
