"""Batched generation: several prompts decode together, each with a KV cache row of its own.

One cached decoding step of a small model spends its time reading the weights, not computing:
feeding 8 sequences' newest tokens through the same matrices costs little more than feeding
one. `BatchedGeneration` keeps rows of different lengths in one batch:

* a row starts (or, past the context, slides its window) with a forward pass through the model
  itself, the one `llmfs.generate_stream` runs (rows whose windows have the same length share
  it), and its keys and values are copied into the batch's cache (one tensor per layer,
  (rows, num_heads, capacity, head_dim));
* every later step feeds each row's newest token at that row's own position; a row's keys past
  its length are masked out of attention (probability exactly 0), so the padding never changes
  a row's tokens;
* each row samples with its own settings and its own `torch.Generator` (`llmfs.sampling.next_token`
  on its own logits), so a seeded row draws what it would draw alone;
* rows finish on their own (end-of-text token, `max_new_tokens`) or are removed (`Row.close`:
  a stop string, a client gone), and new rows join between steps (continuous batching).

The batched step is built from the model's own modules (`tok_emb`, `pos_emb`, each block's `norm1`,
attention projections, `ff`, `norm2`, then `final_norm` and `out_head`), so it serves every model of
the GPT-2 layout of chapter 4: `GPTModel` (W_query/W_key/W_value, out_proj), `GPTModelFast` (fused
`qkv`, `proj`), LoRA or int8 layers in their place. `supports_batching` tells; other models (Llama,
Qwen, Gemma) generate one at a time through `generate_stream`.

`generate_batch` runs a whole batch in one call (for scripts, tests and benchmarks); the server's
scheduler (`llmfs.serve.ModelWorker`) steps one `BatchedGeneration` itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmfs.errors import InvalidInput
from llmfs.sampling import check_sampling_args, next_token

_MODEL_PARTS = ("cfg", "tok_emb", "pos_emb", "trf_blocks", "final_norm", "out_head", "reset_kv_cache")
_BLOCK_PARTS = ("att", "norm1", "norm2", "ff")


def _projections(att: nn.Module) -> str | None:
    """"separate" (W_query, W_key, W_value, out_proj), "fused" (qkv, proj) or None (another attention)."""
    if not all(hasattr(att, name) for name in ("num_heads", "head_dim", "cache_k", "cache_v")):
        return None
    if all(hasattr(att, name) for name in ("W_query", "W_key", "W_value", "out_proj")):
        return "separate"
    if all(hasattr(att, name) for name in ("qkv", "proj")):
        return "fused"
    return None


def supports_batching(model: nn.Module) -> bool:
    """True for a model of chapter 4's GPT layout (learned positions, the blocks' KV caches), which
    `BatchedGeneration` can step; False for others, which generate one sequence at a time."""
    if not all(hasattr(model, name) for name in _MODEL_PARTS) or not isinstance(model.trf_blocks, nn.ModuleList):
        return False
    return all(all(hasattr(b, n) for n in _BLOCK_PARTS) and _projections(b.att) for b in model.trf_blocks)


class Row:
    """One sequence of a batch: iterate for its new token ids as the batch's steps make them.

    `next()` returns the token the last step made, or stops when the row is over (its
    end-of-text token, which is not returned, or `max_new_tokens` tokens); `close()` takes it out
    of the batch (a stop string, a client gone). Like `generate_stream`'s tokens, but pushed by
    `BatchedGeneration.step()` rather than pulled.
    """

    def __init__(self, batch: BatchedGeneration, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, eos_id: int | None, generator: torch.Generator | None):
        self.batch, self.ids = batch, list(prompt_ids)
        self.max_new_tokens, self.eos_id, self.generator = max_new_tokens, eos_id, generator
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.steps = 0              # tokens sampled (the end-of-text token included)
        self.cached = 0             # tokens in this row's part of the batch's cache (0: it needs a forward pass)
        self.finished = max_new_tokens == 0
        self.pending: deque[int] = deque()

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if self.pending:
            return self.pending.popleft()
        if self.finished:
            raise StopIteration
        raise RuntimeError("no token yet: the batch's step() makes the next one")

    def drain(self) -> list[int]:
        """The tokens made since the last call (none once the row is over)."""
        tokens = list(self.pending)
        self.pending.clear()
        return tokens

    def close(self) -> None:
        """Leave the batch (its cache row is freed); the row yields nothing more."""
        self.finished = True
        self.pending.clear()
        self.batch.remove(self)


class BatchedGeneration:
    """Rows that decode together, one token per row per `step()` (see the module docstring).

    Not re-entrant, and the model's own KV cache is used (then reset) for each row's first
    forward pass: one thread steps the batch, and nothing else generates on the model meanwhile.
    """

    def __init__(self, model: nn.Module, context_size: int):
        if not supports_batching(model):
            raise ValueError(f"{type(model).__name__} has not the GPT layout of chapter 4 that batched decoding "
                             "needs (llmfs.batched.supports_batching); generate one sequence at a time")
        if context_size < 1:
            raise ValueError(f"context_size must be >= 1, got {context_size}")
        self.model, self.context_size = model, min(context_size, int(model.cfg["context_length"]))
        self.blocks = list(model.trf_blocks)
        self.rows: list[Row] = []  # in the order of the cache's rows
        # Per layer: (rows, num_heads, capacity, head_dim); None while the batch is empty.
        self.keys: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.values: list[torch.Tensor | None] = [None] * len(self.blocks)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
            top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
            generator: torch.Generator | None = None) -> Row:
        """A new row for `prompt_ids`; it gets its first token at the next `step()`. The settings are
        `generate_stream`'s, checked the same way (InvalidInput for a user's bad value)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: the model needs at least one token to continue")
        if max_new_tokens < 0:
            raise InvalidInput(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        check_sampling_args(temperature, top_k, top_p)
        row = Row(self, list(prompt_ids), max_new_tokens, temperature, top_k, top_p, eos_id, generator)
        if not row.finished:
            self.rows.append(row)
            for layer in range(len(self.blocks)):  # an empty cache row until its first forward pass
                self.keys[layer], self.values[layer] = (self._grown(t, 1) for t in (self.keys[layer], self.values[layer]))
        return row

    def remove(self, row: Row) -> None:
        """Take `row` and its cache row out of the batch (nothing happens if it is not in it)."""
        if row not in self.rows:
            return
        i = self.rows.index(row)
        self.rows.pop(i)
        keep = [j for j in range(len(self.rows) + 1) if j != i]
        for layer in range(len(self.blocks)):
            if not self.rows:
                self.keys[layer] = self.values[layer] = None
            else:
                self.keys[layer] = self.keys[layer][keep]
                self.values[layer] = self.values[layer][keep]

    # --- one step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """One new token for every row still decoding (`Row.pending`); rows that end are marked finished.

        A row without its window in the cache (new, or grown past the context: the window slides
        as in `generate_stream`) runs through the model itself (with the rows whose windows have its
        length); the others decode together.
        """
        active = [r for r in self.rows if not r.finished]
        if not active:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            logits, filling = {}, {}
            for row in active:
                if row.cached == 0 or len(row.ids) > self.context_size:
                    filling.setdefault(min(len(row.ids), self.context_size), []).append(row)
            for rows in filling.values():  # windows of one length go through the model together
                logits.update(self._fill(rows))
            decoding = [r for r in active if id(r) not in logits]
            if decoding:
                together = self._decode(decoding)  # (len(decoding), vocab)
                for j, row in enumerate(decoding):
                    logits[id(row)] = together[j:j + 1]
        finally:
            self.model.train(was_training)
        for row in active:
            # The row's own settings and generator, on its own logits: the draws it makes alone.
            token = int(next_token(logits[id(row)], row.temperature, row.top_k, row.top_p, row.generator).item())
            row.steps += 1
            if row.eos_id is not None and token == row.eos_id:
                row.finished = True
                continue
            row.ids.append(token)
            row.pending.append(token)
            if row.steps >= row.max_new_tokens:
                row.finished = True
        for row in active:
            if row.finished:  # its last tokens wait in row.pending; its cache row is free for others
                self.remove(row)

    def _fill(self, rows: list[Row]) -> dict[int, torch.Tensor]:
        """The rows' windows (all of one length) through the model itself, as `llmfs.sampling.next_logits`
        runs one, their keys and values copied into the rows' parts of the batch's cache; each row's
        last logits (1, vocab), by id(row)."""
        windows = [row.ids[-self.context_size:] for row in rows]
        length = len(windows[0])
        device = self.model.tok_emb.weight.device
        self.model.reset_kv_cache()
        try:
            logits = self.model(torch.tensor(windows, device=device), use_cache=True)[:, -1, :]  # (len(rows), vocab)
            index = [self.rows.index(row) for row in rows]
            for layer, block in enumerate(self.blocks):
                k, v = block.att.cache_k, block.att.cache_v  # (len(rows), num_heads, length, head_dim)
                if self.keys[layer].dtype != k.dtype:  # a bfloat16 model, say: the cache takes its type
                    self.keys[layer], self.values[layer] = self.keys[layer].to(k.dtype), self.values[layer].to(k.dtype)
                self.keys[layer] = self._grown(self.keys[layer], 0, length)
                self.values[layer] = self._grown(self.values[layer], 0, length)
                for j, i in enumerate(index):
                    self.keys[layer][i, :, :length] = k[j]
                    self.values[layer][i, :, :length] = v[j]
        finally:
            self.model.reset_kv_cache()
        for row in rows:
            row.cached = length
        return {id(row): logits[j:j + 1] for j, row in enumerate(rows)}

    def _decode(self, rows: list[Row]) -> torch.Tensor:
        """One token for each of `rows` at its own position, all in one pass; logits (len(rows), vocab)."""
        model = self.model
        device = model.tok_emb.weight.device
        index = torch.tensor([self.rows.index(r) for r in rows], device=device)        # cache rows
        positions = torch.tensor([r.cached for r in rows], device=device)               # (b,)
        tokens = torch.tensor([[r.ids[-1]] for r in rows], device=device)               # (b, 1)
        # Hooks on the model (a profiler, a test's slow model) see this step as a forward pass.
        for key, hook in list(model._forward_pre_hooks.items()):
            hook(model, (tokens,), {}) if key in model._forward_pre_hooks_with_kwargs else hook(model, (tokens,))
        longest = int(positions.max()) + 1
        # (b, 1, 1, longest): True where a row may attend, its own cached tokens and the new one
        may_attend = (torch.arange(longest, device=device) <= positions[:, None])[:, None, None, :]
        x = model.drop_emb(model.tok_emb(tokens) + model.pos_emb(positions)[:, None, :])  # (b, 1, emb_dim)
        every_row = len(rows) == len(self.rows)  # then in cache order: slices instead of copies
        for layer, block in enumerate(self.blocks):
            self.keys[layer] = self._grown(self.keys[layer], 0, longest)
            self.values[layer] = self._grown(self.values[layer], 0, longest)
            x = x + block.drop_shortcut(self._attention(block.att, block.norm1(x), layer, index, positions,
                                                        longest, may_attend, every_row))
            x = x + block.drop_shortcut(block.ff(block.norm2(x)))
        for r in rows:
            r.cached += 1
        return model.out_head(model.final_norm(x))[:, -1, :]  # (b, vocab_size)

    def _attention(self, att: nn.Module, x: torch.Tensor, layer: int, index: torch.Tensor, positions: torch.Tensor,
                   longest: int, may_attend: torch.Tensor, every_row: bool) -> torch.Tensor:
        """`att`'s projections for one new token per row, its keys and values written at each row's
        position, and attention over each row's own keys only. x: (b, 1, emb_dim)."""
        b = x.shape[0]
        heads, head_dim = att.num_heads, att.head_dim
        if _projections(att) == "separate":
            queries, keys, values = (w(x).view(b, heads, head_dim) for w in (att.W_query, att.W_key, att.W_value))
            out_proj = att.out_proj
        else:
            # (b, 1, 3 * d_out) -> (3, b, num_heads, head_dim): queries, keys, values
            queries, keys, values = att.qkv(x).view(b, 3, heads, head_dim).transpose(0, 1)
            out_proj = att.proj
        # Cache row index[j], position positions[j]: (b, num_heads, head_dim) written there.
        self.keys[layer][index, :, positions] = keys
        self.values[layer][index, :, positions] = values
        rows = slice(None) if every_row else index
        k = self.keys[layer][rows, :, :longest]  # (b, num_heads, longest, head_dim)
        v = self.values[layer][rows, :, :longest]
        context = F.scaled_dot_product_attention(queries[:, :, None, :], k, v, attn_mask=may_attend)
        # (b, num_heads, 1, head_dim) -> (b, 1, d_out)
        return out_proj(context.transpose(1, 2).reshape(b, 1, heads * head_dim))

    def _grown(self, cache: torch.Tensor | None, new_rows: int, length: int = 0) -> torch.Tensor:
        """`cache` with `new_rows` more (empty) rows and room for at least `length` tokens."""
        att = self.blocks[0].att
        if cache is None:
            shape = (0, att.num_heads, 0, att.head_dim)
            weight = self.model.tok_emb.weight
            cache = torch.zeros(shape, dtype=weight.dtype if weight.is_floating_point() else torch.float32,
                                device=weight.device)
        rows, heads, capacity, head_dim = cache.shape
        if new_rows == 0 and length <= capacity:
            return cache
        # Doubling: a row that grows by one token at a time copies the cache O(log n) times.
        new_capacity = capacity if length <= capacity else min(max(length, 2 * capacity, 16), self.context_size)
        grown = cache.new_zeros((rows + new_rows, heads, new_capacity, head_dim))
        grown[:rows, :, :capacity] = cache
        return grown


def generate_batch(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                   context_size: int, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, eos_id: int | None = None,
                   generators: Sequence[torch.Generator | None] | None = None) -> list[list[int]]:
    """The new token ids for each prompt (lists of different lengths), decoded as one batch.

    Each row gives the tokens `generate_stream` gives for that prompt alone, with the same
    settings and its own generator (`generators[i]`): stopping before `eos_id`, at most
    `max_new_tokens` (one number, or one per prompt) tokens.
    """
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    generators = list(generators) if generators is not None else [None] * len(prompts)
    if not len(limits) == len(generators) == len(prompts):
        raise ValueError(f"{len(prompts)} prompts, {len(limits)} max_new_tokens and {len(generators)} generators")
    batch = BatchedGeneration(model, context_size)
    rows = [batch.add(p, n, temperature, top_k, top_p, eos_id, g) for p, n, g in zip(prompts, limits, generators)]
    answers: list[list[int]] = [[] for _ in rows]
    while len(batch):
        batch.step()
        for answer, row in zip(answers, rows):
            answer.extend(row.drain())
    return answers
