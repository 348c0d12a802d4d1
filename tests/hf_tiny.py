"""Tiny random Hugging Face model folders for the Llama 3 / Qwen3 tests, written offline.

Each folder is what `save_pretrained` writes for a transformers model (config.json,
model.safetensors or shards with an index) plus a small byte-level BPE tokenizer.json trained
here with `tokenizers` on *The Verdict*, holding the family's special tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
VOCAB_SIZE = 400  # the tokenizer's 300 BPE tokens + specials fit below this

COMMON = {"vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def train_tokenizer(path: Path, special: list[str], text: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    tok.save(str(path / "tokenizer.json"))


def hf_model(family: str, **overrides):
    """A random-weight transformers model of `family` ("llama", "qwen3", "qwen3_moe"), seeded."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    torch.manual_seed(123)
    if family == "llama":
        # Llama 3 rope scaling with a short "original" context, so all three frequency bands occur.
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        cfg = LlamaConfig(**{**COMMON, "rope_parameters": rope, "tie_word_embeddings": True, **overrides})
        model = LlamaForCausalLM(cfg)
    elif family == "qwen3":
        cfg = Qwen3Config(**{**COMMON, "head_dim": 32, "tie_word_embeddings": True, **overrides})
        model = Qwen3ForCausalLM(cfg)
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(**{**COMMON, "head_dim": 16, "moe_intermediate_size": 32, "num_experts": 6,
                                "num_experts_per_tok": 2, "norm_topk_prob": True, **overrides})
        model = Qwen3MoeForCausalLM(cfg)
    else:
        raise ValueError(family)
    # Random init uses std 0.02; larger norms' weights make the test see them doing something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def write_model_dir(path: Path, family: str, text: str, max_shard_size: str | None = None, **overrides):
    """Save a tiny model of `family` plus its tokenizer into `path`; returns the transformers model."""
    path.mkdir(parents=True, exist_ok=True)
    model = hf_model(family, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    train_tokenizer(path, LLAMA_SPECIAL if family == "llama" else QWEN_SPECIAL, text)
    return model
