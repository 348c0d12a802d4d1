"""Chapter 5 bonus: Gemma 3 (text), from the Llama 3 and Qwen3 parts of `ch05.llama.llama3` and `.qwen3`.

Gemma 3's text models are Qwen3 (grouped-query attention with QK-norm, RoPE, a gated
feed-forward, a tied output head) with these changes:

    RMSNorm's scale            -> (1 + weight), the weight stored around 0, applied in float32
    SwiGLU                     -> GeGLU: the gate is GELU (tanh approximation) instead of SiLU
    pre-norm blocks            -> pre- and post-norms: attention's and the feed-forward's outputs are
                                  normalised again before they join the shortcut (four norms a block)
    token embedding            -> multiplied by sqrt(emb_dim) (rounded to the model's dtype)
    attention everywhere       -> five sliding-window layers (each token sees the last `sliding_window`
                                  tokens) for one global layer; `layer_types` in config.json says which
    one RoPE                   -> two: theta 10,000 for the sliding layers, 1,000,000 (with linear
                                  scaling in the 4B and larger models) for the global ones
    1 / sqrt(head_dim)         -> 1 / sqrt(query_pre_attn_scalar) scales the attention scores

The chat format is `<start_of_turn>user ... <end_of_turn>` / `<start_of_turn>model`, after <bos>.
Everything else (attention with its KV cache, loading a Hugging Face folder through memory-mapped
safetensors, tokenizer.json) is imported.
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch05.llama.llama3 import (
    FeedForward,
    Llama3Tokenizer,
    RMSNorm,
    build_and_load,
    compute_rope_params,
    config_from_hf,
    hf_to_ours,
    read_hf_config,
    resolve_model_dir,
    with_context_length,
)
from ch05.llama.qwen3 import Qwen3Attention, Qwen3Block, Qwen3Model
from llmfs.errors import InvalidInput

GEMMA3_CONFIG_1B = {
    "vocab_size": 262_144,            # SentencePiece-style vocabulary shared with Gemini
    "context_length": 32_768,         # longest sequence (pass a smaller one to save memory)
    "emb_dim": 1152,                  # width of every token vector
    "n_heads": 4,                     # query heads per block
    "n_layers": 26,                   # transformer blocks
    "hidden_dim": 6912,               # width inside the GeGLU feed-forward
    "head_dim": 256,                  # set on its own: n_heads * head_dim need not equal emb_dim
    "qk_norm": True,                  # RMSNorm on queries and keys, as in Qwen3
    "n_kv_groups": 1,                 # key/value heads (multi-query attention in the 1B model)
    "rope_base": 1_000_000.0,         # RoPE theta of the global layers
    "rope_local_base": 10_000.0,      # RoPE theta of the sliding-window layers
    "sliding_window": 512,            # tokens a sliding-window layer sees (itself included)
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],  # repeated: 5 local, 1 global
    "query_pre_attn_scalar": 256,     # attention scores are scaled by its inverse square root
    "norm_eps": 1e-6,                 # RMSNorm's epsilon
    "tie_weights": True,              # the output head is the token embedding
    "dtype": torch.bfloat16,          # the published weights are bfloat16
}
GEMMA3_CONFIG_1B["layer_types"] = (GEMMA3_CONFIG_1B["layer_types"] * 5)[:26]

GEMMA3_CONFIGS = {
    "1B": GEMMA3_CONFIG_1B,
    # The text part of the 4B, 12B and 27B models (their config.json nests it under text_config).
    "4B": {**GEMMA3_CONFIG_1B, "vocab_size": 262_208, "context_length": 131_072, "emb_dim": 2560, "n_heads": 8,
           "n_layers": 34, "hidden_dim": 10240, "n_kv_groups": 4, "sliding_window": 1024,
           "rope_freq": {"rope_type": "linear", "factor": 8.0},
           "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5 + ["sliding_attention"] * 4},
}

LAYER_TYPES = ("sliding_attention", "full_attention")


class GemmaRMSNorm(RMSNorm):
    """RMSNorm whose scale is (1 + weight): the stored weight starts at 0. The product is taken in
    float32 and only then cast back (Llama casts first), as Gemma's reference code does."""

    def __init__(self, emb_dim: int, eps: float = 1e-6):
        super().__init__(emb_dim, eps)
        self.scale = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.normalized(x) * (1.0 + self.scale.float())).to(x.dtype)


class GeGLUFeedForward(FeedForward):
    """SwiGLU's three matrices with GELU (tanh approximation) as the gate instead of SiLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc1(x), approximate="tanh") * self.fc2(x))


class Gemma3Attention(Qwen3Attention):
    """Qwen3's attention (GQA, QK-norm) with Gemma's norms, its score scale and, in the
    sliding-window layers, the window."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.q_norm = GemmaRMSNorm(self.head_dim, eps=cfg.get("norm_eps", 1e-6))
        self.k_norm = GemmaRMSNorm(self.head_dim, eps=cfg.get("norm_eps", 1e-6))
        self.scale = cfg["query_pre_attn_scalar"] ** -0.5
        if cfg["layer_type"] == "sliding_attention":
            self.sliding_window = cfg["sliding_window"]


class Gemma3Block(Qwen3Block):
    """Norms before and after attention and the feed-forward:

        x = x + post_att_norm(att(norm1(x)))
        x = x + post_ff_norm(ff(norm2(x)))

    `cfg["layer_type"]` makes it a sliding-window block (local RoPE table) or a global one."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        eps = cfg.get("norm_eps", 1e-6)
        self.norm1 = GemmaRMSNorm(cfg["emb_dim"], eps=eps)
        self.norm2 = GemmaRMSNorm(cfg["emb_dim"], eps=eps)
        self.post_att_norm = GemmaRMSNorm(cfg["emb_dim"], eps=eps)
        self.post_ff_norm = GemmaRMSNorm(cfg["emb_dim"], eps=eps)
        self.rope_table = "local" if cfg["layer_type"] == "sliding_attention" else "global"

    def make_attention(self, cfg: dict) -> nn.Module:
        return Gemma3Attention(cfg)

    def make_feed_forward(self, cfg: dict) -> nn.Module:
        return GeGLUFeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        x = x + self.post_att_norm(self.att(self.norm1(x), cos, sin, use_cache=use_cache))
        return x + self.post_ff_norm(self.ff(self.norm2(x)))


class Gemma3Model(Qwen3Model):
    """Llama3Model's forward, cache and generation interface with Gemma 3's blocks, two RoPE tables,
    scaled embedding and final norm (and, if a config asks for it, tanh soft-capping of the logits)."""

    block_cls = Gemma3Block

    def __init__(self, cfg: dict):
        check_gemma3_config(cfg)
        super().__init__(cfg)
        self.final_norm = GemmaRMSNorm(cfg["emb_dim"], eps=cfg.get("norm_eps", 1e-6))

    def make_block(self, cfg: dict, index: int) -> nn.Module:
        return self.block_cls({**cfg, "layer_type": cfg["layer_types"][index]})

    def init_rope(self, device: torch.device | str | None = None) -> None:
        super().init_rope(device)  # the global table: rope_base and rope_freq
        head_dim = self.cfg.get("head_dim") or self.cfg["emb_dim"] // self.cfg["n_heads"]
        with torch.device(device or "cpu"):
            cos, sin = compute_rope_params(head_dim, self.cfg["rope_local_base"], self.cfg["context_length"])
        self.register_buffer("cos_local", cos, persistent=False)
        self.register_buffer("sin_local", sin, persistent=False)

    def rope_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"global": (self.cos, self.sin), "local": (self.cos_local, self.sin_local)}

    def embed(self, in_idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(in_idx)
        return x * torch.tensor(self.cfg["emb_dim"] ** 0.5, dtype=x.dtype)  # the factor rounded to x's dtype

    def forward(self, in_idx: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        logits = super().forward(in_idx, use_cache=use_cache)
        if (cap := self.cfg.get("final_logit_softcapping")) is not None:  # None in Gemma 3 (Gemma 2 used 30)
            logits = torch.tanh(logits / cap) * cap
        return logits

    @staticmethod
    def hf_to_ours(name: str) -> str | None:
        return gemma3_hf_to_ours(name)


def check_gemma3_config(cfg: dict) -> None:
    missing = [k for k in ("rope_local_base", "sliding_window", "layer_types", "query_pre_attn_scalar") if k not in cfg]
    if missing:
        raise KeyError(f"Gemma 3 config is missing {missing}; start from {{**GEMMA3_CONFIG_1B, ...}}")
    if len(cfg["layer_types"]) != cfg["n_layers"] or not set(cfg["layer_types"]) <= set(LAYER_TYPES):
        raise ValueError(f"layer_types must name {LAYER_TYPES} for each of the {cfg['n_layers']} layers")


# Where Gemma's names differ from Llama's: `post_attention_layernorm` is a real post-norm here,
# and the feed-forward has a pre-norm and a post-norm of its own.
_GEMMA_RENAMES = [(re.compile(p), r) for p, r in [
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$", r"trf_blocks.\1.post_att_norm.scale"),
    (r"^model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight$", r"trf_blocks.\1.norm2.scale"),
    (r"^model\.layers\.(\d+)\.post_feedforward_layernorm\.weight$", r"trf_blocks.\1.post_ff_norm.scale"),
]]


def gemma3_hf_to_ours(name: str) -> str | None:
    """Our parameter name for a Hugging Face Gemma 3 tensor name (Llama's rules for the others)."""
    for pattern, repl in _GEMMA_RENAMES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return hf_to_ours(name)


def _number(value, what: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidInput(f"{source}: {what} = {value!r} is not a positive number")
    return float(value)


def _gemma_rope_from_hf(hf: dict, source: str) -> tuple[float, float, dict | None]:
    """(global theta, local theta, global scaling) from transformers 5's per-layer-type `rope_parameters`
    or the older `rope_theta`, `rope_local_base_freq` and `rope_scaling`."""
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise InvalidInput(f"{source}: rope_parameters is not an object")
    if "full_attention" in rope or "sliding_attention" in rope:
        full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    else:
        full, local = {**(hf.get("rope_scaling") or {}), **rope}, {}
    global_theta = _number(full.get("rope_theta", hf.get("rope_theta", 1_000_000.0)), "rope_theta", source)
    local_theta = _number(local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)),
                          "rope_local_base_freq", source)
    for part, params in (("sliding_attention", local), ("full_attention", full)):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in (None, "default") and not (part == "full_attention" and kind == "linear"):
            raise InvalidInput(f"{source}: rope_type {kind!r} for {part}; only 'default' (and 'linear' for the "
                               "global layers) are implemented")
    kind = full.get("rope_type", full.get("type"))
    freq = {"rope_type": "linear", "factor": _number(full.get("factor"), "rope factor", source)} \
        if kind == "linear" else None
    return global_theta, local_theta, freq


def gemma3_config_from_hf(hf: dict, source: str = "config.json") -> dict:
    """Our Gemma 3 config from a Hugging Face config.json (model_type gemma3_text); a file that does not
    describe such a model raises InvalidInput naming `source`."""
    if not isinstance(hf, dict):
        raise InvalidInput(f"{source} holds a {type(hf).__name__}, not a Hugging Face config (an object)")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise InvalidInput(f"{source}: hidden_activation {act!r}; Gemma 3 gates with GELU (tanh approximation)")
    if hf.get("attn_logit_softcapping") is not None:
        raise InvalidInput(f"{source}: attn_logit_softcapping is set (a Gemma 2 feature); not implemented here")
    if hf.get("use_bidirectional_attention"):
        raise InvalidInput(f"{source}: use_bidirectional_attention is set (an embedding model, not a text generator)")
    global_theta, local_theta, freq = _gemma_rope_from_hf(hf, source)
    # transformers' Gemma3TextConfig defaults, for keys a config.json may leave out
    base = {"head_dim": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 131_072}
    cfg = config_from_hf({**base, **{k: v for k, v in hf.items() if v is not None and k not in (
        "hidden_act", "rope_parameters", "rope_scaling")}, "rope_theta": global_theta}, source)
    cfg.pop("rope_freq", None)
    if freq is not None:
        cfg["rope_freq"] = freq
    n = cfg["n_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:
        pattern = hf.get("sliding_window_pattern", 6)
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            raise InvalidInput(f"{source}: sliding_window_pattern = {pattern!r} is not a whole number >= 1")
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if not isinstance(layer_types, list) or len(layer_types) != n or not set(layer_types) <= set(LAYER_TYPES):
        raise InvalidInput(f"{source}: layer_types must list 'sliding_attention' or 'full_attention' for each "
                           f"of the {n} layers")
    window = hf.get("sliding_window", 4096)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InvalidInput(f"{source}: sliding_window = {window!r} is not a whole number >= 1")
    cfg.update(qk_norm=True, rope_local_base=local_theta, sliding_window=window, layer_types=list(layer_types),
               query_pre_attn_scalar=_number(hf.get("query_pre_attn_scalar", 256), "query_pre_attn_scalar", source),
               final_logit_softcapping=hf.get("final_logit_softcapping"))
    if cfg["final_logit_softcapping"] is not None:
        _number(cfg["final_logit_softcapping"], "final_logit_softcapping", source)
    return cfg


def load_gemma3(model_dir_or_id: str | os.PathLike, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu", context_length: int | None = None,
                decoding_layout: bool = False) -> Gemma3Model:
    """A Gemma3Model with the weights of a Hugging Face Gemma 3 text folder (gemma3_text, e.g.
    google/gemma-3-1b-it) or Hub id, in eval mode (options as in `ch05.llama.llama3.load_llama3`)."""
    model_dir = resolve_model_dir(model_dir_or_id)
    hf = read_hf_config(model_dir)
    if hf.get("model_type") != "gemma3_text":
        hint = (" (the multimodal Gemma 3 models, whose text part sits under text_config, are not implemented)"
                if hf.get("model_type") == "gemma3" else "")
        raise InvalidInput(f"{model_dir}/config.json describes a {hf.get('model_type')!r} model, "
                           f"not 'gemma3_text'{hint}")
    cfg = with_context_length(gemma3_config_from_hf(hf, f"{model_dir}/config.json"), context_length, model_dir)
    return build_and_load(Gemma3Model, cfg, model_dir, dtype=dtype, device=device, decoding_layout=decoding_layout)


class Gemma3Tokenizer(Llama3Tokenizer):
    """tokenizer.json plus Gemma 3's chat template. A prompt starts with <bos>; a turn ends with <end_of_turn>:

        <bos><start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n

    Gemma has no system role: the template puts a system message at the start of the user's turn,
    followed by a blank line.
    """

    bos = "<bos>"
    stop_tokens = ("<end_of_turn>", "<eos>")

    @classmethod
    def chat_prompt(cls, message: str, system: str | None = None) -> str:
        prefix = f"{system.strip()}\n\n" if system else ""
        return f"{cls.bos}<start_of_turn>user\n{prefix}{message.strip()}<end_of_turn>\n<start_of_turn>model\n"
