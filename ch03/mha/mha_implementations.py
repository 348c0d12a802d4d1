"""Chapter 3 bonus: causal multi-head attention, computed several ways (ch03/mha/mha-implementations.ipynb).

Every class takes the book's `MultiHeadAttention` arguments, `(d_in, d_out, context_length, dropout, num_heads,
qkv_bias=False)`, maps `(batch, num_tokens, d_in)` to `(batch, num_tokens, d_out)` and, with the same weights,
computes what `ch03.attention.MultiHeadAttention` computes:

- `MHAWrapper`: the book's `MultiHeadAttentionWrapper` (section 3.6.1) with heads of `d_out // num_heads` and an
  output projection: one `CausalAttention` per head, run one after another;
- `MHACombinedQKV`: one `nn.Linear` to `3 * d_out` for queries, keys and values, then the chapter's math;
- `MHAEinsum`: every product written as `torch.einsum`;
- `MHASDPAMask`, `MHASDPACausal`: `F.scaled_dot_product_attention` with a boolean mask buffer, or with
  `is_causal=True` and no mask;
- `MHAPyTorchClass`: `torch.nn.MultiheadAttention`;
- `MHAFlexAttention`: `torch.nn.attention.flex_attention` with a causal block mask, compiled with `torch.compile`
  (`flex_attention_status` says whether this machine can run it).

`copy_weights(src, dst)` copies the weights of any of them (and of `MultiHeadAttention`,
`PyTorchMultiHeadAttention`) into any other, so outputs can be compared exactly. Imports chapter 3's classes;
no key/value cache here (chapter 3's `MultiHeadAttention` has one).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch03.attention import MultiHeadAttentionWrapper, causal_mask


class MHAWrapper(MultiHeadAttentionWrapper):
    """The book's wrapper (section 3.6.1) made comparable: `num_heads` heads of `d_out // num_heads` each, their
    outputs concatenated and projected by `out_proj`, as `MultiHeadAttention` does in one pass."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        if num_heads <= 0 or d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        super().__init__(d_in, d_out // num_heads, context_length, dropout, num_heads, qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(super().forward(x))  # the heads run one after another, each with its own matmuls


class MHACombinedQKV(nn.Module):
    """One Linear computes queries, keys and values together: one large matmul instead of three."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        super().__init__()
        if num_heads <= 0 or d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)  # rows: W_query, W_key, W_value stacked
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        # (b, num_tokens, 3 * d_out) -> (b, num_tokens, 3, num_heads, head_dim)
        qkv = self.qkv(x).view(b, num_tokens, 3, self.num_heads, self.head_dim)
        # -> (3, b, num_heads, num_tokens, head_dim): queries, keys, values
        queries, keys, values = qkv.permute(2, 0, 3, 1, 4)
        context = self.attend(queries, keys, values)  # (b, num_heads, num_tokens, head_dim)
        return self.out_proj(context.transpose(1, 2).reshape(b, num_tokens, self.d_out))

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The chapter's masked softmax: materialises the (num_tokens, num_tokens) weights of every head."""
        num_tokens = queries.shape[2]
        attn_scores = queries @ keys.transpose(2, 3)  # (b, num_heads, num_tokens, num_tokens)
        attn_scores = attn_scores.masked_fill(self.mask[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / self.head_dim**0.5, dim=-1)
        return self.dropout(attn_weights) @ values


class MHAEinsum(nn.Module):
    """Every product as an einsum: the index letters say which axes are multiplied and summed (b batch,
    n/m query/key token, h head, d head dimension, i input feature, o output feature)."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        super().__init__()
        if num_heads <= 0 or d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        # Linear layers only hold the weights (and their initialisation); forward multiplies with einsum.
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def _heads(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        """x @ W.T (+ b), split into heads: the weight's rows viewed as (num_heads, head_dim)."""
        w = layer.weight.view(self.num_heads, self.head_dim, -1)  # (num_heads, head_dim, d_in)
        out = torch.einsum("bni,hdi->bhnd", x, w)  # (b, num_heads, num_tokens, head_dim)
        return out if layer.bias is None else out + layer.bias.view(self.num_heads, 1, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[1]
        queries, keys, values = (self._heads(x, w) for w in (self.W_query, self.W_key, self.W_value))
        attn_scores = torch.einsum("bhnd,bhmd->bhnm", queries, keys)  # (b, num_heads, num_tokens, num_tokens)
        attn_scores = attn_scores.masked_fill(self.mask[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = self.dropout(torch.softmax(attn_scores / self.head_dim**0.5, dim=-1))
        context = torch.einsum("bhnm,bhmd->bhnd", attn_weights, values)  # (b, num_heads, num_tokens, head_dim)
        # Merging the heads and the output projection in one einsum: no transpose + reshape needed.
        w_out = self.out_proj.weight.view(self.d_out, self.num_heads, self.head_dim)  # (d_out, num_heads, head_dim)
        return torch.einsum("bhnd,ohd->bno", context, w_out) + self.out_proj.bias


class MHASDPAMask(MHACombinedQKV):
    """PyTorch's fused `scaled_dot_product_attention`, given the causal mask as a boolean tensor."""

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        num_tokens = queries.shape[2]
        # attn_mask: True = "may attend", the opposite of our mask buffer.
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=~self.mask[:num_tokens, :num_tokens],
                                              dropout_p=self.dropout.p if self.training else 0.0)


class MHASDPACausal(MHACombinedQKV):
    """`scaled_dot_product_attention` with `is_causal=True`: no mask tensor; the kernel skips the future itself."""

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(queries, keys, values, is_causal=True,
                                              dropout_p=self.dropout.p if self.training else 0.0)


class MHAPyTorchClass(nn.Module):
    """`torch.nn.MultiheadAttention`, PyTorch's ready-made module, with a causal mask.

    It projects the queries from `embed_dim` features, so it needs `d_in == d_out`. With `need_weights=True`
    (PyTorch's default) it also returns the attention weights averaged over the heads, which forces the
    explicit (materialising) path; we pass `need_weights=False` unless asked.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False, *, need_weights: bool = False):
        super().__init__()
        if d_in != d_out:
            raise ValueError(f"nn.MultiheadAttention needs d_in == d_out (got {d_in} and {d_out})")
        # bias=True gives the output projection its bias (as MultiHeadAttention's out_proj has); the q/k/v
        # bias follows qkv_bias.
        self.attn = nn.MultiheadAttention(d_out, num_heads, dropout=dropout, bias=True, batch_first=True)
        if not qkv_bias:
            self.attn.in_proj_bias = None
        self.need_weights = need_weights
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[1]
        context, _ = self.attn(x, x, x, attn_mask=self.mask[:num_tokens, :num_tokens],
                               need_weights=self.need_weights)  # True in attn_mask = may not attend, as ours
        return context


def causal_mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """FlexAttention's description of the causal mask: query q_idx may attend to key kv_idx."""
    return q_idx >= kv_idx


@functools.cache
def compiled_flex_attention():
    """`flex_attention` compiled once per process: uncompiled it falls back to the materialising math."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


class MHAFlexAttention(MHACombinedQKV):
    """FlexAttention: the attention pattern given as a Python function (`causal_mask_mod`), turned by
    `create_block_mask` into a map of which (query, key) blocks to compute, and by `torch.compile` into a fused
    kernel. No dropout on the weights (FlexAttention has none), and on the CPU no backward pass."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        if dropout:
            raise ValueError("FlexAttention has no dropout on the attention weights; use dropout=0.0")
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)
        self._block_masks: dict = {}  # (num_tokens, device) -> BlockMask, built once each

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_block_mask

        key = (queries.shape[2], str(queries.device))
        if key not in self._block_masks:
            self._block_masks[key] = create_block_mask(causal_mask_mod, B=None, H=None, Q_LEN=key[0],
                                                       KV_LEN=key[0], device=queries.device)
        return compiled_flex_attention()(queries, keys, values, block_mask=self._block_masks[key])


@functools.cache
def flex_attention_status(device: str = "cpu", backward: bool = False) -> str | None:
    """None when FlexAttention runs here, else why not, in one line.

    backward=False: compiled, forward only (torch >= 2.5; on the CPU `torch.compile` needs a C++ compiler; the
    first call compiles, seconds). backward=True: whether it has a backward pass on `device`, asked of the
    uncompiled function, so that a refusal cannot leave a broken entry in the compiled one's cache.
    """
    try:
        if backward:
            import warnings

            from torch.nn.attention.flex_attention import flex_attention

            q = torch.zeros(1, 1, 4, 8, device=device, requires_grad=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "called without torch.compile": fine for 4 tokens
                flex_attention(q, q, q).sum().backward()
        else:
            layer = MHAFlexAttention(8, 8, 4, 0.0, num_heads=2).to(device)
            with torch.no_grad():
                layer(torch.zeros(1, 4, 8, device=device))
    except Exception as exc:  # ImportError (older torch), a compiler error, NotImplementedError, ...
        text = str(exc).strip().splitlines()
        what = "backward" if backward else "compiled forward"
        return f"FlexAttention ({what}) does not run on {device} with torch {torch.__version__}: " \
               f"{type(exc).__name__}: {text[0] if text else ''}"
    return None


def _weight_views(m: nn.Module) -> Iterator[tuple[str, slice, torch.Tensor]]:
    """(MultiHeadAttention's name, rows of it, a view of m's tensor holding them), for every weight of `m`."""
    names = ("W_query", "W_key", "W_value")
    if isinstance(m, MultiHeadAttentionWrapper):  # one CausalAttention per head: rows h * head_dim ...
        head_dim = m.heads[0].d_out
        for h, head in enumerate(m.heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            for name in names:
                layer = getattr(head, name)
                yield f"{name}.weight", rows, layer.weight
                if layer.bias is not None:
                    yield f"{name}.bias", rows, layer.bias
        out = m.out_proj
    elif hasattr(m, "qkv") or hasattr(m, "attn"):  # stacked rows: qkv (ours, ch03's), nn.MultiheadAttention
        weight, bias = (m.qkv.weight, m.qkv.bias) if hasattr(m, "qkv") else (m.attn.in_proj_weight,
                                                                             m.attn.in_proj_bias)
        d_out = weight.shape[0] // 3
        for i, name in enumerate(names):
            yield f"{name}.weight", slice(None), weight[i * d_out:(i + 1) * d_out]
            if bias is not None:
                yield f"{name}.bias", slice(None), bias[i * d_out:(i + 1) * d_out]
        out = m.attn.out_proj if hasattr(m, "attn") else getattr(m, "out_proj", None) or m.proj
    else:  # one Linear per query/key/value: MultiHeadAttention, MHAEinsum
        for name in names:
            layer = getattr(m, name)
            yield f"{name}.weight", slice(None), layer.weight
            if layer.bias is not None:
                yield f"{name}.bias", slice(None), layer.bias
        out = m.out_proj
    yield "out_proj.weight", slice(None), out.weight
    yield "out_proj.bias", slice(None), out.bias


def reference_state_dict(m: nn.Module, grad: bool = False) -> dict[str, torch.Tensor]:
    """m's weights (grad=True: their gradients) under the names and shapes of `MultiHeadAttention`'s state dict."""
    if grad:  # a copy whose weights are m's gradients, read through the same views
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]
        m = copy.deepcopy(m)
        for p, g in zip(m.parameters(), grads):
            p.data = g
    parts: dict[str, list[torch.Tensor]] = {}
    for name, _, view in _weight_views(m):
        parts.setdefault(name, []).append(view.detach())  # the wrapper's heads, in row order
    return {name: torch.cat(p) for name, p in parts.items()}


@torch.no_grad()
def copy_weights(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copy src's weights into dst, whatever layout each stores them in; returns dst."""
    state = reference_state_dict(src)
    views = list(_weight_views(dst))
    if {name for name, _, _ in views} != set(state):
        raise ValueError("src and dst differ in their biases (qkv_bias) or layout: "
                         f"{sorted(state)} vs {sorted({name for name, _, _ in views})}")
    for name, rows, view in views:
        view.copy_(state[name][rows])
    return dst
