"""Chapter 5 bonus: from GPT-2 to Llama 3.2, built on chapter 4's GPTModel layout.

Four changes turn chapter 4's GPT into Llama 3 (the notebook `gpt-to-llama.ipynb` makes them
one at a time):

    LayerNorm                  -> RMSNorm (no mean, no shift)
    GELU feed-forward          -> SwiGLU (a gated SiLU with three projections)
    absolute position vectors  -> rotary position embeddings (RoPE) with Llama 3's frequency scaling
    multi-head attention       -> grouped-query attention (several query heads share a key/value head)

The modules keep the book's names (`tok_emb`, `trf_blocks`, `att.W_query`, `ff.fc1`, `final_norm`,
`out_head`) and the same KV-cache interface as `GPTModel` (`forward(idx, use_cache=True)`,
`reset_kv_cache()`), so chapter 5's `generate` runs Llama unchanged. Loading a Hugging Face
model folder (config.json, safetensors, tokenizer.json; local or from the Hub) and the chat
format are at the end; `ch05.llama.qwen3` reuses all of it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch03.attention import MultiHeadAttention
from ch04.gpt import GPTModel
from llmfs.checkpoint import CheckpointFileError, check_model_config, check_state_dict, read_config_json
from llmfs.download import HubUnavailable, from_hub
from llmfs.errors import InvalidInput, UserError

LLAMA32_CONFIG_1B = {
    "vocab_size": 128_256,       # Llama 3's tiktoken-style BPE vocabulary
    "context_length": 131_072,   # longest sequence RoPE is scaled for (pass a smaller one to save memory)
    "emb_dim": 2048,             # width of every token vector
    "n_heads": 32,               # query heads per block
    "n_layers": 16,              # transformer blocks
    "hidden_dim": 8192,          # width inside the SwiGLU feed-forward
    "n_kv_groups": 8,            # key/value heads; each serves n_heads // n_kv_groups query heads
    "rope_base": 500_000.0,      # RoPE's theta: the longest wavelength grows with it
    "rope_freq": {               # Llama 3's scaling of the low RoPE frequencies
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_context_length": 8192,
    },
    "norm_eps": 1e-5,            # RMSNorm's epsilon
    "tie_weights": True,         # output head shares the token embedding (the 1B and 3B models do)
    "dtype": torch.bfloat16,     # the published weights are bfloat16
}

LLAMA32_CONFIG_3B = {**LLAMA32_CONFIG_1B, "emb_dim": 3072, "n_heads": 24, "n_layers": 28}

REQUIRED_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "hidden_dim",
                 "n_kv_groups", "rope_base")


def check_config(cfg: dict) -> None:
    """Fail early, naming the missing key, instead of a KeyError deep inside a layer."""
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise KeyError(f"Llama config is missing {missing}; start from {{**LLAMA32_CONFIG_1B, ...}}")
    head_dim = cfg.get("head_dim") or cfg["emb_dim"] // cfg["n_heads"]
    if cfg["n_heads"] % cfg["n_kv_groups"]:
        raise ValueError(f"n_heads ({cfg['n_heads']}) must be a multiple of n_kv_groups ({cfg['n_kv_groups']})")
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of dimensions: head_dim must be even, got {head_dim}")


# --- Building blocks ---------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """LayerNorm without the mean and the shift (replaces ch04's LayerNorm).

    x / sqrt(mean(x^2) + eps) * scale: one statistic instead of two, and no bias. Computed in
    float32 whatever the input dtype, then cast back before the scale, as Llama's reference code does.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) in float32 (New: a method of its own, for Gemma 3's variant of the scale)."""
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.normalized(x).to(x.dtype)


class FeedForward(nn.Module):
    """SwiGLU (replaces ch04's GELU feed-forward): silu(fc1(x)) gates fc2(x), fc3 projects back.

    Three matrices instead of two, so hidden_dim is usually ~8/3 emb_dim rather than 4x.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        dtype = cfg.get("dtype")
        self.fc1 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False, dtype=dtype)  # gate
        self.fc2 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False, dtype=dtype)  # up
        self.fc3 = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], bias=False, dtype=dtype)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.silu(self.fc1(x)) * self.fc2(x))


def compute_rope_params(head_dim: int, theta_base: float = 10_000.0, context_length: int = 4096,
                        freq_config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (context_length, head_dim) for rotary position embeddings.

    Dimension pair i turns by angle position * theta_base^(-2i/head_dim). Llama 3 (freq_config)
    slows the low frequencies, those whose wavelength exceeds the original training context,
    by `factor`, keeps the high ones, and blends in between, so longer texts stay in range.
    """
    inv_freq = 1.0 / theta_base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if freq_config is not None and freq_config.get("rope_type") == "linear":
        # New: linear scaling (Gemma 3's global layers): every frequency slowed by the same factor
        inv_freq = inv_freq / freq_config["factor"]
    elif freq_config is not None:
        old_len = freq_config["original_context_length"]
        low_wavelen = old_len / freq_config["low_freq_factor"]
        high_wavelen = old_len / freq_config["high_freq_factor"]
        wavelen = 2 * torch.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / freq_config["factor"], inv_freq)
        smooth = (old_len / wavelen - freq_config["low_freq_factor"]) / (
            freq_config["high_freq_factor"] - freq_config["low_freq_factor"])
        blended = (1 - smooth) * scaled / freq_config["factor"] + smooth * scaled
        medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(medium, blended, scaled)
    positions = torch.arange(context_length, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]  # (context_length, head_dim // 2)
    angles = torch.cat([angles, angles], dim=1)  # (context_length, head_dim): first and second half pair up
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + head_dim/2]) pair of x (b, heads, num_tokens, head_dim) by its angle.

    cos/sin: (num_tokens, head_dim), the rows of the tokens' positions.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class GroupedQueryAttention(nn.Module):
    """Causal attention where groups of query heads share one key/value head (replaces ch03's MHA).

    With n_kv_groups < num_heads the key/value projections and the KV cache shrink by
    num_heads / n_kv_groups. No dropout and no biases (Llama uses neither). Positions enter
    through RoPE on queries and keys, so cached keys keep their rotation.
    """

    def __init__(self, d_in: int, num_heads: int, num_kv_groups: int, head_dim: int | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if num_heads % num_kv_groups:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_groups ({num_kv_groups})")
        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.head_dim = head_dim or d_in // num_heads
        self.d_out = num_heads * self.head_dim
        self.W_query = nn.Linear(d_in, self.d_out, bias=False, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=False, dtype=dtype)
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None
        # New (for Gemma 3): a sliding window (each query sees only the last `sliding_window` positions,
        # itself included) and the score scale (None: 1 / sqrt(head_dim)); Llama and Qwen3 use neither.
        self.sliding_window: int | None = None
        self.scale: float | None = None

    # The KV cache works as in chapter 3's MultiHeadAttention (cache_k/cache_v, grown by torch.cat).
    reset_cache = MultiHeadAttention.reset_cache
    cache_len = MultiHeadAttention.cache_len

    def normalize_qk(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama leaves queries and keys as they are; Qwen3 normalises them here."""
        return queries, keys

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        past = self.cache_len if use_cache else 0
        # (b, num_tokens, heads * head_dim) -> (b, heads, num_tokens, head_dim)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        queries, keys = self.normalize_qk(queries, keys)
        queries, keys = apply_rope(queries, cos, sin), apply_rope(keys, cos, sin)
        if use_cache:
            if self.cache_k is not None:
                keys = torch.cat([self.cache_k, keys], dim=2)  # (b, n_kv_groups, past + num_tokens, head_dim)
                values = torch.cat([self.cache_v, values], dim=2)
            self.cache_k, self.cache_v = keys, values
        window = self.sliding_window if self.sliding_window and past + num_tokens > self.sliding_window else None
        if window is None and (past == 0 or num_tokens == 1):
            # Causal square, or one new token that may see every cached key: no explicit mask.
            context = F.scaled_dot_product_attention(queries, keys, values, is_causal=past == 0 and num_tokens > 1,
                                                     scale=self.scale, enable_gqa=True)
        else:
            # Query i sits at position past + i and may see keys 0 .. past + i (True = may attend).
            allowed = torch.ones(num_tokens, past + num_tokens, dtype=torch.bool, device=x.device).tril(past)
            if window is not None:  # New: ... and, in a sliding window, only keys past + i - window + 1 .. past + i
                allowed = allowed.triu(past - window + 1)
            context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed, scale=self.scale,
                                                     enable_gqa=True)
        # (b, num_heads, num_tokens, head_dim) -> (b, num_tokens, num_heads * head_dim)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward with shortcuts, as in chapter 4, with Llama's parts."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.att = self.make_attention(cfg)
        self.ff = self.make_feed_forward(cfg)
        self.norm1 = RMSNorm(cfg["emb_dim"], eps=cfg.get("norm_eps", 1e-5))
        self.norm2 = RMSNorm(cfg["emb_dim"], eps=cfg.get("norm_eps", 1e-5))

    def make_attention(self, cfg: dict) -> nn.Module:
        return GroupedQueryAttention(cfg["emb_dim"], cfg["n_heads"], cfg["n_kv_groups"], cfg.get("head_dim"),
                                     dtype=cfg.get("dtype"))

    def make_feed_forward(self, cfg: dict) -> nn.Module:
        return FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        # x: (b, num_tokens, emb_dim) in and out; no dropout: these models are only run, not trained here
        x = x + self.att(self.norm1(x), cos, sin, use_cache=use_cache)
        return x + self.ff(self.norm2(x))


class Llama3Model(nn.Module):
    """Token embedding, transformer blocks, final RMSNorm, output head; no position embedding.

    Same interface as `GPTModel`: `forward(in_idx, use_cache=False)` -> logits (b, num_tokens,
    vocab_size), `reset_kv_cache()`, `cfg`, so `ch05.gpt_generate.generate` runs it.
    """

    block_cls = TransformerBlock

    def __init__(self, cfg: dict):
        super().__init__()
        check_config(cfg)
        self.cfg = dict(cfg)
        dtype = cfg.get("dtype")
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=dtype)
        self.trf_blocks = nn.ModuleList([self.make_block(cfg, i) for i in range(cfg["n_layers"])])
        self.final_norm = RMSNorm(cfg["emb_dim"], eps=cfg.get("norm_eps", 1e-5))
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=dtype)
        if cfg.get("tie_weights", False):
            self.tie_weights()
        self.init_rope()
        self.current_pos = 0  # how many tokens the KV cache already holds

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE tables, on the CPU (or `device`) even inside `with torch.device("meta")`,
        since they are computed, not loaded."""
        head_dim = self.cfg.get("head_dim") or self.cfg["emb_dim"] // self.cfg["n_heads"]
        with torch.device(device or "cpu"):
            cos, sin = compute_rope_params(head_dim, self.cfg["rope_base"], self.cfg["context_length"],
                                           self.cfg.get("rope_freq"))
        self.register_buffer("cos", cos, persistent=False)  # (context_length, head_dim), float32
        self.register_buffer("sin", sin, persistent=False)

    def make_block(self, cfg: dict, index: int) -> nn.Module:
        """New: block `index` (all alike here; Gemma 3's differ: sliding-window or global attention)."""
        return self.block_cls(cfg)

    def rope_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """New: the (cos, sin) tables by name; a block's `rope_table` attribute picks its own
        (Llama and Qwen3 have one, Gemma 3 a second one for its sliding-window layers)."""
        return {"global": (self.cos, self.sin)}

    def embed(self, in_idx: torch.Tensor) -> torch.Tensor:
        """New: the token vectors (b, num_tokens, emb_dim); Gemma 3 scales them."""
        return self.tok_emb(in_idx)

    def tie_weights(self) -> None:
        """One Parameter for the token embedding and the output head (as in `GPTModel.tie_weights`)."""
        self.out_head.weight = self.tok_emb.weight

    def reset_kv_cache(self) -> None:
        for block in self.trf_blocks:
            block.att.reset_cache()
        self.current_pos = 0

    def forward(self, in_idx: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        past = self.current_pos if use_cache else 0
        GPTModel._check_input(self, in_idx, past)  # same shape/context/vocab checks as chapter 4's model
        num_tokens = in_idx.shape[1]
        x = self.embed(in_idx)  # (b, num_tokens, emb_dim)
        # The rows of the tokens' positions, (num_tokens, head_dim), of each RoPE table
        tables = {name: (cos[past:past + num_tokens].to(x.dtype), sin[past:past + num_tokens].to(x.dtype))
                  for name, (cos, sin) in self.rope_tables().items()}
        for block in self.trf_blocks:
            x = block(x, *tables[getattr(block, "rope_table", "global")], use_cache=use_cache)
        if use_cache:
            self.current_pos += num_tokens
        return self.out_head(self.final_norm(x))  # (b, num_tokens, vocab_size)


# --- Hugging Face model folders ----------------------------------------------------------------

def _rope_freq_from_hf(hf: dict) -> dict | None:
    """Llama 3's rope scaling from config.json: `rope_parameters` (transformers 5) or `rope_scaling` (4.x)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise InvalidInput(f"config.json asks for rope_type {kind!r}; only 'default' and 'llama3' are implemented")
    try:
        return {"factor": float(rope["factor"]), "low_freq_factor": float(rope["low_freq_factor"]),
                "high_freq_factor": float(rope["high_freq_factor"]),
                "original_context_length": int(rope.get("original_max_position_embeddings",
                                                        hf.get("max_position_embeddings")))}
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"config.json: the llama3 rope scaling lacks or mistypes {exc}") from None


def _rope_base_from_hf(hf: dict) -> float:
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise InvalidInput(f"config.json: rope_theta {theta!r} is not a number")
    return float(theta)


# The keys of a Hugging Face config.json that `config_from_hf` needs.
HF_REQUIRED = ("vocab_size", "max_position_embeddings", "hidden_size", "num_attention_heads", "num_hidden_layers",
               "intermediate_size")


def config_from_hf(hf: dict, source: str = "config.json") -> dict:
    """Our config dict from a Hugging Face config.json of a Llama, Qwen3 or Qwen3-MoE model.

    A file that lacks a size, gives one of the wrong type, or describes something these models
    cannot be raises InvalidInput (one line from a command) naming `source`."""
    if not isinstance(hf, dict):
        raise InvalidInput(f"{source} holds a {type(hf).__name__}, not a Hugging Face config (an object)")
    if hf.get("hidden_act", "silu") != "silu":
        raise InvalidInput(f"{source}: hidden_act {hf['hidden_act']!r}; these models use SwiGLU (silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise InvalidInput(f"{source}: attention_bias/mlp_bias are set; Llama 3 and Qwen3 have no biases")
    missing = [k for k in HF_REQUIRED if k not in hf]
    if missing:
        raise InvalidInput(f"{source} lacks {missing}: not a Llama or Qwen3 config.json")
    for key in (*HF_REQUIRED, "num_key_value_heads", "head_dim"):  # whole numbers, before any arithmetic
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidInput(f"{source}: {key} = {value!r} is not a whole number >= 1")
    cfg = {
        "vocab_size": hf["vocab_size"], "context_length": hf["max_position_embeddings"],
        "emb_dim": hf["hidden_size"], "n_heads": hf["num_attention_heads"], "n_layers": hf["num_hidden_layers"],
        "hidden_dim": hf["intermediate_size"], "n_kv_groups": hf.get("num_key_value_heads", hf["num_attention_heads"]),
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        "rope_base": _rope_base_from_hf(hf), "norm_eps": hf.get("rms_norm_eps", 1e-5),
        "tie_weights": bool(hf.get("tie_word_embeddings", False)),
    }
    if (freq := _rope_freq_from_hf(hf)) is not None:
        cfg["rope_freq"] = freq
    check_model_config(cfg, source, REQUIRED_KEYS)
    try:
        check_config(cfg)
    except ValueError as exc:  # check_config's own messages: a size these models cannot have
        raise InvalidInput(f"{source}: {exc}") from None
    return cfg


# Hugging Face tensor names -> ours (block-level names after "model.layers.{i}.").
_HF_RENAMES = [
    (r"^model\.embed_tokens\.weight$", "tok_emb.weight"),
    (r"^model\.norm\.weight$", "final_norm.scale"),
    (r"^lm_head\.weight$", "out_head.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$", r"trf_blocks.\1.att.W_query.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$", r"trf_blocks.\1.att.W_key.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.weight$", r"trf_blocks.\1.att.W_value.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$", r"trf_blocks.\1.att.out_proj.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.q_norm\.weight$", r"trf_blocks.\1.att.q_norm.scale"),
    (r"^model\.layers\.(\d+)\.self_attn\.k_norm\.weight$", r"trf_blocks.\1.att.k_norm.scale"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.weight$", r"trf_blocks.\1.norm1.scale"),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$", r"trf_blocks.\1.norm2.scale"),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$", r"trf_blocks.\1.ff.fc1.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.weight$", r"trf_blocks.\1.ff.fc2.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.weight$", r"trf_blocks.\1.ff.fc3.weight"),
    # Mixture of experts (Qwen3-MoE): the router and each expert's SwiGLU.
    (r"^model\.layers\.(\d+)\.mlp\.gate\.weight$", r"trf_blocks.\1.ff.gate.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight$", r"trf_blocks.\1.ff.fc1.\2.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.weight$", r"trf_blocks.\1.ff.fc2.\2.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.weight$", r"trf_blocks.\1.ff.fc3.\2.weight"),
]
_HF_RENAMES_COMPILED = [(re.compile(p), r) for p, r in _HF_RENAMES]
_HF_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # some older files store RoPE's frequencies


def hf_to_ours(name: str) -> str | None:
    """Our parameter name for a Hugging Face tensor name (the name itself when no rule fits)."""
    if _HF_IGNORED.search(name):
        return None
    for pattern, repl in _HF_RENAMES_COMPILED:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name  # left as is: check_state_dict reports it as unexpected


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a model folder: model.safetensors, or the shards its index lists."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [model_dir / f for f in sorted(set(weight_map.values()))]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointFileError(f"{index} is not a safetensors index (a JSON object with a 'weight_map' "
                                      f"of tensor -> file): {type(exc).__name__}: {exc}") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {model_dir}: {missing}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")


def load_hf_weights(model: nn.Module, model_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                    decoding_layout: bool = False) -> nn.Module:
    """Put a folder's safetensors into `model` (which may live on the meta device), without copies.

    safetensors memory-maps each file, so a tensor is a view of the file's pages, read only when
    first used; `load_state_dict(assign=True)` makes those tensors the parameters instead of
    copying them into freshly allocated ones. Only a dtype change (`dtype` differs from the
    file's) makes new tensors, one at a time. A tied output head ends up as the token embedding's
    Parameter itself. Every name and shape is checked before anything is assigned.

    `decoding_layout` stores the float32 linear weights the way `llmfs.decoding_layout` does (for
    CPU decoding), converting them one at a time like a dtype change.
    """
    from safetensors import safe_open

    from llmfs.decoding_layout import decoding_layout_enabled, laid_out_for_decoding

    rename = getattr(model, "hf_to_ours", hf_to_ours)  # New: Gemma 3 maps its norms' names its own way
    tied = model.cfg.get("tie_weights", False)
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    relayout = set()
    if decoding_layout and decoding_layout_enabled():
        relayout = linear | ({"tok_emb.weight"} if tied else set())
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(Path(model_dir)):
        _check_safetensors(file)
        to_convert = []
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if rename(name) is None:
                    continue
                t = f.get_tensor(name)  # a view of the mapped file: nothing read yet
                final_dtype = dtype or t.dtype
                # Only float32 weights get the decoding layout; everything else that keeps its
                # dtype stays a zero-copy view of the file.
                if final_dtype == t.dtype and not (rename(name) in relayout and final_dtype == torch.float32):
                    state[rename(name)] = t
                else:
                    to_convert.append(name)
        # A dtype change (or layout): convert tensor by tensor, each from a mapping of its own that
        # closes at once, so the file's pages do not all stay resident next to the converted copies.
        for name in to_convert:
            with safe_open(str(file), framework="pt") as f:
                t = f.get_tensor(name)
                t = t if dtype is None else t.to(dtype)
                state[rename(name)] = laid_out_for_decoding(t) if rename(name) in relayout else t
    if tied:
        if "out_head.weight" in state and "tok_emb.weight" in state:
            del state["out_head.weight"]  # a file may store the tied matrix twice; the embedding's copy wins
        state["out_head.weight"] = state.get("tok_emb.weight", state.get("out_head.weight"))
        state = {k: v for k, v in state.items() if v is not None}
    check_state_dict(model, state, source=str(model_dir))
    model.load_state_dict(state, assign=True)
    if tied:
        model.tie_weights()
    return model


def _check_safetensors(file: Path) -> None:
    """A weight file that safetensors cannot open raises CheckpointFileError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise CheckpointFileError(f"{file} is not a readable .safetensors file ({exc})") from None


class LLMUnavailable(UserError, RuntimeError):
    """A model named by Hub id could neither be downloaded nor found in the local cache."""


HF_ALLOW_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "*.safetensors", "model.safetensors.index.json"]


def resolve_model_dir(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local model folder for `spec`: the folder itself, or a Hub id ("Qwen/Qwen3-0.6B") downloaded
    with `huggingface_hub` into its cache (HF_ENDPOINT picks a mirror; HF_HUB_OFFLINE=1 uses only the cache).

    No wait lasts longer than `llmfs.download.NETWORK_WAIT_S` without data (the listing included); an
    endpoint that cannot be reached or stalls leaves the local cache, or LLMUnavailable in one line.
    """
    from ch05.gpt_download import _endpoint, _offline

    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    text = str(spec)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1 or "\\" in text:
        raise FileNotFoundError(f"no model folder at {text} (expected a folder with config.json, *.safetensors "
                                "and tokenizer.json, or a Hugging Face Hub id such as Qwen/Qwen3-0.6B)")
    import huggingface_hub

    try:
        return Path(from_hub(huggingface_hub.snapshot_download, _endpoint(), _offline(), repo_id=text,
                             allow_patterns=HF_ALLOW_PATTERNS, cache_dir=cache_dir))
    except HubUnavailable as exc:  # network, HTTP, gated repository, missing cache entry
        raise LLMUnavailable(
            f"model {text!r} is not available: {exc}. Ways to get it: with internet access it downloads "
            "automatically, and behind a firewall HF_ENDPOINT names a Hugging Face mirror; gated models (Llama) "
            "need `huggingface-cli login` after accepting the licence on the Hub; offline, download it once on a "
            "connected machine, copy its Hugging Face cache (HF_HOME) and set HF_HUB_OFFLINE=1 to use only that "
            "cache; or pass a local folder with config.json, the *.safetensors files and tokenizer.json"
        ) from exc


def read_hf_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json, so the model's family and sizes are unknown")
    return read_config_json(path)


def build_and_load(model_cls: type[nn.Module], cfg: dict, model_dir: str | os.PathLike,
                   dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                   decoding_layout: bool = False) -> nn.Module:
    """Build `model_cls(cfg)` on the meta device (no memory for weights), then give it the folder's weights.

    `decoding_layout`: lay the weights out for decoding on the CPU (llmfs.decoding_layout)."""
    with torch.device("meta"):
        model = model_cls(cfg)
    load_hf_weights(model, model_dir, dtype=dtype,
                    decoding_layout=decoding_layout and torch.device(device).type == "cpu")
    return model.to(device).eval()


def with_context_length(cfg: dict, context_length: int | None, model_dir) -> dict:
    """`cfg` with a shorter context (smaller RoPE tables, less memory); never a longer one than the model
    was trained for, where its answers would silently degrade."""
    if context_length is None:
        return cfg
    if context_length > cfg["context_length"]:
        raise InvalidInput(f"--context-length {context_length} is longer than the {cfg['context_length']} "
                           f"positions of the model in {model_dir}; give at most {cfg['context_length']}")
    return {**cfg, "context_length": context_length}


def load_llama3(model_dir_or_id: str | os.PathLike, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu", context_length: int | None = None,
                decoding_layout: bool = False) -> Llama3Model:
    """A Llama3Model with the weights of a Hugging Face Llama folder or Hub id, in eval mode.

    `dtype` None keeps the file's dtype (zero-copy); `context_length` shortens the RoPE tables;
    `decoding_layout` stores float32 linear weights for faster CPU decoding (llmfs.decoding_layout).
    """
    model_dir = resolve_model_dir(model_dir_or_id)
    hf = read_hf_config(model_dir)
    if hf.get("model_type") != "llama":
        raise InvalidInput(f"{model_dir}/config.json describes a {hf.get('model_type')!r} model, not 'llama'")
    cfg = with_context_length(config_from_hf(hf, f"{model_dir}/config.json"), context_length, model_dir)
    return build_and_load(Llama3Model, cfg, model_dir, dtype=dtype, device=device, decoding_layout=decoding_layout)


# --- Tokenizer and chat format -----------------------------------------------------------------

class Llama3Tokenizer:
    """The model folder's tokenizer.json (the `tokenizers` library) plus Llama 3's chat format.

    A chat turn is wrapped in header tokens; the model ends its answer with <|eot_id|>:

        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n
    """

    bos = "<|begin_of_text|>"
    stop_tokens = ("<|eot_id|>", "<|end_of_text|>")

    def __init__(self, tokenizer_file: str | os.PathLike):
        from tokenizers import Tokenizer

        path = Path(tokenizer_file)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the model folder needs its tokenizer.json "
                                    "(the Hugging Face fast-tokenizer file) to turn text into token ids")
        self.path = path
        self.tokenizer = Tokenizer.from_file(str(path))

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end a turn; generation stops before them."""
        return {i for t in self.stop_tokens if (i := self.token_id(t)) is not None}

    def encode(self, text: str, chat: bool = False, **chat_options) -> list[int]:
        """Token ids of plain text (after the begin-of-text token), or of a one-turn chat prompt."""
        text = self.chat_prompt(text, **chat_options) if chat else self.plain_prompt(text)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def plain_prompt(self, text: str) -> str:
        return (self.bos if self.token_id(self.bos) is not None else "") + text

    @classmethod
    def chat_prompt(cls, message: str, system: str | None = None) -> str:
        """The prompt text of one user turn (no file needed: a class method)."""
        parts = [cls.bos]
        if system:
            parts.append(f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>")
        parts.append(f"<|start_header_id|>user<|end_header_id|>\n\n{message}<|eot_id|>")
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(parts)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
