"""Chapter 5, section 5.3: decoding strategies, plus a key/value cache for fast generation.

`generate` extends chapter 4's greedy loop with temperature scaling, top-k and
top-p (nucleus) filtering and an end-of-text stop; the step functions it shares with the
project's streaming generation (`next_token`, `next_logits`) are `llmfs.sampling`. With `use_cache=True` each
step feeds only the newest token and reuses the keys/values of earlier ones,
so a token costs the same whether it is the 10th or the 200th.
`load_model_for_generation` builds a model from whatever a reader has: a GPT-2 name,
Hugging Face GPT-2 files, or what `python -m ch05.gpt_train` wrote.

From the command line (`ch05.cli`), with OpenAI's GPT-2 weights (section 5.5) or a model
trained by `python -m ch05.gpt_train`:

    python -m ch05.gpt_generate --model gpt2 --prompt "Every effort moves you" \
        --max-new-tokens 50 --temperature 0.7 --top-k 50 --seed 123
    python -m ch05.gpt_generate --model outputs/ch05/checkpoint.pth --prompt "Every effort moves you"
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from llmfs.runtime import eval_mode
from llmfs.sampling import check_sampling_args, next_logits, next_token


# no_grad rather than inference_mode: under torch.autocast, inference mode turns off autocast's
# cache of low-precision weights, so every new token would cast all weights to bfloat16 again.
@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
             top_p: float | None = None, use_cache: bool = False,  # New: nucleus sampling, KV cache
             generator: torch.Generator | None = None) -> torch.Tensor:  # New: a seeded RNG of its own
    """The book's `generate` (listing 5.4): append up to `max_new_tokens` tokens to `idx` (batch, num_tokens).

    temperature 0 is greedy decoding; otherwise the logits are divided by the temperature
    and sampled, after optional top-k / top-p filtering (`next_token`). As in the book,
    generation stops *before* appending `eos_id`; in a batch it stops when every sequence
    has produced it, and a sequence that finished earlier is padded with `eos_id`.

    With `use_cache=True` the result is identical to `use_cache=False`. GPT-2 uses absolute
    positions, so once the text is longer than `context_size` the window slides and the
    cache is rebuilt from the cropped window each step (then a step costs as much as without).
    """
    check_sampling_args(temperature, top_k, top_p)  # New: clear errors for bad settings
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    with eval_mode(model):  # New: no dropout while generating; the model's mode comes back afterwards
        try:
            for step in range(max_new_tokens):
                logits = next_logits(model, idx, step, context_size, use_cache)
                idx_next = next_token(logits, temperature, top_k, top_p, generator)  # (batch, 1)
                if eos_id is not None:
                    finished |= idx_next == eos_id
                    if bool(finished.all()):  # the book's `if idx_next == eos_id: break`, for a batch
                        break
                    idx_next = idx_next.masked_fill(finished, eos_id)
                idx = torch.cat((idx, idx_next), dim=1)  # (batch, num_tokens + 1)
        finally:
            if use_cache:
                model.reset_kv_cache()
    return idx


# --- Loading a model to generate with ----------------------------------------------------------

def _is_hf_gpt2_file(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    from llmfs.checkpoint import CheckpointFileError

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError) as exc:
        raise CheckpointFileError(f"{path} is not a readable .safetensors file ({exc})") from None
    return bool(keys & {"wte.weight", "transformer.wte.weight"})


def config_from_state_dict(state_dict: dict[str, torch.Tensor], n_heads: int | None = None) -> dict:
    """Rebuild a GPTModel config from the tensor shapes of a weights-only state dict.

    Shapes give vocab_size, context_length, emb_dim, n_layers and qkv_bias. They cannot tell
    the number of attention heads (the projections are emb_dim x emb_dim for any head count),
    so `n_heads` is taken from the argument, else from the GPT-2 size with this width, else
    from this chapter's quick config, else head_dim 64 (GPT-2's); a guess triggers a warning.
    """
    import re
    import warnings

    from ch04.gpt import GPT2_SIZES, GPT_CONFIG_124M, QUICK_CONFIG
    from llmfs.checkpoint import CheckpointMismatchError, fill_tied

    state_dict = fill_tied(state_dict)
    if "tok_emb.weight" not in state_dict or "pos_emb.weight" not in state_dict:
        raise CheckpointMismatchError("not a GPTModel state dict: tok_emb.weight / pos_emb.weight are missing")
    vocab_size, emb_dim = state_dict["tok_emb.weight"].shape
    context_length = state_dict["pos_emb.weight"].shape[0]
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"trf_blocks\.(\d+)\.", k))}
    n_layers = max(blocks) + 1 if blocks else 0
    if n_heads is None:
        by_width = {size["emb_dim"]: size["n_heads"] for size in GPT2_SIZES.values()}
        by_width.setdefault(QUICK_CONFIG["emb_dim"], QUICK_CONFIG["n_heads"])
        if emb_dim in by_width:
            n_heads = by_width[emb_dim]
        elif emb_dim % 64 == 0:
            n_heads = emb_dim // 64
        else:
            raise CheckpointMismatchError(
                f"cannot tell the number of attention heads of a model with emb_dim {emb_dim}; "
                "pass n_heads (the generate CLI: --n-heads) or keep config.json next to the weights")
        warnings.warn(f"the file stores no config: assuming n_heads={n_heads} for emb_dim {emb_dim} "
                      "(a wrong guess gives garbage text; pass n_heads / --n-heads to be sure)", stacklevel=2)
    return {
        **GPT_CONFIG_124M,
        "vocab_size": int(vocab_size), "context_length": int(context_length), "emb_dim": int(emb_dim),
        "n_heads": int(n_heads), "n_layers": n_layers,
        "qkv_bias": "trf_blocks.0.att.W_query.bias" in state_dict,
    }


def load_model_for_generation(spec: str | os.PathLike, device: torch.device | str = "cpu",
                              n_heads: int | None = None) -> tuple[nn.Module, str]:
    """A GPTModel in eval mode from what `--model` names, and a short description of it.

    `spec` is one of: a GPT-2 name ("gpt2", "gpt2-medium", ..., "124M", ...); a Hugging Face
    GPT-2 folder or .safetensors file; or a file written by chapter 5 (checkpoint.pth,
    model.pth, model.safetensors) or the folder holding it. The config of our own files comes
    from the checkpoint, the safetensors metadata or config.json beside model.pth; failing
    those it is inferred from tensor shapes (`n_heads` then settles the head count).
    """
    from ch04.gpt import REQUIRED_KEYS, GPTModel
    from ch05.gpt_download import load_pretrained_gpt2
    from llmfs.checkpoint import (
        check_model_config,
        check_state_dict,
        check_tensors,
        fill_tied,
        load_state_file,
        saved_config,
        sidecar_config,
    )
    from llmfs.errors import InvalidInput

    path = Path(spec).expanduser()
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "model.pth", "checkpoint.pth") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds none of model.safetensors, model.pth, checkpoint.pth")
        path = found[0]
    if not path.is_file():
        # A GPT-2 name (or a missing path, which load_pretrained_gpt2 reports clearly).
        model = load_pretrained_gpt2(str(spec), device=device)
        return model, f"OpenAI GPT-2 {spec!r}"
    if path.suffix == ".safetensors" and _is_hf_gpt2_file(path):
        return load_pretrained_gpt2(path, device=device), f"GPT-2 checkpoint {path}"

    if path.suffix == ".safetensors":
        state, cfg = load_state_file(path), saved_config(path)
    else:
        data = load_state_file(path)
        if "model_state_dict" in data:  # a training checkpoint
            state, cfg = data["model_state_dict"], data.get("config")
        else:
            state, cfg = data, sidecar_config(path)
    check_tensors(state, source=str(path))
    if cfg is None:
        cfg = config_from_state_dict(state, n_heads=n_heads)
    else:
        check_model_config(cfg, str(path), REQUIRED_KEYS)
    if n_heads is not None:
        if cfg["emb_dim"] % n_heads:  # a user's --n-heads
            raise InvalidInput(f"n_heads {n_heads} does not divide the model's emb_dim {cfg['emb_dim']}: attention "
                               "splits the embedding into n_heads equal parts")
        cfg = {**cfg, "n_heads": n_heads}
    model = GPTModel({**cfg, "drop_rate": 0.0})
    state = fill_tied(state)
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state)
    return model.to(device).eval(), f"{path} ({cfg['n_layers']} layers, emb_dim {cfg['emb_dim']})"


if __name__ == "__main__":
    import sys

    from ch05.cli import generate_main

    sys.exit(generate_main())
