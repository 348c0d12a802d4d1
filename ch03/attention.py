"""Chapter 3: attention mechanisms, built up in the order the chapter teaches them.

SelfAttention_v1 (raw parameter matrices) -> SelfAttention_v2 (nn.Linear) ->
CausalAttention (mask + dropout) -> MultiHeadAttentionWrapper (stacked heads) ->
MultiHeadAttention (one set of projections split into heads). The last one is
what the GPT model of chapter 4 uses; it also carries an optional key/value cache
for fast generation (chapter 5) and can run either the chapter's explicit
masked-softmax math or PyTorch's fused `scaled_dot_product_attention`.

Bonus: `PyTorchMultiHeadAttention`, the book repository's variant with one fused
Q/K/V projection on `scaled_dot_product_attention` (chapter 4's `GPTModelFast` uses it).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention_v1(nn.Module):
    """Scaled dot-product self-attention with explicit weight matrices (section 3.4.2)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (num_tokens, d_in)
        keys = x @ self.W_key
        queries = x @ self.W_query
        values = x @ self.W_value
        attn_scores = queries @ keys.T  # (num_tokens, num_tokens)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values  # (num_tokens, d_out)


class SelfAttention_v2(nn.Module):
    """The same computation with nn.Linear layers, which initialise better (section 3.4.2).

    Note nn.Linear stores its weight transposed: copy `W.weight.T` into v1 to compare.
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys, queries, values = self.W_key(x), self.W_query(x), self.W_value(x)
        attn_scores = queries @ keys.transpose(-2, -1)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values


def causal_mask(context_length: int) -> torch.Tensor:
    """Boolean (context_length, context_length) mask, True above the diagonal = future tokens to hide."""
    return torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)


class CausalAttention(nn.Module):
    """Single-head causal self-attention for batches, with dropout on the weights (section 3.5.3)."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # A buffer moves with the module to the GPU but is not trained. New: a boolean mask, kept out of
        # the state dict (persistent=False), since it is rebuilt from context_length and never learned.
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (b, num_tokens, d_in)
        num_tokens = x.shape[1]
        # New: a clear error instead of a shape mismatch inside masked_fill.
        if num_tokens > self.mask.shape[0]:
            raise ValueError(f"input of {num_tokens} tokens exceeds context_length={self.mask.shape[0]}")
        keys, queries, values = self.W_key(x), self.W_query(x), self.W_value(x)
        attn_scores = queries @ keys.transpose(1, 2)  # (b, num_tokens, num_tokens)
        # -inf before the softmax gives exactly zero weight to future tokens.
        attn_scores = attn_scores.masked_fill(self.mask[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return self.dropout(attn_weights) @ values  # (b, num_tokens, d_out)


class MultiHeadAttentionWrapper(nn.Module):
    """Several CausalAttention heads run side by side, outputs concatenated (section 3.6.1)."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        super().__init__()
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(x) for head in self.heads], dim=-1)  # (b, num_tokens, num_heads * d_out)


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention with one projection per Q/K/V, split into heads (section 3.6.2).

    `use_sdpa=True` (default) calls `F.scaled_dot_product_attention`, PyTorch's fused
    kernel, which is faster and needs less memory; `use_sdpa=False` runs the
    chapter's explicit mask-and-softmax math. Both give the same result.

    `forward(x, use_cache=True)` appends this call's keys and values to a cache, so
    generation can feed one new token at a time (chapter 5). `reset_cache()` clears it.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False, use_sdpa: bool = True):
        super().__init__()
        # New: a ValueError (the book: assert, which `python -O` skips).
        if num_heads <= 0 or d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length  # New: to check cache + new tokens against it
        self.use_sdpa = use_sdpa  # New: PyTorch's fused attention kernel (default) or the explicit math
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # mixes the heads' outputs
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", causal_mask(context_length), persistent=False)  # New: bool, not saved
        # New: the key/value cache, so generation can feed one new token at a time (chapter 5).
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None

    def reset_cache(self) -> None:  # New
        self.cache_k, self.cache_v = None, None

    @property
    def cache_len(self) -> int:  # New: how many tokens the cache holds
        return 0 if self.cache_k is None else self.cache_k.shape[2]

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:  # New: the book's view + transpose, once for Q, K, V
        b, num_tokens, _ = t.shape
        # (b, num_tokens, d_out) -> (b, num_heads, num_tokens, head_dim)
        return t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:  # New: use_cache
        b, num_tokens, _ = x.shape
        past = self.cache_len if use_cache else 0  # New: tokens already in the cache
        if past + num_tokens > self.context_length:
            raise ValueError(
                f"attention over {past + num_tokens} tokens ({past} cached + {num_tokens} new) exceeds "
                f"context_length={self.context_length}"
            )
        queries = self._split_heads(self.W_query(x))
        keys = self._split_heads(self.W_key(x))
        values = self._split_heads(self.W_value(x))
        if use_cache:  # New: append this call's keys and values to the cache
            if self.cache_k is not None:
                keys = torch.cat([self.cache_k, keys], dim=2)  # (b, num_heads, past + num_tokens, head_dim)
                values = torch.cat([self.cache_v, values], dim=2)
            self.cache_k, self.cache_v = keys, values

        # Query i sits at absolute position past + i and may see keys 0 .. past + i.
        future = self.mask[past:past + num_tokens, :past + num_tokens]  # (num_tokens, past + num_tokens)
        if self.use_sdpa:  # New: one fused kernel for the masked softmax, dropout and weighted sum
            dropout_p = self.dropout.p if self.training else 0.0
            if past == 0 or num_tokens == 1:
                # Square case: the kernel builds the causal mask itself (fastest path). A single
                # new token after the cache may see every key, so it needs no mask at all.
                context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p,
                                                         is_causal=past == 0 and num_tokens > 1)
            else:
                # attn_mask uses True = "may attend", the opposite of our mask buffer.
                context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=~future,
                                                         dropout_p=dropout_p)
        else:
            attn_scores = queries @ keys.transpose(2, 3)  # (b, num_heads, num_tokens, past + num_tokens)
            attn_scores = attn_scores.masked_fill(future, -torch.inf)
            attn_weights = torch.softmax(attn_scores / math.sqrt(self.head_dim), dim=-1)
            context = self.dropout(attn_weights) @ values  # (b, num_heads, num_tokens, head_dim)

        # (b, num_heads, num_tokens, head_dim) -> (b, num_tokens, d_out)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


# --- Bonus: the book repository's fused variant ---------------------------------------------------

class PyTorchMultiHeadAttention(nn.Module):
    """Causal multi-head attention in the form of the book repository's bonus code: one fused
    Q/K/V projection (`qkv`) and PyTorch's `scaled_dot_product_attention` with `is_causal=True`,
    which picks FlashAttention-style kernels on GPUs.

    It computes exactly what `MultiHeadAttention` computes: with `qkv.weight` = the rows of
    W_query, W_key and W_value stacked (in that order) and `proj` = `out_proj`, both give the
    same output. `context_length` is optional (the kernel builds its own causal mask); when
    given, longer inputs are refused.
    """

    def __init__(self, d_in: int, d_out: int, num_heads: int, dropout: float = 0.0, qkv_bias: bool = False,
                 *, context_length: int | None = None):
        super().__init__()
        if num_heads <= 0 or d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.d_out = d_out
        self.context_length = context_length
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)  # W_query, W_key, W_value side by side
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = dropout  # a probability: the kernel applies it to the attention weights
        # New: a KV cache as in MultiHeadAttention, so GPTModelFast generates like GPTModel.
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None

    def reset_cache(self) -> None:
        self.cache_k, self.cache_v = None, None

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        past = self.cache_k.shape[2] if use_cache and self.cache_k is not None else 0
        if self.context_length is not None and past + num_tokens > self.context_length:
            raise ValueError(f"attention over {past + num_tokens} tokens ({past} cached + {num_tokens} new) "
                             f"exceeds context_length={self.context_length}")
        # (b, num_tokens, 3 * d_out) -> (b, num_tokens, 3, num_heads, head_dim)
        qkv = self.qkv(x).view(b, num_tokens, 3, self.num_heads, self.head_dim)
        # -> (3, b, num_heads, num_tokens, head_dim): queries, keys, values
        queries, keys, values = qkv.permute(2, 0, 3, 1, 4)
        if use_cache:
            if past:
                keys = torch.cat([self.cache_k, keys], dim=2)  # (b, num_heads, past + num_tokens, head_dim)
                values = torch.cat([self.cache_v, values], dim=2)
            self.cache_k, self.cache_v = keys, values
        dropout_p = self.dropout if self.training else 0.0
        if past == 0 or num_tokens == 1:  # the kernel's own causal mask; one new token sees every key
            context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p,
                                                     is_causal=past == 0 and num_tokens > 1)
        else:  # several new tokens after a cache: query i (position past + i) sees keys 0 .. past + i
            may_attend = torch.ones(num_tokens, past + num_tokens, dtype=torch.bool, device=x.device).tril(past)
            context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=may_attend,
                                                     dropout_p=dropout_p)
        # (b, num_heads, num_tokens, head_dim) -> (b, num_tokens, d_out)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.proj(context)
