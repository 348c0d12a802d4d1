"""Tiny random Hugging Face model folders for the Llama 3 / Qwen3 tests, written offline.

Each folder is what `save_pretrained` writes for a transformers model (config.json,
model.safetensors or shards with an index) plus a small byte-level BPE tokenizer.json trained
here with `tokenizers` on *The Verdict*, holding the family's special tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # ids 0-3 as Gemma's
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


def train_gemma_tokenizer(path: Path, text: str) -> None:
    """A Gemma-style tokenizer.json: spaces become "▁" (no byte-level pre-tokenizer), BPE on that."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
    tok.decoder = decoders.Replace("▁", " ")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=GEMMA_SPECIAL)
    tok.train_from_iterator([text.replace(" ", "▁")], trainer=trainer)
    tok.save(str(path / "tokenizer.json"))


def hf_model(family: str, **overrides):
    """A random-weight transformers model of `family` ("llama", "qwen3", "qwen3_moe", "gemma3_text"), seeded."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
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
    elif family == "gemma3_text":
        # Both RoPE bases and linear scaling of the global one; a window of 8 (prompts are longer);
        # query_pre_attn_scalar != head_dim so the score scale matters.
        rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}
        cfg = Gemma3TextConfig(**{**COMMON, "head_dim": 32, "rope_parameters": rope, "sliding_window": 8,
                                  "query_pre_attn_scalar": 24, "sliding_window_pattern": 3,
                                  "num_hidden_layers": 4, "tie_word_embeddings": True, **overrides})
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    # Random init uses std 0.02; larger norms' weights make the test see them doing something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma's norms scale by 1 + weight
                p.uniform_(-0.5, 0.5) if family == "gemma3_text" else p.uniform_(0.5, 1.5)
    return model.eval()


def write_model_dir(path: Path, family: str, text: str, max_shard_size: str | None = None, **overrides):
    """Save a tiny model of `family` plus its tokenizer into `path`; returns the transformers model."""
    path.mkdir(parents=True, exist_ok=True)
    model = hf_model(family, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if family == "gemma3_text":
        train_gemma_tokenizer(path, text)
    else:
        train_tokenizer(path, LLAMA_SPECIAL if family == "llama" else QWEN_SPECIAL, text)
    return model


def model_dir_fixture(tmp_path_factory, family: str):
    """(folder, transformers model) of a tiny `family` model, for a module-scoped fixture."""
    path = tmp_path_factory.mktemp(family)
    return path, write_model_dir(path, family, verdict())


def verdict() -> str:
    from llmfs.download import get_data_file

    return get_data_file("the-verdict.txt", download=False).read_text(encoding="utf-8")


def check_parity(ours, hf, ids: torch.Tensor, atol: float = 1e-4) -> None:
    """Our logits equal transformers' for `ids` (batch, n): in one pass and fed through our KV cache
    in uneven chunks (a multi-token prefill, single tokens, then a multi-token chunk after the cache)."""
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=atol, rtol=0)
        ours.reset_kv_cache()
        n = ids.shape[1]
        cuts = [0, n // 2, n // 2 + 1, n // 2 + 2, n]
        chunks = [ours(ids[:, a:b], use_cache=True) for a, b in zip(cuts, cuts[1:])]
        ours.reset_kv_cache()
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, atol=atol, rtol=0)


def check_greedy_text(ours, hf, tokenizer, prompt: str, new_tokens: int = 24, prompt_tokens: int = 60) -> None:
    """Greedy continuation of the first `prompt_tokens` tokens of `prompt` (prompt and continuation
    within the context) with and without our cache equals transformers' generate."""
    from ch05.gpt_generate import generate

    ids = torch.tensor([tokenizer.encode(prompt)[:prompt_tokens]])
    assert ids.shape[1] == prompt_tokens and prompt_tokens + new_tokens <= ours.cfg["context_length"]
    with torch.no_grad():
        reference = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    for use_cache in (True, False):
        out = generate(ours, ids, max_new_tokens=new_tokens, context_size=ours.cfg["context_length"],
                       use_cache=use_cache)
        assert out.tolist() == reference.tolist(), f"use_cache={use_cache}"
        assert tokenizer.decode(out[0].tolist()) == tokenizer.decode(reference[0].tolist())
