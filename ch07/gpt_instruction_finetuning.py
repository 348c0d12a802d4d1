"""Chapter 7: fine-tuning a GPT model to follow instructions, sections 7.2-7.7, the book's listings.

* 7.2 the instruction data: `download_and_load_file` (the book's listing, offline-first),
  `load_instruction_data` (validated records, `llmfs.instruction_data`), the Alpaca-style prompt (`format_input`,
  `format_response`) and the 85/10/5 split (`split_data`);
* 7.3 batching: `InstructionDataset` (pre-tokenized prompt + response), the book's two drafts
  and `custom_collate_fn` (pad per batch, shift targets, hide padding -- and optionally the
  instruction -- from the loss with -100);
* 7.4 `create_instruction_loaders`.

Training reuses chapter 5 unchanged (`train_model_simple`, `calc_loss_loader`:
`F.cross_entropy` skips targets equal to -100). Answers and the fine-tuned model's files
follow (7.6-7.7); the chapter's run as a script is `ch07.cli`:

    python -m ch07.gpt_instruction_finetuning                # the book's run: GPT-2 medium (355M), 2 epochs
    python -m ch07.gpt_instruction_finetuning --quick        # offline: a small model from scratch, ~1 minute
    python -m ch07.gpt_instruction_finetuning --quick --init-checkpoint outputs/ch05/model.pth
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Sequence

import requests
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ch04.gpt import REQUIRED_KEYS, GPTModel
from ch05.gpt_generate import generate
from ch05.gpt_train import text_to_token_ids
from llmfs.atomic import atomic_write
from llmfs.download import data_file_for_url, get_data_file
from llmfs.finetuning import load_with_config, save_with_config
from llmfs.instruction_data import (  # noqa: F401  (checked reading of the data files; imported from here too)
    INSTRUCTION_DATA_FILE,
    load_instruction_data,
    read_json_file,
    validate_instruction_data,
)

END_OF_TEXT_ID = 50256  # GPT-2's <|endoftext|>, used as padding and as the stop token
IGNORE_INDEX = -100     # targets with this value add nothing to F.cross_entropy's loss

# --- 7.2 Preparing a dataset for supervised instruction fine-tuning -----------------------------

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
PROMPT_STYLES = ("alpaca", "phi3")
# The line that introduces the answer; what the model writes after it is the response.
RESPONSE_HEADERS = {"alpaca": "### Response:", "phi3": "<|assistant|>"}


def check_style(style: str) -> None:
    """Raise a ValueError naming the choices unless `style` is one of PROMPT_STYLES."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {PROMPT_STYLES}")


def format_input(entry: dict, style: str = "alpaca") -> str:
    """The prompt part of a record: preamble, instruction and (if non-empty) input.

    style="alpaca" (the chapter's format)::

        Below is an instruction ... completes the request.

        ### Instruction:
        <instruction>

        ### Input:
        <input>

    style="phi3" (exercise 7.1)::

        <|user|>
        <instruction>
        <input>
    """
    check_style(style)
    extra = entry.get("input") or ""
    if style == "phi3":
        return f"<|user|>\n{entry['instruction']}" + (f"\n{extra}" if extra else "")
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    return text + (f"\n\n### Input:\n{extra}" if extra else "")


def format_response(entry: dict, style: str = "alpaca") -> str:
    """The answer part that follows `format_input(entry)` in a training example."""
    check_style(style)
    if style == "phi3":
        return f"\n{RESPONSE_HEADERS['phi3']}\n{entry['output']}"
    return f"\n\n{RESPONSE_HEADERS['alpaca']}\n{entry['output']}"


def split_data(data: list, train_frac: float = 0.85, test_frac: float = 0.10) -> tuple[list, list, list]:
    """Split in file order into (train, test, validation), as the chapter does.

    train gets int(n * 0.85) records, test int(n * 0.10), validation the rest:
    935 / 110 / 55 for the chapter's 1,100 records. The file is already in random
    order, so no shuffling is needed (and the split is the same on every machine).
    """
    if not (0 < train_frac < 1 and 0 <= test_frac < 1 and train_frac + test_frac <= 1):
        raise ValueError(f"need 0 < train_frac < 1, 0 <= test_frac and train_frac + test_frac <= 1, "
                         f"got {train_frac}, {test_frac}")
    n_train = int(len(data) * train_frac)
    n_test = int(len(data) * test_frac)
    return data[:n_train], data[n_train:n_train + n_test], data[n_train + n_test:]


def download_and_load_file(file_path: str | os.PathLike, url: str):
    """The book's listing 7.1: keep a copy of `url` at `file_path` (once) and return its parsed JSON.

    The chapter's URL is served by `llmfs.download.get_data_file` (offline mirror, cache, or a
    download checked by sha256); any other URL is fetched as is. Unlike `load_instruction_data`,
    the records are returned unchecked, as in the book.
    """
    file_path = Path(file_path)
    if not file_path.exists():
        name = data_file_for_url(url)
        if name is not None:
            data = get_data_file(name).read_bytes()
        else:
            response = requests.get(url, timeout=60)
            response.raise_for_status()
            data = response.content
        with atomic_write(file_path, "wb") as f:
            f.write(data)
    return read_json_file(file_path)


# --- 7.3 Organizing data into training batches ---------------------------------------------------

class InstructionDataset(Dataset):
    """Every record as one token-id list: prompt followed by response, tokenized once up front.

    The prompt and the response are encoded separately and concatenated, so the
    number of prompt tokens is exact (kept in `prompt_lengths`). With
    `mask_instructions=True` an item is `(token_ids, prompt_length)`, which tells
    `custom_collate_fn` to hide the prompt's targets from the loss too (exercise 7.2).
    """

    def __init__(self, data: list[dict], tokenizer, mask_instructions: bool = False, style: str = "alpaca"):
        check_style(style)
        self.data = data
        self.mask_instructions = mask_instructions
        self.encoded_texts: list[list[int]] = []
        self.prompt_lengths: list[int] = []
        for entry in data:
            prompt_ids = tokenizer.encode(format_input(entry, style))
            response_ids = tokenizer.encode(format_response(entry, style))
            self.encoded_texts.append(prompt_ids + response_ids)
            self.prompt_lengths.append(len(prompt_ids))

    def __getitem__(self, index: int):
        if self.mask_instructions:
            return self.encoded_texts[index], self.prompt_lengths[index]
        return self.encoded_texts[index]

    def __len__(self) -> int:
        return len(self.encoded_texts)


def split_item(item) -> tuple[list[int], int | None]:
    """An item is a token-id sequence, or a pair (token ids, prompt length)."""
    if isinstance(item, tuple) and len(item) == 2 and not isinstance(item[0], int) \
            and isinstance(item[1], int):
        ids, prompt_len = item
        return list(ids), prompt_len
    if isinstance(item, torch.Tensor):
        return item.tolist(), None
    return list(item), None


def custom_collate_fn(
    batch: Sequence,
    pad_token_id: int = END_OF_TEXT_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a list of token-id lists into (inputs, targets) tensors of shape (batch, length).

    1. Append one `pad_token_id` (<|endoftext|>) to every example, so the model
       learns to end its answer, then pad to the longest example in *this* batch.
    2. Inputs drop the last token, targets drop the first (shift by one).
    3. Targets after the first end-of-text token become `ignore_index`, so
       padding adds nothing to the loss.
    4. Items given as `(token_ids, prompt_length)` (see `InstructionDataset`)
       also get the targets that predict prompt tokens set to `ignore_index`:
       the loss then covers only the response.
    5. With `allowed_max_length`, both tensors are cut to that many tokens
       (keep it <= the model's context length).
    """
    if len(batch) == 0:
        raise ValueError("custom_collate_fn got an empty batch")
    items = [split_item(item) for item in batch]
    batch_max_length = max(len(ids) + 1 for ids, _ in items)  # +1: the end-of-text token

    inputs_lst, targets_lst = [], []
    for ids, prompt_len in items:
        padded = ids + [pad_token_id] * (batch_max_length - len(ids))  # at least one pad token
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        # targets[len(ids) - 1] is the first end-of-text token (kept: it teaches stopping);
        # every position after it is padding.
        targets[len(ids):] = ignore_index
        if prompt_len is not None:
            # targets[i] is the token after inputs[i]; targets[:prompt_len - 1] are prompt tokens.
            targets[:max(prompt_len - 1, 0)] = ignore_index
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    inputs_tensor = torch.stack(inputs_lst).to(device)    # (batch, length)
    targets_tensor = torch.stack(targets_lst).to(device)  # (batch, length)
    return inputs_tensor, targets_tensor


def custom_collate_draft_1(
    batch,
    pad_token_id=50256,
    device="cpu"
):
    """The book's first draft of the collate function: inputs only, padded per batch."""
    # Find the longest sequence in the batch
    # and increase the max length by +1, which will add one extra
    # padding token below
    batch_max_length = max(len(item)+1 for item in batch)

    # Pad and prepare inputs
    inputs_lst = []

    for item in batch:
        new_item = item.copy()
        # Add an <|endoftext|> token
        new_item += [pad_token_id]
        # Pad sequences to batch_max_length
        padded = (
            new_item + [pad_token_id] *
            (batch_max_length - len(new_item))
        )
        # Via padded[:-1], we remove the extra padded token
        # that has been added via the +1 setting in batch_max_length
        # (the extra padding token will be relevant in later codes)
        inputs = torch.tensor(padded[:-1])
        inputs_lst.append(inputs)

    # Convert list of inputs to tensor and transfer to target device
    inputs_tensor = torch.stack(inputs_lst).to(device)
    return inputs_tensor


def custom_collate_draft_2(
    batch,
    pad_token_id=50256,
    device="cpu"
):
    """The book's second draft: (inputs, targets), targets shifted by one; padding not yet masked."""
    # Find the longest sequence in the batch
    batch_max_length = max(len(item)+1 for item in batch)

    # Pad and prepare inputs
    inputs_lst, targets_lst = [], []

    for item in batch:
        new_item = item.copy()
        # Add an <|endoftext|> token
        new_item += [pad_token_id]
        # Pad sequences to max_length
        padded = (
            new_item + [pad_token_id] *
            (batch_max_length - len(new_item))
        )
        inputs = torch.tensor(padded[:-1])  # Truncate the last token for inputs
        targets = torch.tensor(padded[1:])  # Shift +1 to the right for targets
        inputs_lst.append(inputs)
        targets_lst.append(targets)

    # Convert list of inputs to tensor and transfer to target device
    inputs_tensor = torch.stack(inputs_lst).to(device)
    targets_tensor = torch.stack(targets_lst).to(device)
    return inputs_tensor, targets_tensor


# --- 7.4 Creating data loaders for an instruction dataset ----------------------------------------

def create_instruction_loaders(train_data: list[dict], val_data: list[dict], test_data: list[dict] | None,
                               tokenizer, batch_size: int = 8, allowed_max_length: int | None = 1024,
                               device: str | torch.device = "cpu", mask_instructions: bool = False,
                               style: str = "alpaca", num_workers: int = 0, seed: int = 123) -> tuple:
    """(train_loader, val_loader, test_loader); test_loader is None when `test_data` is None.

    The training loader shuffles (with its own seeded generator) and drops an
    incomplete last batch; the others keep every record in file order.
    """
    collate = functools.partial(custom_collate_fn, device=device, allowed_max_length=allowed_max_length)

    def loader(data, train):
        dataset = InstructionDataset(data, tokenizer, mask_instructions=mask_instructions, style=style)
        generator = torch.Generator().manual_seed(seed) if train else None
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, shuffle=train, drop_last=train,
                          num_workers=num_workers, generator=generator)

    train_loader = loader(train_data, True)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_data)} training records make no full batch of {batch_size}; "
                         "use more records or a smaller batch size")
    return train_loader, loader(val_data, False), (loader(test_data, False) if test_data is not None else None)


# --- 7.6-7.7 Answers, and the fine-tuned model's files ----------------------------------------------
# `generate_response` answers one record with chapter 5's `generate` (KV cache, stops at <|endoftext|>),
# `extract_response` cuts the answer out of the generated text; the weights are saved with their config
# beside them (`save_finetuned_model`), so other tools (the server, the apps, DPO) rebuild the model from
# one file name.

def extract_response(generated_text: str, input_text: str, style: str = "alpaca") -> str:
    """The model's answer inside `generated_text` (the prompt plus what the model wrote).

    Drops the prompt, the response header ("### Response:", also when repeated) and
    everything from the first <|endoftext|> on, and strips surrounding whitespace.
    """
    check_style(style)
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
    return load_with_config(path, device, build=lambda meta: GPTModel(meta["config"]),
                            required=REQUIRED_KEYS)


if __name__ == "__main__":
    import sys

    from ch07.cli import main

    sys.exit(main())
