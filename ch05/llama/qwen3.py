"""Chapter 5 bonus: Qwen3, dense and mixture-of-experts, from the Llama 3 parts of `ch05.llama.llama3`.

Qwen3's dense models are Llama 3 with two differences: queries and keys pass through an
RMSNorm of their own before RoPE (QK-norm, which keeps attention logits in range), and the
head size is set on its own (`head_dim`, 128) instead of emb_dim / n_heads. RoPE is plain
(no Llama 3 frequency scaling), with theta = 1,000,000. The MoE models (Qwen3-30B-A3B, ...)
replace each block's feed-forward by many small SwiGLU "experts" and a router that sends every
token to its top-k experts, so only a fraction of the weights work on any one token.

Everything else (RMSNorm, SwiGLU, RoPE, grouped-query attention with a KV cache, the model,
loading Hugging Face folders, the tokenizer) is imported from `ch05.llama.llama3`.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch05.llama.llama3 import (
    FeedForward,
    GroupedQueryAttention,
    Llama3Model,
    Llama3Tokenizer,
    RMSNorm,
    TransformerBlock,
    build_and_load,
    config_from_hf,
    read_hf_config,
    resolve_model_dir,
    with_context_length,
)
from llmfs.checkpoint import check_model_config
from llmfs.errors import InvalidInput

QWEN3_CONFIG_06B = {
    "vocab_size": 151_936,     # Qwen's byte-level BPE vocabulary
    "context_length": 40_960,  # longest sequence (pass a smaller one to save memory)
    "emb_dim": 1024,           # width of every token vector
    "n_heads": 16,             # query heads per block
    "n_layers": 28,            # transformer blocks
    "hidden_dim": 3072,        # width inside the SwiGLU feed-forward
    "head_dim": 128,           # set on its own: n_heads * head_dim need not equal emb_dim
    "qk_norm": True,           # RMSNorm on queries and keys (Qwen3's addition)
    "n_kv_groups": 8,          # key/value heads
    "rope_base": 1_000_000.0,  # RoPE theta, no frequency scaling
    "norm_eps": 1e-6,          # RMSNorm's epsilon
    "tie_weights": True,       # the 0.6B, 1.7B and 4B models share embedding and output head
    "dtype": torch.bfloat16,   # the published weights are bfloat16
}

QWEN3_CONFIGS = {
    "0.6B": QWEN3_CONFIG_06B,
    "1.7B": {**QWEN3_CONFIG_06B, "emb_dim": 2048, "hidden_dim": 6144},
    "4B": {**QWEN3_CONFIG_06B, "emb_dim": 2560, "n_heads": 32, "n_layers": 36, "hidden_dim": 9728},
    "8B": {**QWEN3_CONFIG_06B, "emb_dim": 4096, "n_heads": 32, "n_layers": 36, "hidden_dim": 12288,
           "tie_weights": False},
    "14B": {**QWEN3_CONFIG_06B, "emb_dim": 5120, "n_heads": 40, "n_layers": 40, "hidden_dim": 17408,
            "tie_weights": False},
    "32B": {**QWEN3_CONFIG_06B, "emb_dim": 5120, "n_heads": 64, "n_layers": 64, "hidden_dim": 25600,
            "tie_weights": False},
    # Mixture of experts: hidden_dim is unused; each expert is a SwiGLU of width moe_intermediate_size.
    "30B-A3B": {**QWEN3_CONFIG_06B, "emb_dim": 2048, "n_heads": 32, "n_layers": 48, "hidden_dim": 6144,
                "n_kv_groups": 4, "tie_weights": False,
                "num_experts": 128,             # experts per block
                "num_experts_per_tok": 8,       # experts each token is routed to
                "moe_intermediate_size": 768,   # width inside one expert
                "norm_topk_prob": True},        # the top-k router weights are renormalised to sum to 1
    "235B-A22B": {**QWEN3_CONFIG_06B, "emb_dim": 4096, "n_heads": 64, "n_layers": 94, "hidden_dim": 12288,
                  "n_kv_groups": 4, "tie_weights": False, "num_experts": 128, "num_experts_per_tok": 8,
                  "moe_intermediate_size": 1536, "norm_topk_prob": True},
}


class Qwen3Attention(GroupedQueryAttention):
    """Grouped-query attention plus QK-norm: one RMSNorm (over head_dim) for queries, one for keys."""

    def __init__(self, cfg: dict):
        super().__init__(cfg["emb_dim"], cfg["n_heads"], cfg["n_kv_groups"], cfg.get("head_dim"),
                         dtype=cfg.get("dtype"))
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.get("norm_eps", 1e-6))
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.get("norm_eps", 1e-6))

    def normalize_qk(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(queries), self.k_norm(keys)  # each head vector on its own, before RoPE


class MoEFeedForward(nn.Module):
    """A router (`gate`) and `num_experts` SwiGLU experts; each token uses its top-k experts.

    The router's softmax probabilities of the chosen experts (renormalised to sum to 1 when
    `norm_topk_prob`) weight the experts' outputs. Only the experts some token chose run.
    fc1/fc2/fc3 are lists over experts, with the names of the dense `FeedForward`'s matrices.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.num_experts_per_tok = cfg["num_experts_per_tok"]
        self.norm_topk_prob = cfg.get("norm_topk_prob", True)
        emb, hidden, dtype = cfg["emb_dim"], cfg["moe_intermediate_size"], cfg.get("dtype")
        self.gate = nn.Linear(emb, cfg["num_experts"], bias=False, dtype=dtype)
        self.fc1 = nn.ModuleList(nn.Linear(emb, hidden, bias=False, dtype=dtype) for _ in range(cfg["num_experts"]))
        self.fc2 = nn.ModuleList(nn.Linear(emb, hidden, bias=False, dtype=dtype) for _ in range(cfg["num_experts"]))
        self.fc3 = nn.ModuleList(nn.Linear(hidden, emb, bias=False, dtype=dtype) for _ in range(cfg["num_experts"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, emb_dim = x.shape
        x_flat = x.reshape(-1, emb_dim)  # (b * num_tokens, emb_dim)
        probs = torch.softmax(self.gate(x_flat), dim=-1, dtype=torch.float32)  # (b * num_tokens, num_experts)
        top_probs, top_idx = probs.topk(self.num_experts_per_tok, dim=-1)  # (b * num_tokens, k)
        if self.norm_topk_prob:
            top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        top_probs = top_probs.to(x.dtype)
        out = torch.zeros_like(x_flat)
        for e in top_idx.unique().tolist():
            rows, slot = (top_idx == e).nonzero(as_tuple=True)  # the tokens that chose expert e
            h = x_flat[rows]
            y = self.fc3[e](F.silu(self.fc1[e](h)) * self.fc2[e](h))
            out.index_add_(0, rows, y * top_probs[rows, slot, None])
        return out.view(b, num_tokens, emb_dim)


class Qwen3Block(TransformerBlock):
    """Llama's block with QK-norm attention and, for MoE configs, routed experts."""

    def make_attention(self, cfg: dict) -> nn.Module:
        return Qwen3Attention(cfg)

    def make_feed_forward(self, cfg: dict) -> nn.Module:
        return MoEFeedForward(cfg) if cfg.get("num_experts", 0) > 0 else FeedForward(cfg)


class Qwen3Model(Llama3Model):
    """Llama3Model with Qwen3's blocks; same forward, cache and generation interface."""

    block_cls = Qwen3Block


def qwen3_config_from_hf(hf: dict, source: str = "config.json") -> dict:
    """Our Qwen3 config from a Hugging Face config.json (model_type qwen3 or qwen3_moe); a file that does
    not describe such a model raises InvalidInput naming `source`."""
    cfg = {**config_from_hf(hf, source), "qk_norm": True}
    if hf.get("use_sliding_window"):
        raise InvalidInput(f"{source} turns on sliding-window attention, which this Qwen3 does not implement")
    if hf.get("model_type") == "qwen3_moe":
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise InvalidInput(f"{source} mixes dense and MoE blocks (mlp_only_layers / decoder_sparse_step); "
                               "only models with experts in every block are implemented")
        missing = [k for k in ("num_experts_per_tok", "moe_intermediate_size") if k not in hf]
        if "num_experts" not in hf and "num_local_experts" not in hf:
            missing.append("num_experts")
        if missing:
            raise InvalidInput(f"{source} lacks {missing}: not a Qwen3-MoE config.json")
        cfg.update(num_experts=hf.get("num_experts", hf.get("num_local_experts")),
                   num_experts_per_tok=hf["num_experts_per_tok"],
                   moe_intermediate_size=hf["moe_intermediate_size"],
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        check_model_config(cfg, source)
    return cfg


def load_qwen3(model_dir_or_id: str | os.PathLike, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", context_length: int | None = None,
               decoding_layout: bool = False) -> Qwen3Model:
    """A Qwen3Model (dense or MoE) with the weights of a Hugging Face folder or Hub id, in eval mode
    (`decoding_layout`: as in `ch05.llama.llama3.load_llama3`)."""
    model_dir = resolve_model_dir(model_dir_or_id)
    hf = read_hf_config(model_dir)
    if hf.get("model_type") not in ("qwen3", "qwen3_moe"):
        raise InvalidInput(f"{model_dir}/config.json describes a {hf.get('model_type')!r} model, "
                           "not 'qwen3' or 'qwen3_moe'")
    cfg = with_context_length(qwen3_config_from_hf(hf, f"{model_dir}/config.json"), context_length, model_dir)
    return build_and_load(Qwen3Model, cfg, model_dir, dtype=dtype, device=device, decoding_layout=decoding_layout)


class Qwen3Tokenizer(Llama3Tokenizer):
    """tokenizer.json plus Qwen3's chat template (ChatML), with or without thinking.

        <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n

    With thinking off the template pre-fills an empty reasoning block (`<think>\\n\\n</think>\\n\\n`),
    so the model answers at once. Qwen3 has no begin-of-text token; a turn ends with <|im_end|>.
    """

    bos = None
    stop_tokens = ("<|im_end|>", "<|endoftext|>")

    def plain_prompt(self, text: str) -> str:
        return text

    @classmethod
    def chat_prompt(cls, message: str, system: str | None = None, thinking: bool = False) -> str:
        parts = [f"<|im_start|>system\n{system}<|im_end|>\n"] if system else []
        parts.append(f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n")
        if not thinking:
            parts.append("<think>\n\n</think>\n\n")
        return "".join(parts)
