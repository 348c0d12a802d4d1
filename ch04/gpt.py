"""Chapter 4: a GPT-2-shaped language model, built from the pieces the chapter introduces.

LayerNorm -> GELU -> FeedForward -> TransformerBlock (pre-norm, shortcut
connections) -> GPTModel, then greedy generation with `generate_text_simple`.
Attention comes from chapter 3 (`ch03.attention.MultiHeadAttention`). Bonus:
`GPTModelFast`, the same model on chapter 3's `PyTorchMultiHeadAttention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch03.attention import MultiHeadAttention, PyTorchMultiHeadAttention

GPT_CONFIG_124M = {
    "vocab_size": 50257,     # GPT-2 BPE vocabulary (chapter 2)
    "context_length": 1024,  # longest sequence the positional embedding covers
    "emb_dim": 768,          # width of every token vector
    "n_heads": 12,           # attention heads per block
    "n_layers": 12,          # transformer blocks
    "drop_rate": 0.1,        # dropout on embeddings, attention weights and shortcuts
    "qkv_bias": False,       # bias in the query/key/value projections (OpenAI's weights use True)
}

# A small model of the same shape for quick mode and tests (chapter 5 trains it in about a minute on
# a laptop CPU): GPT-2's vocabulary, 2 blocks of width 128 with 4 heads, context 64.
QUICK_CONFIG = {**GPT_CONFIG_124M, "context_length": 64, "emb_dim": 128, "n_heads": 4, "n_layers": 2}

# Optional keys: "drop_rate_emb", "drop_rate_attn", "drop_rate_shortcut" override drop_rate
# per place (exercise 4.3); "tie_weights" shares the token embedding with the output head;
# "use_sdpa" picks the attention implementation (default: fused kernel).
REQUIRED_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")

# The other GPT-2 sizes differ only in width, depth and heads.
GPT2_SIZES = {
    "gpt2": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},          # 124M
    "gpt2-medium": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},  # 355M
    "gpt2-large": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},   # 774M
    "gpt2-xl": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},      # 1558M
}


def check_config(cfg: dict) -> None:
    """Fail early, naming the missing key, instead of a KeyError deep inside a layer."""
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise KeyError(f"GPT config is missing {missing}; start from {{**GPT_CONFIG_124M, ...}}")


class LayerNorm(nn.Module):
    """Normalise each token vector to mean 0 / variance 1, then scale and shift (section 4.2).

    Computes (x - mean) / sqrt(var + eps) * scale + shift with the biased variance,
    as GPT-2 does; `F.layer_norm` runs exactly that formula in one fused kernel.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # New: PyTorch's fused kernel runs the book's three lines (mean, biased variance, scale/shift) in one op
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU with GPT-2's tanh approximation (section 4.3):
    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), run as one fused op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")  # New: the same tanh formula as one fused op


def gelu_formula(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation written out, for the chapter's comparison and tests."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class FeedForward(nn.Module):
    """Expand to 4x the width, GELU, project back (section 4.3)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm attention and feed-forward, each wrapped in a shortcut (sections 4.4-4.5)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            dropout=cfg.get("drop_rate_attn", cfg["drop_rate"]),  # New: optional rate of its own (exercise 4.3)
            num_heads=cfg["n_heads"],
            qkv_bias=cfg["qkv_bias"],
            use_sdpa=cfg.get("use_sdpa", True),  # New: PyTorch's fused attention kernel by default
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg.get("drop_rate_shortcut", cfg["drop_rate"]))  # New: as drop_rate_attn

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:  # New: use_cache (chapter 5)
        # x: (b, num_tokens, emb_dim) in and out; the book's shortcut = x ... x = x + shortcut, in one line each
        x = x + self.drop_shortcut(self.att(self.norm1(x), use_cache=use_cache))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """Token + position embeddings, a stack of transformer blocks, final norm, output head (section 4.6).

    `forward(in_idx)` returns logits of shape (batch, num_tokens, vocab_size).
    With `use_cache=True` the attention layers keep keys/values, so the next call
    only passes the new tokens; `reset_kv_cache()` starts over.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        check_config(cfg)  # New: name a missing config key up front
        self.cfg = dict(cfg)  # New: kept for saving and for generation
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg.get("drop_rate_emb", cfg["drop_rate"]))  # New: optional rate (exercise 4.3)
        # New: ModuleList (not Sequential) so `use_cache` can be passed to each block;
        # parameter names (trf_blocks.0.att.W_query.weight, ...) are the same.
        self.trf_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        if cfg.get("tie_weights", False):  # New: GPT-2's weight tying, optional
            # nn.Embedding starts at N(0, 1), far too large for an output head (initial loss
            # would be ~35 instead of ~11); GPT-2 initialises the shared matrix with std 0.02.
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=0.02)
            self.tie_weights()
        self.current_pos = 0  # New: how many tokens the KV cache already holds

    def tie_weights(self) -> None:
        """Share one matrix between the token embedding and the output head, as GPT-2 does.

        This is the same Parameter object, not a copy: training updates both uses.
        """
        self.out_head.weight = self.tok_emb.weight

    def reset_kv_cache(self) -> None:
        for block in self.trf_blocks:
            block.att.reset_cache()
        self.current_pos = 0

    def _check_input(self, in_idx: torch.Tensor, past: int) -> None:
        if in_idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, num_tokens), got {tuple(in_idx.shape)}")
        num_tokens = in_idx.shape[1]
        limit = self.cfg["context_length"]
        if past + num_tokens > limit:
            raise ValueError(
                f"sequence length {past + num_tokens} ({past} cached + {num_tokens} new) exceeds the model's "
                f"context_length {limit}; crop the input to its last {limit - past} tokens"
            )
        if in_idx.numel():
            lo, hi = int(in_idx.min()), int(in_idx.max())
            vocab = self.cfg["vocab_size"]
            if lo < 0 or hi >= vocab:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is out of range for vocab_size {vocab} (valid ids: 0..{vocab - 1})")

    def forward(self, in_idx: torch.Tensor, use_cache: bool = False) -> torch.Tensor:  # New: use_cache
        past = self.current_pos if use_cache else 0  # New: positions continue after the cached tokens
        self._check_input(in_idx, past)  # New: clear errors for a too-long input or a bad token id
        num_tokens = in_idx.shape[1]
        pos = torch.arange(past, past + num_tokens, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos))  # (b, num_tokens, emb_dim)
        for block in self.trf_blocks:
            x = block(x, use_cache=use_cache)
        if use_cache:
            self.current_pos += num_tokens
        x = self.final_norm(x)
        return self.out_head(x)  # (b, num_tokens, vocab_size)


class GPTModelFast(GPTModel):
    """The book repository's `GPTModelFast`: `GPTModel` with every block's attention on
    `PyTorchMultiHeadAttention` (fused Q/K/V projection, `scaled_dot_product_attention`).

    Our LayerNorm and GELU already run PyTorch's fused kernels, so attention is the only part
    that changes. Same outputs as `GPTModel` for the same weights (with each block's
    W_query/W_key/W_value stacked into `att.qkv` and `att.out_proj` as `att.proj`), and the
    same KV cache (`use_cache=True`, `reset_kv_cache()`).

    Under the same seed it also starts from the book's `GPTModelFast` weights: the book builds
    the fused layers directly, drawing the numbers `GPTModel` draws in the same order (without
    Q/K/V biases, `qkv` holds exactly `GPTModel`'s W_query, W_key and W_value). Building
    `GPTModel` first and then replacing attention would draw twice, so the weights are drawn
    again from the generator's starting state, module by module in the book's order.
    """

    def __init__(self, cfg: dict):
        start = torch.random.get_rng_state()
        super().__init__(cfg)
        for block in self.trf_blocks:
            block.att = PyTorchMultiHeadAttention(
                d_in=cfg["emb_dim"],
                d_out=cfg["emb_dim"],
                num_heads=cfg["n_heads"],
                dropout=cfg.get("drop_rate_attn", cfg["drop_rate"]),
                qkv_bias=cfg["qkv_bias"],
                context_length=cfg["context_length"],
            )
        torch.random.set_rng_state(start)
        # Registration order (tok_emb, pos_emb, each block's qkv, proj, feed-forward, ..., out_head)
        # is the book's construction order; the replaced attention kept its place in each block.
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters") and next(module.parameters(False), None) is not None:
                module.reset_parameters()
        if cfg.get("tie_weights", False):  # as GPTModel: GPT-2's small start for the shared matrix
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=0.02)


def generate_text_simple(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    """Greedy decoding: append the most likely next token `max_new_tokens` times (section 4.7).

    Only the last `context_size` tokens are fed to the model, so any prompt length works.
    """
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (b, 1)
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters())


def model_size_mb(model: nn.Module, dtype: torch.dtype = torch.float32) -> float:
    """Memory the parameters take, in MB (2**20 bytes)."""
    bytes_per = torch.tensor([], dtype=dtype).element_size()
    return count_parameters(model) * bytes_per / (1024 * 1024)
