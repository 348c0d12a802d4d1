"""Chapter 5, section 5.3: decoding strategies, plus a key/value cache for fast generation.

`generate` extends chapter 4's greedy loop with temperature scaling, top-k and
top-p (nucleus) filtering and an end-of-text stop. With `use_cache=True` each
step feeds only the newest token and reuses the keys/values of earlier ones,
so a token costs the same whether it is the 10th or the 200th.

From the command line, with OpenAI's GPT-2 weights (section 5.5) or a model
trained by `python -m ch05.gpt_train`:

    python -m ch05.gpt_generate --model gpt2 --prompt "Every effort moves you" \
        --max-new-tokens 50 --temperature 0.7 --top-k 50 --seed 123
    python -m ch05.gpt_generate --model outputs/ch05/checkpoint.pth --prompt "Every effort moves you"
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ch05.onednn_linear import add_no_onednn_argument, onednn_linear


def _check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set every logit outside the top-k / nucleus to -inf so softmax gives it probability 0.

    logits: (batch, vocab_size).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (batch, 1)
        logits = logits.masked_fill(logits < kth_best, -torch.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the best always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id from last-position logits (batch, vocab) -> (batch, 1).

    Order of operations (as in most libraries): scale by the temperature, then keep the
    top-k, then the nucleus (top-p) of the *scaled* distribution, then sample.
    """
    _check_sampling_args(temperature, top_k, top_p)
    if temperature == 0.0:
        # Greedy: filtering cannot change the argmax, so skip it.
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    # Subtracting the row maximum first changes no probability but keeps a tiny temperature
    # from overflowing to inf (inf - inf = nan): the best token becomes 0, the rest -large.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    probs = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# no_grad rather than inference_mode: under torch.autocast, inference mode turns off autocast's
# cache of low-precision weights, so every new token would cast all weights to bfloat16 again
# (GPT-2 124M on the benchmark CPU: 32 instead of 5 ms for the output head alone).
@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    top_p: float | None = None,
    use_cache: bool = False,
    generator: torch.Generator | None = None,
    use_onednn: bool = True,
) -> torch.Tensor:
    """Append up to `max_new_tokens` tokens to `idx` (batch, num_tokens).

    temperature 0 is greedy decoding; otherwise logits are divided by the
    temperature and sampled, after optional top-k / top-p filtering. Generation
    stops early when every sequence in the batch produced `eos_id` (the eos
    token is kept in the output).

    With `use_cache=True` the result is identical to `use_cache=False`. GPT-2
    uses absolute positions, so once the text is longer than `context_size` the
    window slides and the cache has to be rebuilt from the cropped window each
    step: from there on a step costs as much as without a cache.

    On an x86 CPU in float32 the linear layers run through oneDNN, which uses every core
    for the one-token products of a cached step (~1.4x faster for GPT-2 124M on the
    benchmark machine; see `ch05.onednn_linear`). `use_onednn=False` keeps PyTorch's
    default path; the tokens are the same.
    """
    _check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    was_training = model.training
    model.eval()
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    try:
        with onednn_linear(use_onednn and idx.device.type == "cpu"):  # the model sits where its input does
            for step in range(max_new_tokens):
                if not use_cache:
                    logits = model(idx[:, -context_size:])[:, -1, :]
                elif step == 0 or idx.shape[1] > context_size:
                    # (Re)fill the cache with the current window of at most context_size tokens.
                    model.reset_kv_cache()
                    logits = model(idx[:, -context_size:], use_cache=True)[:, -1, :]
                else:
                    # The cache holds every token but the newest one: feed just that.
                    logits = model(idx[:, -1:], use_cache=True)[:, -1, :]
                nxt = next_token(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                    finished |= nxt == eos_id
                idx = torch.cat([idx, nxt], dim=1)  # (batch, num_tokens + 1)
                if eos_id is not None and bool(finished.all()):
                    break
    finally:
        if use_cache:
            model.reset_kv_cache()
        model.train(was_training)
    return idx


# --- Command line ------------------------------------------------------------------------------

def _is_hf_gpt2_file(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    return bool(keys & {"wte.weight", "transformer.wte.weight"})


def load_model_for_generation(spec: str | os.PathLike, device: torch.device | str = "cpu",
                              n_heads: int | None = None) -> tuple[nn.Module, str]:
    """A GPTModel in eval mode from what `--model` names, and a short description of it.

    `spec` is one of: a GPT-2 name ("gpt2", "gpt2-medium", ..., "124M", ...); a Hugging Face
    GPT-2 folder or .safetensors file; or a file written by chapter 5 (checkpoint.pth,
    model.pth, model.safetensors) or the folder holding it. The config of our own files comes
    from the checkpoint, the safetensors metadata or config.json beside model.pth; failing
    those it is inferred from tensor shapes (`n_heads` then settles the head count).
    """
    from safetensors.torch import load_file

    from ch04.gpt import GPTModel
    from ch05.checkpoint import (
        _fill_tied,
        check_state_dict,
        config_from_state_dict,
        load_state_file,
        saved_config,
        sidecar_config,
    )
    from ch05.gpt_download import load_pretrained_gpt2

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
        state, cfg = load_file(str(path)), saved_config(path)
    else:
        data = load_state_file(path)
        if "model_state_dict" in data:  # a training checkpoint
            state, cfg = data["model_state_dict"], data.get("config")
        else:
            state, cfg = data, sidecar_config(path)
    if cfg is None:
        cfg = config_from_state_dict(state, n_heads=n_heads)
    elif n_heads is not None:
        cfg = {**cfg, "n_heads": n_heads}
    model = GPTModel({**cfg, "drop_rate": 0.0})
    state = _fill_tied(state)
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state)
    return model.to(device).eval(), f"{path} ({cfg['n_layers']} layers, emb_dim {cfg['emb_dim']})"


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """--temperature, --top-k, --top-p and --seed, shared with `ch05.generate_llm`."""
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); e.g. 0.7 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only from the nucleus of mass p (0 < p <= 1)")
    p.add_argument("--seed", type=int, default=123, help="random seed for sampling (default 123)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate text with GPT-2 or a model trained in chapter 5.")
    p.add_argument("--model", default="gpt2",
                   help="gpt2, gpt2-medium, gpt2-large, gpt2-xl (or 124M ... 1558M); a Hugging Face GPT-2 "
                        "folder or .safetensors file; or checkpoint.pth / model.pth from ch05.gpt_train")
    p.add_argument("--prompt", default="Every effort moves you", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add (default 50)")
    add_sampling_arguments(p)
    p.add_argument("--no-cache", action="store_true", help="recompute all tokens each step (no KV cache)")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at <|endoftext|>")
    p.add_argument("--n-heads", type=int, default=None,
                   help="attention heads, for a weights-only file without config (normally inferred)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    add_no_onednn_argument(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Print the prompt and its continuation. Exit code 2, with a message and no traceback,
    when the model cannot be loaded or the arguments are invalid."""
    from ch02.runtime import get_device
    from ch02.tokenizer import get_gpt2_tokenizer
    from ch05.checkpoint import CheckpointMismatchError
    from ch05.gpt_download import PretrainedWeightsUnavailable
    from ch05.gpt_train import text_to_token_ids, token_ids_to_text

    args = parse_args(argv)
    try:
        _check_sampling_args(args.temperature, args.top_k, args.top_p)
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        device = get_device(args.device)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            model, described = load_model_for_generation(args.model, device=device, n_heads=args.n_heads)
        tokenizer = get_gpt2_tokenizer()
        idx = text_to_token_ids(args.prompt, tokenizer).to(device)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        print(f"model: {described}; device: {device}", file=sys.stderr)
        out = generate(model, idx, max_new_tokens=args.max_new_tokens, context_size=model.cfg["context_length"],
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       eos_id=tokenizer.eot_token if args.stop_at_eos else None,
                       use_cache=not args.no_cache, generator=generator, use_onednn=not args.no_onednn)
    except (PretrainedWeightsUnavailable, CheckpointMismatchError, FileNotFoundError, ValueError,
            RuntimeError, pickle.UnpicklingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(token_ids_to_text(out, tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
