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

The batched step is built from the model's own modules, so LoRA or int8 layers in their place change
nothing. Two layouts are stepped (`supports_batching` tells; other models generate one at a time
through `generate_stream`):

* chapter 4's GPT-2 layout, `GPTModel` (W_query/W_key/W_value, out_proj) and `GPTModelFast` (fused
  `qkv`, `proj`): `tok_emb` + `pos_emb` at each row's position, then each block's `norm1`, attention
  projections, `ff`, `norm2`, then `final_norm` and `out_head`;
* the RoPE models of `ch05.llama` (Llama 3, Qwen3 dense and MoE, Gemma 3): `embed`, then each block
  called as it is (its norms and feed-forward, experts included), with its attention's `forward`
  swapped for the step's batched attention for that call (grouped-query heads, QK-norm, each row's
  rotation at its own position, Gemma's score scale and sliding window), then `final_norm` and `out_head`.

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
_ROPE_MODEL_PARTS = ("cfg", "embed", "rope_tables", "trf_blocks", "final_norm", "out_head", "reset_kv_cache")
_ROPE_ATTENTION_PARTS = ("W_query", "W_key", "W_value", "out_proj", "num_heads", "num_kv_groups", "head_dim",
                         "normalize_qk", "cache_k", "cache_v")


def _projections(att: nn.Module) -> str | None:
    """"separate" (W_query, W_key, W_value, out_proj), "fused" (qkv, proj) or None (another attention)."""
    if not all(hasattr(att, name) for name in ("num_heads", "head_dim", "cache_k", "cache_v")):
        return None
    if all(hasattr(att, name) for name in ("W_query", "W_key", "W_value", "out_proj")):
        return "separate"
    if all(hasattr(att, name) for name in ("qkv", "proj")):
        return "fused"
    return None


def _layout(model: nn.Module) -> str | None:
    """"gpt" (chapter 4's layout: learned positions), "rope" (ch05.llama's RoPE models) or None."""
    if not isinstance(getattr(model, "trf_blocks", None), nn.ModuleList):
        return None
    if all(hasattr(model, name) for name in _MODEL_PARTS):
        ok = all(all(hasattr(b, n) for n in _BLOCK_PARTS) and _projections(b.att) for b in model.trf_blocks)
        return "gpt" if ok else None
    if all(hasattr(model, name) for name in _ROPE_MODEL_PARTS):
        ok = all(all(hasattr(getattr(b, "att", None), n) for n in _ROPE_ATTENTION_PARTS) for b in model.trf_blocks)
        return "rope" if ok else None
    return None


def supports_batching(model: nn.Module) -> bool:
    """True for a model `BatchedGeneration` can step (chapter 4's GPT layout, or the RoPE models of
    `ch05.llama`: the blocks' KV caches and attention parts it needs); False for others, which
    generate one sequence at a time."""
    return _layout(model) is not None


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as `ch05.llama.llama3.apply_rope` turns each (x[i], x[i + head_dim/2]) pair (llmfs does not
    import chapters); cos/sin broadcast against x."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class _Step:
    """What one batched decoding step's layers share: the rows' cache rows and positions, and their masks."""

    def __init__(self, index: torch.Tensor, positions: torch.Tensor, longest: int, every_row: bool):
        self.index, self.positions, self.longest, self.every_row = index, positions, longest, every_row
        self._masks: dict[int | None, torch.Tensor] = {}
        self._flat: dict[tuple, torch.Tensor] = {}

    def flat_positions(self, shape: torch.Size) -> torch.Tensor:
        """For a cache of `shape` (rows, heads, capacity, head_dim): the rows of its flat (rows * heads *
        capacity, head_dim) view where each step row's heads go, (b * heads,) in (row, head) order."""
        if shape not in self._flat:
            _, heads, capacity, _ = shape
            head = torch.arange(heads, device=self.index.device)
            self._flat[shape] = ((self.index[:, None] * heads + head) * capacity + self.positions[:, None]).reshape(-1)
        return self._flat[shape]

    def may_attend(self, window: int | None = None) -> torch.Tensor:
        """(b, 1, 1, longest): True where a row may attend, its own cached tokens and the new one
        (with a sliding window, only the last `window` of them)."""
        if window not in self._masks:
            key_pos = torch.arange(self.longest, device=self.positions.device)
            mask = key_pos <= self.positions[:, None]
            if window is not None:
                mask &= key_pos > self.positions[:, None] - window
            self._masks[window] = mask[:, None, None, :]
        return self._masks[window]


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
        self.layout = _layout(model)
        if self.layout is None:
            raise ValueError(f"{type(model).__name__} has neither chapter 4's GPT layout nor ch05.llama's that "
                             "batched decoding needs (llmfs.batched.supports_batching); generate one sequence "
                             "at a time")
        if context_size < 1:
            raise ValueError(f"context_size must be >= 1, got {context_size}")
        self.model, self.context_size = model, min(context_size, int(model.cfg["context_length"]))
        self.blocks = list(model.trf_blocks)
        self.rows: list[Row] = []  # in the order of the cache's rows
        # Per layer: (rows, key/value heads, capacity, head_dim); None while the batch is empty.
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
            greedy: dict[int, int] = {}
            if decoding:
                together = self._decode(decoding)  # (len(decoding), vocab)
                for j, row in enumerate(decoding):
                    logits[id(row)] = together[j:j + 1]
                # Greedy rows in one argmax: next_token's choice for each (the first largest logit)
                if any(row.temperature == 0.0 for row in decoding):
                    chosen = together.argmax(dim=-1).tolist()
                    greedy = {id(row): token for row, token in zip(decoding, chosen) if row.temperature == 0.0}
        finally:
            self.model.train(was_training)
        for row in active:
            # The row's own settings and generator, on its own logits: the draws it makes alone.
            token = greedy.get(id(row))
            if token is None:
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
        for layer in range(len(self.blocks)):
            self.keys[layer] = self._grown(self.keys[layer], 0, longest)
            self.values[layer] = self._grown(self.values[layer], 0, longest)
        step = _Step(index, positions, longest, every_row=len(rows) == len(self.rows))  # every row: cache order
        if self.layout == "gpt":
            x = self._gpt_blocks(tokens, step)
        else:
            x = self._rope_blocks(tokens, step)
        for r in rows:
            r.cached += 1
        logits = model.out_head(model.final_norm(x))[:, -1, :]  # (b, vocab_size)
        if (cap := model.cfg.get("final_logit_softcapping")) is not None:  # as Gemma3Model.forward (None in Gemma 3)
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _gpt_blocks(self, tokens: torch.Tensor, step: _Step) -> torch.Tensor:
        """Chapter 4's layout: learned positions, then each block's parts as `TransformerBlock.forward` runs them."""
        model = self.model
        x = model.drop_emb(model.tok_emb(tokens) + model.pos_emb(step.positions)[:, None, :])  # (b, 1, emb_dim)
        for layer, block in enumerate(self.blocks):
            x = x + block.drop_shortcut(self._attention(block.att, block.norm1(x), layer, step))
            x = x + block.drop_shortcut(block.ff(block.norm2(x)))
        return x

    def _rope_blocks(self, tokens: torch.Tensor, step: _Step) -> torch.Tensor:
        """ch05.llama's layout: each block runs itself, its attention swapped for `_rope_attention` for the call."""
        model = self.model
        x = model.embed(tokens)  # (b, 1, emb_dim)
        # Each row's rotation at its own position: (b, 1, 1, head_dim), broadcast over the heads.
        tables = {name: (cos[step.positions][:, None, None, :].to(x.dtype), sin[step.positions][:, None, None, :].to(x.dtype))
                  for name, (cos, sin) in model.rope_tables().items()}
        for layer, block in enumerate(self.blocks):
            att = block.att
            att.forward = lambda x, cos, sin, use_cache=False, att=att, layer=layer: self._rope_attention(
                att, x, cos, sin, layer, step)
            try:
                x = block(x, *tables[getattr(block, "rope_table", "global")])
            finally:
                del att.forward  # the class's forward again
        return x

    def _attention(self, att: nn.Module, x: torch.Tensor, layer: int, step: _Step) -> torch.Tensor:
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
        context = self._attend(queries[:, :, None, :], keys, values, layer, step)
        # (b, num_heads, 1, head_dim) -> (b, 1, d_out)
        return out_proj(context.transpose(1, 2).reshape(b, 1, heads * head_dim))

    def _rope_attention(self, att: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                        step: _Step) -> torch.Tensor:
        """`GroupedQueryAttention.forward` for one new token per row: QK-norm, each row's rotation (cos/sin:
        (b, 1, 1, head_dim)), its keys and values written at its position, attention over its own keys
        (and, in a sliding-window layer, only the last `sliding_window` of them). x: (b, 1, emb_dim)."""
        b = x.shape[0]
        queries = att.W_query(x).view(b, 1, att.num_heads, att.head_dim).transpose(1, 2)  # (b, heads, 1, head_dim)
        keys = att.W_key(x).view(b, 1, att.num_kv_groups, att.head_dim).transpose(1, 2)
        values = att.W_value(x).view(b, 1, att.num_kv_groups, att.head_dim).transpose(1, 2)
        queries, keys = att.normalize_qk(queries, keys)
        queries, keys = _rotated(queries, cos, sin), _rotated(keys, cos, sin)
        context = self._attend(queries, keys[:, :, 0], values[:, :, 0], layer, step,
                               window=att.sliding_window, scale=att.scale)
        return att.out_proj(context.transpose(1, 2).reshape(b, 1, att.num_heads * att.head_dim))

    def _attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layer: int, step: _Step,
                window: int | None = None, scale: float | None = None) -> torch.Tensor:
        """Write keys/values (b, kv_heads, head_dim) at each row's position of `layer`'s cache, then attend
        from queries (b, heads, 1, head_dim) to each row's own keys; (b, heads, 1, head_dim)."""
        cache_k, cache_v = self.keys[layer], self.values[layer]
        # cache[index[j], h, positions[j]] = keys[j, h], as one index_copy_ into the flat (rows * heads *
        # capacity, head_dim) view (faster than the advanced-indexing assignment)
        where = step.flat_positions(cache_k.shape)
        cache_k.view(-1, cache_k.shape[-1]).index_copy_(0, where, keys.reshape(-1, keys.shape[-1]).to(cache_k.dtype))
        cache_v.view(-1, cache_v.shape[-1]).index_copy_(0, where, values.reshape(-1, values.shape[-1]).to(cache_v.dtype))
        rows = slice(None) if step.every_row else step.index
        k = self.keys[layer][rows, :, :step.longest]  # (b, kv_heads, longest, head_dim)
        v = self.values[layer][rows, :, :step.longest]
        return F.scaled_dot_product_attention(queries, k, v, attn_mask=step.may_attend(window), scale=scale,
                                              enable_gqa=k.shape[1] != queries.shape[1])

    def _grown(self, cache: torch.Tensor | None, new_rows: int, length: int = 0) -> torch.Tensor:
        """`cache` with `new_rows` more (empty) rows and room for at least `length` tokens."""
        att = self.blocks[0].att
        if cache is None:
            shape = (0, getattr(att, "num_kv_groups", att.num_heads), 0, att.head_dim)
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
