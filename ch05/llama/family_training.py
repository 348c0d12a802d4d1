"""Chapter 5 bonus: the chapters' training runs with every model family (`--model DIR`).

Chapter 5 pretrains its GPT on *The Verdict*, chapter 6 fine-tunes one as a spam classifier. With
`--model DIR` (a Hugging Face folder of a Llama 3.x, Qwen3 (dense or MoE) or Gemma 3 text model)
the same runs train that family's architecture instead:

    python -m ch05.gpt_train --model DIR                  # random init shaped by DIR/config.json
    python -m ch05.gpt_train --model DIR --load-weights   # continued pretraining from DIR's weights
    python -m ch06.gpt_class_finetune --model DIR         # classifier on DIR's pretrained model

What changes is only what this module supplies: the model (`build_family_model`: the family's
class from `ch05.llama.generate_llm.FAMILIES`, random init or the folder's weights), the tokenizer
behind the book's interface (`BookTokenizer`: `encode(text, allowed_special=...)`, `decode(ids)`),
the data loaders with that tokenizer and the family's pad id (`pad_token_id`). The trained model
is saved as a Hugging Face folder (`ch05.llama.hf_save.save_hf_folder`), which
`python -m ch05.llama --model` and `transformers` load. `write_tiny_folder` makes a small folder
of any family offline (config.json plus a tokenizer trained on a text), for the notebook
`pretraining-other-families.ipynb` and the tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from ch02.dataloader import create_dataloader_v1
from ch05.llama.gemma3 import Gemma3Model
from ch05.llama.generate_llm import CONFIG_READERS, FAMILIES
from ch05.llama.llama3 import Llama3Model, read_hf_config, with_context_length
from ch05.llama.qwen3 import Qwen3Model
from llmfs.atomic import atomic_write
from llmfs.errors import InvalidInput

# config.json's model_type -> the model class to build from our config (random init)
MODEL_CLASSES = {"llama": Llama3Model, "qwen3": Qwen3Model, "qwen3_moe": Qwen3Model, "gemma3_text": Gemma3Model}


def family_of(model_dir: str | os.PathLike) -> str | None:
    """The family (config.json's model_type) of a Llama / Qwen3 / Gemma 3 folder; None for anything
    else (a GPT-2 name, a chapter-5 checkpoint, a folder of another kind)."""
    path = Path(model_dir).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()):
        return None
    try:
        family = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None  # the loaders report a damaged file with its name
    return family if family in FAMILIES else None


def family_config(model_dir: str | os.PathLike, context_length: int | None = None) -> dict:
    """Our config of the folder's model (InvalidInput naming what does not fit), with the context
    shortened to `context_length` (never lengthened)."""
    model_dir = Path(model_dir)
    hf = read_hf_config(model_dir)
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise InvalidInput(f"{model_dir}/config.json describes a {family!r} model; --model DIR takes "
                           f"{', '.join(sorted(FAMILIES))}")
    return with_context_length(CONFIG_READERS[family](hf, f"{model_dir}/config.json"), context_length, model_dir)


class BookTokenizer:
    """A family's tokenizer.json behind the interface the chapters call (tiktoken's):
    `encode(text, allowed_special=..., disallowed_special=...)` and `decode(ids)`.

    Text is always text: a literal special token inside it ("<|endoftext|>", "<pad>") is tokenized
    as ordinary characters, never as the special id (which is padding in chapter 6), as chapter 6's
    `encode_text` does for GPT-2. The begin-of-text token (Llama, Gemma) starts every text, as
    Hugging Face's tokenizers add it and as `python -m ch05.llama` prompts the model.
    """

    def __init__(self, family_tokenizer):
        self.family_tokenizer = family_tokenizer  # Llama3Tokenizer, Qwen3Tokenizer or Gemma3Tokenizer
        self.bos_id = family_tokenizer.token_id(family_tokenizer.bos) if family_tokenizer.bos else None
        self.pad_token_id = pad_token_id(family_tokenizer)
        self.n_vocab = family_tokenizer.tokenizer.get_vocab_size()

    def encode(self, text: str, allowed_special=None, disallowed_special=None) -> list[int]:
        tok = self.family_tokenizer.tokenizer
        tok.encode_special_tokens = True  # text is text (see the class docstring)
        try:
            ids = tok.encode(text, add_special_tokens=False).ids
        finally:
            tok.encode_special_tokens = False
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.family_tokenizer.decode(list(ids), skip_special_tokens=True)


def pad_token_id(family_tokenizer) -> int:
    """The family's pad id: tokenizer_config.json's pad_token, else "<pad>" (Gemma), else the
    end-of-text token (Llama 3 and Qwen3 base models have no pad token; Hugging Face pads them with
    it too). Chapter 6 reads each message at its last non-pad token, so padding is never read."""
    names = []
    config = Path(family_tokenizer.path).with_name("tokenizer_config.json")
    if config.is_file():
        try:
            pad = json.loads(config.read_text(encoding="utf-8")).get("pad_token")
        except (ValueError, UnicodeDecodeError, AttributeError):
            pad = None
        names.append(pad.get("content") if isinstance(pad, dict) else pad)
    names += ["<pad>", family_tokenizer.stop_tokens[-1]]
    for name in names:
        if isinstance(name, str) and (i := family_tokenizer.token_id(name)) is not None:
            return i
    raise InvalidInput(f"{family_tokenizer.path} has neither a pad token nor the end-of-text token "
                       f"{family_tokenizer.stop_tokens[-1]!r}; chapter 6 needs one to pad the messages")


def build_family_model(model_dir: str | os.PathLike, cfg: dict | None = None, load_weights: bool = False,
                       ) -> tuple[nn.Module, BookTokenizer, str]:
    """(model in float32, tokenizer, family) for a Llama / Qwen3 / Gemma 3 folder.

    Random init of the family's class, shaped by `cfg` (default: the folder's config.json) and
    initialised as Hugging Face initialises these models (`init_weights`), or, with `load_weights`,
    the folder's weights (continued pretraining, fine-tuning). Float32, so that AdamW updates small weights
    exactly; the tokenizer.json must be there before anything is built.
    """
    from ch05.llama.generate_llm import load_llm

    model_dir = Path(model_dir)
    cfg = family_config(model_dir) if cfg is None else cfg
    family = read_hf_config(model_dir)["model_type"]
    tokenizer = BookTokenizer(FAMILIES[family][1](model_dir))  # a missing tokenizer.json fails here
    if tokenizer.n_vocab > cfg["vocab_size"]:
        raise InvalidInput(f"{model_dir}/tokenizer.json has {tokenizer.n_vocab} tokens but the model's vocabulary "
                           f"(config.json's vocab_size) only {cfg['vocab_size']}")
    if load_weights:
        model = load_llm(model_dir, dtype=torch.float32, context_length=cfg["context_length"],
                         decoding_layout=False).model
    else:
        model = MODEL_CLASSES[family]({**cfg, "dtype": None})
        model.cfg.pop("dtype", None)  # our configs are JSON (checkpoints, run settings)
        init_weights(model, read_hf_config(model_dir).get("initializer_range", 0.02))
    return model.float(), tokenizer, family


def init_weights(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Every linear and embedding weight drawn from N(0, std) (config.json's initializer_range), the
    norms left at their neutral scale, as transformers' `_init_weights` does for these families.

    PyTorch's defaults (chapter 4's GPTModel keeps them) draw the embedding from N(0, 1): with the
    output head tied to it, as in the small Llama, Qwen3 and Gemma models, the first logits would have
    a standard deviation of sqrt(emb_dim) and the first loss would be far above ln(vocab_size)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    return model


def create_train_val_loaders(text: str, cfg: dict, batch_size: int, tokenizer, train_ratio: float = 0.9,
                             generator: torch.Generator | None = None) -> tuple:
    """Chapter 5's `create_train_val_loaders` with the family's tokenizer (New: the book's loaders
    tokenize with GPT-2's): non-overlapping windows, the first part of the text trains."""
    split = int(train_ratio * len(text))
    common = dict(batch_size=batch_size, max_length=cfg["context_length"], stride=cfg["context_length"],
                  tokenizer=tokenizer)
    train_loader = create_dataloader_v1(text[:split], drop_last=True, shuffle=True, generator=generator, **common)
    val_loader = create_dataloader_v1(text[split:], drop_last=False, shuffle=False, **common)
    return train_loader, val_loader


# --- Small folders of any family, offline ----------------------------------------------------------

SPECIAL_TOKENS = {
    "llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "gemma3_text": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],  # ids 0-3 as Gemma's
}
SPECIAL_TOKENS["qwen3_moe"] = SPECIAL_TOKENS["qwen3"]


def train_tokenizer(path: str | os.PathLike, family: str, text: str, vocab_size: int = 512) -> Path:
    """A `vocab_size`-token BPE tokenizer.json trained on `text`, with the family's special tokens
    and style: byte-level BPE (Llama 3, Qwen3) or Gemma's, where spaces become "▁"."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    special = SPECIAL_TOKENS[family]
    if family == "gemma3_text":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
        tok.decoder = decoders.Replace("▁", " ")
        alphabet, corpus = [], text.replace(" ", "▁")
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet, corpus = pre_tokenizers.ByteLevel.alphabet(), text
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator([corpus], trainer=trainer)
    path = Path(path) / "tokenizer.json"
    with atomic_write(path) as f:
        f.write(tok.to_str())
    return path


def hf_config(family: str, vocab_size: int, emb_dim: int, n_layers: int, n_heads: int, n_kv_groups: int,
              hidden_dim: int, context_length: int, sliding_window: int | None = None) -> dict:
    """A Hugging Face config.json (transformers 5 keys) of a small model of `family` with the
    published models' other settings: Llama 3.2's RoPE scaling (its original context capped at the
    model's), Qwen3's QK-norm and RoPE theta,
    Gemma 3's five sliding-window layers per global one (window `sliding_window`, default a quarter
    of the context) and its two RoPE bases."""
    common = {"vocab_size": vocab_size, "hidden_size": emb_dim, "intermediate_size": hidden_dim,
              "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "num_key_value_heads": n_kv_groups,
              "max_position_embeddings": context_length, "tie_word_embeddings": True, "attention_bias": False}
    if family == "llama":
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **common, "hidden_act": "silu",
                "rms_norm_eps": 1e-5, "mlp_bias": False, "head_dim": emb_dim // n_heads,
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": min(8192, context_length)}}
    if family == "qwen3":
        return {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], **common, "hidden_act": "silu",
                "head_dim": emb_dim // n_heads, "rms_norm_eps": 1e-6, "use_sliding_window": False,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}}
    if family == "gemma3_text":
        window = sliding_window or max(context_length // 4, 1)
        layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]
        layer_types[-1] = "full_attention"  # New: a small model still gets one global layer, at the end
        return {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], **common,
                "hidden_activation": "gelu_pytorch_tanh", "head_dim": emb_dim // n_heads,
                "query_pre_attn_scalar": emb_dim // n_heads, "rms_norm_eps": 1e-6, "sliding_window": window,
                "layer_types": layer_types, "final_logit_softcapping": None, "attn_logit_softcapping": None,
                "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
                "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    raise ValueError(f"family must be one of llama, qwen3, gemma3_text; got {family!r}")


def write_tiny_folder(path: str | os.PathLike, family: str, text: str, vocab_size: int = 512, **sizes) -> Path:
    """A folder `--model` takes, without weights: config.json (`hf_config(family, vocab_size, **sizes)`)
    and a tokenizer.json trained on `text`. Returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer(path, family, text, vocab_size)
    with atomic_write(path / "config.json") as f:
        json.dump(hf_config(family, vocab_size, **sizes), f, indent=2)
    return path


# --- The notebook's comparison: each family against GPT-2, the same steps on The Verdict ----------

# Quick mode: chapter 5's small GPT-2 shape (ch04.gpt.QUICK_CONFIG: emb 128, 2 blocks, 4 heads, context
# 64) and the families at the same width and depth; SwiGLU's three matrices of width 352 hold about
# as many weights as GPT-2's two of width 4 x 128. Full mode doubles width and depth and the context.
QUICK_SIZES = {"emb_dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_groups": 2, "hidden_dim": 352, "context_length": 64}
FULL_SIZES = {"emb_dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_groups": 2, "hidden_dim": 704, "context_length": 128}
COMPARED_FAMILIES = ("llama", "qwen3", "gemma3_text")


def measure_run(name: str, cfg: dict, settings: dict, output_dir: str | os.PathLike, text: str,
                max_steps: int, model_dir: str | os.PathLike | None = None) -> dict:
    """Pretrain with chapter 5's `ch05.cli.pretrain` (its log kept quiet) and return one row of the
    notebook's table: parameters, the loss on the whole validation split per token and per character.

    Per token, losses of different tokenizers do not compare (a tokenizer with longer tokens has fewer,
    harder predictions); per character they do: loss per token x tokens per character of the split."""
    import contextlib
    import io

    from ch02.tokenizer import get_gpt2_tokenizer
    from ch05.cli import gpt_train, pretrain

    with contextlib.redirect_stdout(io.StringIO()):
        result = pretrain(cfg, settings, output_dir, text=text, max_steps=max_steps, progress=False,
                          sample_tokens=0, model_dir=model_dir)
    model = result["model"].eval()
    listings = gpt_train()
    if model_dir is None:
        tokenizer = get_gpt2_tokenizer()
        _, val_loader = listings.create_train_val_loaders(text, cfg, settings["batch_size"], settings["train_ratio"])
    else:
        tokenizer = BookTokenizer(FAMILIES[read_hf_config(model_dir)["model_type"]][1](model_dir))
        _, val_loader = create_train_val_loaders(text, cfg, settings["batch_size"], tokenizer, settings["train_ratio"])
    with torch.no_grad():
        val_loss = listings.calc_loss_loader(val_loader, model, next(model.parameters()).device)
    val_text = text[int(settings["train_ratio"] * len(text)):]
    tokens_per_char = len(tokenizer.encode(val_text, allowed_special={"<|endoftext|>"})) / len(val_text)
    n_params = sum(p.numel() for p in model.parameters())
    embedding = model.tok_emb.weight.numel() + (0 if cfg.get("tie_weights") else model.out_head.weight.numel())
    embedding += model.pos_emb.weight.numel() if hasattr(model, "pos_emb") else 0
    return {"model": name, "vocabulary": cfg["vocab_size"], "parameters": n_params,
            "non-embedding parameters": n_params - embedding, "steps": max_steps,
            "first val loss": round(result["val_losses"][0], 3), "val loss": round(val_loss, 3),
            "tokens per char": round(tokens_per_char, 3), "val loss per char": round(val_loss * tokens_per_char, 3),
            "seconds": round(result["seconds"], 1)}
