"""Chapter 7: fine-tuning a GPT model to follow instructions (sections 7.2-7.7).

What this module holds, in the chapter's order:

* 7.2 the instruction data: `load_instruction_data` (validated records), the
  Alpaca-style prompt (`format_input`, `format_response`) and the 85/10/5 split
  (`split_data`);
* 7.3 batching: `InstructionDataset` (pre-tokenized prompt + response) and
  `custom_collate_fn` (pad per batch, shift targets, hide padding -- and
  optionally the instruction -- from the loss with -100);
* 7.4 `create_instruction_loaders`;
* 7.5 the starting model: OpenAI's GPT-2 weights via `ch05.gpt_download`, a
  model from scratch, or any checkpoint saved with `ch05.checkpoint.save_model`;
* 7.7 `generate_response` / `extract_response` / `save_responses`, and
  `save_finetuned_model` / `load_finetuned_model`.

Training reuses chapter 5 unchanged (`train_model_simple`, `calc_loss_loader`:
`F.cross_entropy` skips targets equal to -100). Generation uses chapter 5's
`generate` with the KV cache.

    python -m ch07.gpt_instruction_finetuning                # the book's run: GPT-2 medium (355M), 2 epochs
    python -m ch07.gpt_instruction_finetuning --quick        # offline: a small model from scratch, ~1 minute
    python -m ch07.gpt_instruction_finetuning --quick --init-checkpoint outputs/ch05/model.pth
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import requests
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ch02.atomic import atomic_write
from ch02.download import data_file_for_url, get_data_file
from ch02.runtime import get_device, set_seed
from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT2_SIZES, GPT_CONFIG_124M, GPTModel
from ch05.checkpoint import load_model, save_model
from ch05.gpt_generate import generate
from ch05.gpt_train import (
    calc_loss_loader,
    forward_context,
    make_optimizer,
    plot_losses,
    text_to_token_ids,
    train_model_simple,
)
from ch05.onednn_linear import add_no_onednn_argument

INSTRUCTION_DATA_FILE = "instruction-data.json"
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


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {PROMPT_STYLES}")


def validate_instruction_data(data, source: str = "instruction data",
                              required: Sequence[str] = ("instruction", "output"),
                              optional: Sequence[str] = ("input",)) -> list[dict]:
    """Check that `data` is a list of records with string fields; return it unchanged.

    Every key in `required` must be present and a string; keys in `optional` may be
    missing but must be strings when present. The error names the record's index
    and the key, so a broken record in a file of thousands is easy to find.
    """
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a JSON list of records, got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: record {i} is a {type(entry).__name__}, expected an object with "
                             f"keys {list(required)}")
        for key in required:
            if key not in entry:
                raise ValueError(f"{source}: record {i} is missing the key {key!r}")
            if not isinstance(entry[key], str):
                raise ValueError(f"{source}: record {i} has {key!r} of type {type(entry[key]).__name__}, "
                                 "expected a string")
        for key in optional:
            if key in entry and not isinstance(entry[key], str):
                raise ValueError(f"{source}: record {i} has {key!r} of type {type(entry[key]).__name__}, "
                                 "expected a string")
    return data


def read_json_file(path: str | os.PathLike):
    """Parse a JSON file; a syntax error names the file, line, column and character offset."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno} "
                         f"(char {exc.pos})") from None


def load_instruction_data(path: str | os.PathLike | None = None) -> list[dict]:
    """Read and validate an instruction file (default: the chapter's `instruction-data.json`).

    Each record is `{"instruction": str, "input": str (optional, may be ""), "output": str}`.
    """
    if path is None:
        path = get_data_file(INSTRUCTION_DATA_FILE)
    return validate_instruction_data(read_json_file(path), source=str(path))


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
    _check_style(style)
    extra = entry.get("input") or ""
    if style == "phi3":
        return f"<|user|>\n{entry['instruction']}" + (f"\n{extra}" if extra else "")
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    return text + (f"\n\n### Input:\n{extra}" if extra else "")


def format_response(entry: dict, style: str = "alpaca") -> str:
    """The answer part that follows `format_input(entry)` in a training example."""
    _check_style(style)
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

    The chapter's URL is served by `ch02.download.get_data_file` (offline mirror, cache, or a
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
        _check_style(style)
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


def _split_item(item) -> tuple[list[int], int | None]:
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
    items = [_split_item(item) for item in batch]
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


def custom_collate_draft_1(batch: Sequence, pad_token_id: int = END_OF_TEXT_ID,
                           device: str | torch.device = "cpu") -> torch.Tensor:
    """The book's first draft of the collate function: inputs only, padded per batch.

    Every item gets one end-of-text token, then all are padded to the longest
    item + 1 and the last position is dropped, so the longest item keeps its
    end-of-text token only in the targets (which draft 2 adds).
    """
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst = []
    for item in batch:
        padded = list(item) + [pad_token_id] * (batch_max_length - len(item))
        inputs_lst.append(torch.tensor(padded[:-1]))
    return torch.stack(inputs_lst).to(device)  # (batch, batch_max_length - 1)


def custom_collate_draft_2(batch: Sequence, pad_token_id: int = END_OF_TEXT_ID,
                           device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The book's second draft: (inputs, targets), targets shifted by one; padding not yet masked."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        padded = list(item) + [pad_token_id] * (batch_max_length - len(item))
        inputs_lst.append(torch.tensor(padded[:-1]))
        targets_lst.append(torch.tensor(padded[1:]))
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)  # (batch, length) each


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


# --- 7.5 Loading a pretrained LLM ----------------------------------------------------------------

# The offline stand-in for GPT-2: small enough to fine-tune in about a minute on two CPU cores,
# with a context long enough for every record of the chapter's data (the longest is 91 tokens).
QUICK_CONFIG = {**GPT_CONFIG_124M, "context_length": 256, "emb_dim": 128, "n_heads": 4, "n_layers": 2,
                "drop_rate": 0.0}


class PretrainedUnavailableError(RuntimeError):
    """OpenAI's GPT-2 weights could not be loaded (offline, no cache, loader missing)."""


def pretrained_unavailable_message(model_name: str, reason: object) -> str:
    reason = str(reason)
    how_to_get = "" if "HF_ENDPOINT" in reason else (
        "To get them: connect to the network once (they are downloaded from Hugging Face and cached), set\n"
        "HF_ENDPOINT to a Hugging Face mirror you can reach (e.g. HF_ENDPOINT=https://hf-mirror.com), or pass\n"
        "a local copy with --model /path/to/folder-with-model.safetensors.\n")
    return (
        f"Could not load the pretrained {model_name!r} weights: {reason}\n{how_to_get}"
        "Or fine-tune offline, without OpenAI's weights:\n"
        "  --quick                  a small model trained from scratch (about a minute on a CPU)\n"
        "  --from-scratch           the full-size model, randomly initialized (slow on a CPU)\n"
        "  --init-checkpoint FILE   start from a chapter-5 model, e.g. outputs/ch05/model.pth "
        "(`python -m ch05.gpt_train --quick`)"
    )


def load_pretrained_model(model_name: str = "gpt2-medium", device=None) -> GPTModel:
    """OpenAI's GPT-2 weights via `ch05.gpt_download` with dropout off (the chapter's choice).

    Raises PretrainedUnavailableError with advice when they cannot be had.
    """
    try:
        from ch05.gpt_download import PretrainedWeightsUnavailable, load_pretrained_gpt2
    except ImportError as exc:  # the loader module is optional for the offline path
        raise PretrainedUnavailableError(pretrained_unavailable_message(
            model_name, f"the weight loader ch05.gpt_download cannot be imported ({exc})")) from exc
    try:
        return load_pretrained_gpt2(model_name, drop_rate=0.0, device=device)
    except PretrainedWeightsUnavailable as exc:
        raise PretrainedUnavailableError(pretrained_unavailable_message(model_name, exc)) from exc


def scratch_config(model_name: str = "gpt2-medium") -> dict:
    """GPT-2's shape for `model_name` (context 1024, qkv bias, no dropout), for training from scratch."""
    if model_name not in GPT2_SIZES:
        raise ValueError(f"unknown GPT-2 size {model_name!r}; choose one of {sorted(GPT2_SIZES)}")
    return {**GPT_CONFIG_124M, **GPT2_SIZES[model_name], "context_length": 1024, "qkv_bias": True,
            "drop_rate": 0.0}


def load_init_checkpoint(path: str | os.PathLike, device=None) -> GPTModel:
    """A GPTModel (dropout off) from a file chapter 5 wrote: checkpoint.pth, model.pth or .safetensors.

    The config comes from the file (or config.json beside it), else from the tensor
    shapes; see `ch05.gpt_generate.load_model_for_generation`.
    """
    from ch05.gpt_generate import load_model_for_generation

    if not Path(path).is_file():
        raise FileNotFoundError(f"--init-checkpoint {path} does not exist (create one with "
                                "`python -m ch05.gpt_train --quick`, which writes outputs/ch05/model.pth)")
    model, _ = load_model_for_generation(path, device=device or "cpu")
    return model


# --- 7.7 Extracting and saving responses ---------------------------------------------------------

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
                      style: str = "alpaca", use_onednn: bool = True) -> str:
    """Greedy answer to one record: stops at <|endoftext|> or after `max_new_tokens` tokens.

    `use_onednn`: see `ch05.gpt_generate.generate` (on an x86 CPU, faster; same tokens)."""
    input_text = format_input(entry, style)
    idx = text_to_token_ids(input_text, tokenizer).to(device)
    token_ids = generate(model, idx, max_new_tokens=max_new_tokens, context_size=context_size_of(model),
                         eos_id=END_OF_TEXT_ID, use_cache=True, use_onednn=use_onednn)
    generated_text = tokenizer.decode(token_ids[0].tolist())
    return extract_response(generated_text, input_text, style)


def generate_responses(model: nn.Module, data: list[dict], tokenizer, device, max_new_tokens: int = 256,
                       style: str = "alpaca", progress: bool = True, use_onednn: bool = True) -> list[dict]:
    """Copies of the records with the model's answer added under "model_response"."""
    from tqdm.auto import tqdm

    out = []
    for entry in tqdm(data, desc="responses", unit="example", disable=not progress):
        out.append({**entry, "model_response": generate_response(model, entry, tokenizer, device,
                                                                 max_new_tokens, style, use_onednn)})
    return out


def save_responses(entries: list[dict], path: str | os.PathLike) -> Path:
    """Write the records (with "model_response") as indented JSON, atomically."""
    path = Path(path)
    with atomic_write(path, "w") as f:
        json.dump(entries, f, indent=4, ensure_ascii=False)
        f.write("\n")
    return path


def save_finetuned_model(model: nn.Module, path: str | os.PathLike, **metadata) -> Path:
    """Save the weights (ch05's `save_model`) and, next to them, a JSON file with the config.

    `load_finetuned_model(path)` rebuilds the model from the two files.
    """
    path = save_model(model, path)
    with atomic_write(path.with_suffix(".json"), "w") as f:
        json.dump({"config": dict(model.cfg), **metadata}, f, indent=2)
    return path


def load_finetuned_model(path: str | os.PathLike, device=None) -> tuple[GPTModel, dict]:
    """(model in eval mode, metadata) from files written by `save_finetuned_model`."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: it holds the model config and is written next to "
                                f"the weights by save_finetuned_model()")
    meta = read_json_file(meta_path)
    model = GPTModel(meta["config"])
    load_model(model, path)
    return model.to(device or "cpu").eval(), meta


# --- The chapter's run, as a script --------------------------------------------------------------

DEFAULT_SETTINGS = {
    "learning_rate": 5e-5, "weight_decay": 0.1, "batch_size": 8, "num_epochs": 2,
    "eval_freq": 5, "eval_iter": 5, "seed": 123, "allowed_max_length": 1024,
    "max_new_tokens": 256, "num_train": None, "num_test": None, "sample_tokens": 35,
    "style": "alpaca",
}
# From scratch a small model needs a much larger learning rate; fewer records and tokens keep it ~1 minute.
QUICK_SETTINGS = {
    **DEFAULT_SETTINGS, "learning_rate": 2e-3, "num_epochs": 2, "eval_freq": 10, "eval_iter": 2,
    "num_train": 320, "num_test": 3, "max_new_tokens": 32, "sample_tokens": 0,
}


def main(settings: dict, output_dir: str | os.PathLike = "outputs/ch07", *, model_name: str = "gpt2-medium",
         quick: bool = False, from_scratch: bool = False, init_checkpoint: str | None = None,
         cfg: dict | None = None, mask_instructions: bool = False, device=None, data: list[dict] | None = None,
         progress: bool = True, use_onednn: bool = True) -> dict:
    """Fine-tune, plot the losses, answer the test records and save everything in `output_dir`.

    The starting model is, in this order: `init_checkpoint`; a fresh model of `cfg`
    (or QUICK_CONFIG when `quick`, or GPT-2 `model_name`'s shape with
    `from_scratch`); otherwise OpenAI's pretrained `model_name` (raises
    PretrainedUnavailableError when offline). `use_onednn` (default on): on an x86 CPU, float32
    linear layers run through oneDNN in training, evaluation and generation (same results, faster).
    """
    device = torch.device(device) if device is not None else get_device()
    output_dir = Path(output_dir)
    style = settings.get("style", "alpaca")
    set_seed(settings["seed"])
    tokenizer = get_gpt2_tokenizer()

    data = load_instruction_data() if data is None else validate_instruction_data(data)
    train_data, test_data, val_data = split_data(data)
    if settings.get("num_train"):
        train_data = train_data[:settings["num_train"]]
    if settings.get("num_test"):
        test_data = test_data[:settings["num_test"]]

    if init_checkpoint:
        model, tag = load_init_checkpoint(init_checkpoint, device), "init"
        source = f"weights from {init_checkpoint}"
    elif cfg is not None or quick or from_scratch:
        cfg = cfg or (QUICK_CONFIG if quick else scratch_config(model_name))
        model, tag = GPTModel(cfg).to(device), ("quick" if quick else f"{model_name}-scratch")
        source = "random initialization"
    else:
        model, tag = load_pretrained_model(model_name, device), Path(str(model_name)).name
        source = f"OpenAI's pretrained {model_name}"
    model.to(device)
    context_length = model.cfg["context_length"]
    allowed = min(settings.get("allowed_max_length") or context_length, context_length)

    train_loader, val_loader, _ = create_instruction_loaders(
        train_data, val_data, None, tokenizer, batch_size=settings["batch_size"], allowed_max_length=allowed,
        device="cpu", mask_instructions=mask_instructions, style=style, seed=settings["seed"])
    too_long = sum(len(ids) + 1 > allowed for ids in train_loader.dataset.encoded_texts)
    print(f"device: {device}; model: {source}, {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"records: {len(train_data)} train, {len(val_data)} validation, {len(test_data)} test; "
          f"{len(train_loader)} batches per epoch" + (f"; {too_long} training examples are longer than "
                                                     f"{allowed} tokens and get truncated" if too_long else ""))

    with torch.no_grad(), forward_context(device, None, use_onednn):
        model.eval()
        start_train = calc_loss_loader(train_loader, model, device, num_batches=settings["eval_iter"])
        start_val = calc_loss_loader(val_loader, model, device, num_batches=settings["eval_iter"])
        model.train()
    print(f"before fine-tuning: train loss {start_train:.3f}, val loss {start_val:.3f}")

    optimizer = make_optimizer(model, settings["learning_rate"], settings["weight_decay"])
    start = time.perf_counter()
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, device,
        num_epochs=settings["num_epochs"], eval_freq=settings["eval_freq"], eval_iter=settings["eval_iter"],
        start_context=format_input(val_data[0], style), tokenizer=tokenizer,
        sample_tokens=settings.get("sample_tokens", 35), progress=progress, use_onednn=use_onednn)
    train_seconds = time.perf_counter() - start
    print(f"training took {train_seconds / 60:.2f} min")

    output_dir.mkdir(parents=True, exist_ok=True)
    plot_path = None
    if train_losses:
        import matplotlib.pyplot as plt

        epochs_seen = torch.linspace(0, settings["num_epochs"], len(train_losses)).tolist()
        plot_path = output_dir / "loss-plot.png"
        plt.close(plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, plot_path))

    responses = generate_responses(model, test_data, tokenizer, device, settings["max_new_tokens"], style,
                                   progress=progress, use_onednn=use_onednn)
    responses_path = save_responses(responses, output_dir / "instruction-data-with-response.json")
    model_path = save_finetuned_model(
        model, output_dir / f"{tag}-sft.pth", style=style, mask_instructions=mask_instructions, source=source,
        settings={k: v for k, v in settings.items()})
    print(f"responses: {responses_path}\nmodel: {model_path}")
    return {"model": model, "train_losses": [start_train, *train_losses], "val_losses": [start_val, *val_losses],
            "tokens_seen": [0, *tokens_seen], "responses": responses, "responses_path": responses_path,
            "model_path": model_path, "plot_path": plot_path, "seconds": train_seconds}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Instruction fine-tune a GPT model (chapter 7) and answer the "
                                            "test instructions.")
    p.add_argument("--model", default="gpt2-medium",
                   help="GPT-2 size (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local weights path "
                        "(default gpt2-medium, 355M, as in the book)")
    p.add_argument("--quick", action="store_true",
                   help="offline: a small model from scratch, 320 records, 3 test answers (about a minute)")
    p.add_argument("--from-scratch", action="store_true", help="random initial weights instead of OpenAI's")
    p.add_argument("--init-checkpoint", default=None,
                   help="start from weights saved by ch05.checkpoint.save_model (e.g. outputs/ch05/model.pth)")
    p.add_argument("--mask-instructions", action="store_true",
                   help="compute the loss on the response tokens only (exercise 7.2)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default=None, help="prompt format (default alpaca)")
    p.add_argument("--epochs", type=int, help="number of epochs (default 2)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 5e-5; quick: 2e-3)")
    p.add_argument("--batch-size", type=int, help="batch size (default 8)")
    p.add_argument("--num-test", type=int, help="answer only the first N test records (default all; quick: 3)")
    p.add_argument("--max-new-tokens", type=int, help="answer length cap (default 256; quick: 32)")
    p.add_argument("--seed", type=int, help="random seed (default 123)")
    p.add_argument("--output-dir", default="outputs/ch07", help="where responses, model and plot go")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_no_onednn_argument(p)
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> dict:
    settings = dict(QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS)
    overrides = {"num_epochs": args.epochs, "learning_rate": args.lr, "batch_size": args.batch_size,
                 "num_test": args.num_test, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                 "style": args.prompt_style}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def cli(argv=None) -> int:
    args = parse_args(argv)
    try:
        main(settings_from_args(args), args.output_dir, model_name=args.model, quick=args.quick,
             from_scratch=args.from_scratch, init_checkpoint=args.init_checkpoint,
             mask_instructions=args.mask_instructions, device=args.device, progress=not args.no_progress,
             use_onednn=not args.no_onednn)
    except PretrainedUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
