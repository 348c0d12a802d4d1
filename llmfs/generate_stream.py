"""Token-by-token generation for servers and apps (`ch07.serve`, the web apps).

`ch05.gpt_generate.generate` returns the whole sequence at the end, as in the book. A
server that streams its answer, or a page that shows tokens as they come, needs each
token as soon as it exists: `generate_stream` yields them one by one. It runs the same
steps in the same order as `generate` (the same `next_token`, the same draws from the
same `generator`), so for a batch of one its tokens are exactly `generate`'s.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from llmfs.errors import InvalidInput
from llmfs.runtime import eval_mode
from llmfs.sampling import next_logits, next_token


def generate_stream(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids for `idx` of shape (1, num_tokens).

    Stops before `eos_id` (which is not yielded), like `generate`. Closing the iterator
    early (a client that disconnects) ends the generation and resets the model's cache.
    A bad setting (negative `max_new_tokens`, temperature, top-k, top-p) raises InvalidInput; a
    wrongly shaped `idx` or `context_size` (the calling code's mistake) a plain ValueError.
    """
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"generate_stream takes one sequence of shape (1, num_tokens), got {tuple(idx.shape)}")
    if max_new_tokens < 0:  # a user's setting (a request's num_predict, a slider): like check_sampling_args
        raise InvalidInput(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    with eval_mode(model):
        try:
            for step in range(max_new_tokens):
                with torch.no_grad():
                    logits = next_logits(model, idx, step, context_size, use_cache)
                    nxt = next_token(logits, temperature, top_k, top_p, generator)  # (1, 1)
                token = int(nxt.item())
                if eos_id is not None and token == eos_id:
                    return
                idx = torch.cat([idx, nxt], dim=1)
                yield token
        finally:
            if use_cache:
                model.reset_kv_cache()
