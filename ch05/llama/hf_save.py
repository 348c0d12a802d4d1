"""Chapter 5 bonus: write our Llama 3 / Qwen3 / Gemma 3 model back as a Hugging Face model folder.

The inverse of the loaders' `load_hf_weights`: every parameter gets its Hugging Face name back
(the family's `hf_to_ours` rules read backwards), and the folder gets what `transformers` needs to
load it: config.json, model.safetensors, and the tokenizer files copied from the folder the model
came from. So a model fine-tuned here (chapter 7, appendix E's LoRA merged back in) loads with

    AutoModelForCausalLM.from_pretrained(out_dir)

and gives the same logits as ours.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from ch05.llama.gemma3 import _GEMMA_RENAMES
from ch05.llama.llama3 import _HF_RENAMES, read_hf_config
from llmfs.atomic import atomic_write

# Copied from the source folder when present: the tokenizer and the generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def _invert(rules: list[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    r"""Turn (HF regex, our name with \1, \2 groups) rules into (our-name regex, HF name) rules."""
    inverse = []
    for hf_pattern, ours in rules:
        groups = iter(range(1, 10))
        ours_regex = "^" + re.sub(r"\\\d", lambda m: r"(\d+)", re.escape(ours).replace(r"\\", "\\")) + "$"
        hf_name = re.sub(r"\(\\d\+\)", lambda m: f"\\{next(groups)}", hf_pattern.strip("^$")).replace("\\.", ".")
        inverse.append((re.compile(ours_regex), hf_name))
    return inverse


_OURS_TO_HF = _invert(_HF_RENAMES)
_OURS_TO_HF_GEMMA = _invert([(p.pattern, r) for p, r in _GEMMA_RENAMES]) + _OURS_TO_HF


def ours_to_hf(name: str, family: str = "llama") -> str:
    """The Hugging Face tensor name of our parameter `name` (KeyError when no rule fits)."""
    for pattern, repl in (_OURS_TO_HF_GEMMA if family.startswith("gemma3") else _OURS_TO_HF):
        if pattern.match(name):
            return pattern.sub(repl, name)
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def hf_state_dict(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names, contiguous and on the CPU; a tied output head
    is stored once (as the embedding), as `save_pretrained` does."""
    tied = model.cfg.get("tie_weights", False)
    state = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "out_head.weight":
            continue
        state[ours_to_hf(name, family)] = tensor.detach().to("cpu").contiguous().clone()
    return state


def save_hf_folder(model: nn.Module, out_dir: str | os.PathLike, source_dir: str | os.PathLike) -> Path:
    """Write `model` (loaded from the Hugging Face folder `source_dir`, perhaps fine-tuned since) into
    `out_dir` as a Hugging Face folder: source config.json (dtype set to the weights'), model.safetensors
    under Hugging Face names, the tokenizer files copied. Returns `out_dir`."""
    from safetensors.torch import save

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    hf = read_hf_config(source_dir)
    family = hf.get("model_type", "llama")
    state = hf_state_dict(model, family)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    hf = {**hf, "torch_dtype": dtype} if "torch_dtype" in hf else {**hf, "dtype": dtype}
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / "model.safetensors", "wb") as f:
        f.write(save(state, metadata={"format": "pt"}))
    for stale in ("model.safetensors.index.json",):  # an old sharded index would point transformers elsewhere
        (out_dir / stale).unlink(missing_ok=True)
    with atomic_write(out_dir / "config.json") as f:
        json.dump(hf, f, indent=2)
        f.write("\n")
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file() and (source_dir / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(source_dir / name, out_dir / name)
    return out_dir

