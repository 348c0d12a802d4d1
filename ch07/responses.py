"""Chapter 7, sections 7.6-7.7: the fine-tuned model's answers and files.

`generate_response` answers one record with chapter 5's `generate` (KV cache, stops at
<|endoftext|>), `extract_response` cuts the answer out of the generated text, and the answers
and the model are saved: the weights with their config beside them (`save_finetuned_model`,
`load_finetuned_model`, via `ch06.finetuning`), so other tools (`ch07.serve`, the apps, DPO)
can rebuild the model from one file name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from ch02.atomic import atomic_write
from ch04.gpt import GPTModel
from ch05.gpt_generate import generate
from ch05.gpt_train import text_to_token_ids
from ch06.finetuning import load_with_config, save_with_config
from ch07.gpt_instruction_finetuning import END_OF_TEXT_ID, RESPONSE_HEADERS, _check_style, format_input


def extract_response(generated_text: str, input_text: str, style: str = "alpaca") -> str:
    """The model's answer inside `generated_text` (the prompt plus what the model wrote).

    Drops the prompt, the response header ("### Response:", also when repeated) and
    everything from the first <|endoftext|> on, and strips surrounding whitespace.
    """
    _check_style(style)
    text = generated_text[len(input_text):] if generated_text.startswith(input_text) else generated_text
    text = text.split("<|endoftext|>", 1)[0].strip()
    header = RESPONSE_HEADERS[style]
    while text.startswith(header):  # a weakly trained model sometimes repeats the header
        text = text[len(header):].lstrip()
    return text.strip()


def context_size_of(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    return cfg["context_length"] if cfg else model.pos_emb.weight.shape[0]


def generate_response(model: nn.Module, entry: dict, tokenizer, device, max_new_tokens: int = 256,
                      style: str = "alpaca") -> str:
    """Greedy answer to one record: stops at <|endoftext|> or after `max_new_tokens` tokens."""
    input_text = format_input(entry, style)
    idx = text_to_token_ids(input_text, tokenizer).to(device)
    token_ids = generate(model, idx, max_new_tokens=max_new_tokens, context_size=context_size_of(model),
                         eos_id=END_OF_TEXT_ID, use_cache=True)
    generated_text = tokenizer.decode(token_ids[0].tolist())
    return extract_response(generated_text, input_text, style)


def generate_responses(model: nn.Module, data: list[dict], tokenizer, device, max_new_tokens: int = 256,
                       style: str = "alpaca", progress: bool = True) -> list[dict]:
    """Copies of the records with the model's answer added under "model_response"."""
    from tqdm.auto import tqdm

    out = []
    for entry in tqdm(data, desc="responses", unit="example", disable=not progress):
        out.append({**entry, "model_response": generate_response(model, entry, tokenizer, device,
                                                                 max_new_tokens, style)})
    return out


def save_responses(entries: list[dict], path: str | os.PathLike) -> Path:
    """Write the records (with "model_response") as indented JSON, atomically."""
    path = Path(path)
    with atomic_write(path, "w") as f:
        json.dump(entries, f, indent=4, ensure_ascii=False)
        f.write("\n")
    return path


def save_finetuned_model(model: nn.Module, path: str | os.PathLike, **metadata) -> Path:
    """The weights and, beside them (same name, .json), the config and `metadata` (the book saves
    `model.state_dict()` alone and rebuilds the model by hand; the config makes that automatic)."""
    return save_with_config(model, path, **metadata)


def load_finetuned_model(path: str | os.PathLike, device=None) -> tuple[GPTModel, dict]:
    """(model in eval mode, metadata) from files written by `save_finetuned_model`."""
    return load_with_config(path, device)
