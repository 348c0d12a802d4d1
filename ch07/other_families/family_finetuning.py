"""Chapter 7 bonus: instruction fine-tuning of Llama 3, Qwen3 and Gemma 3 (ch05.llama), saved for transformers.

Chapter 7's recipe carries over unchanged: records as token ids, `custom_collate_fn` (pad per
batch, shift, -100 on what must not count), chapter 5's loss and the project's training loop.
What a model family changes comes from its folder, never from GPT-2:

* the prompt: the family's own chat template by default (`--prompt-style chat`: the record's
  instruction and input as the user's turn, the output as the assistant's answer), or the book's
  Alpaca text (`--prompt-style alpaca`);
* the end token the model learns to stop with, which also pads a batch: the end of a turn
  (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`) in chat style, the end-of-text token in Alpaca style;
  padded positions never count in the loss and come after every real token, so the causal mask keeps
  them out of sight;
* the loss covers only the response (exercise 7.2's masking, on by default here): the prompt is
  the template's, the model should learn to answer, not to write templates;
* the context length (the shorter of the model's and `allowed_max_length`), the tokenizer.

The result is a Hugging Face folder (`ch05.llama.hf_save.save_hf_folder`): config.json,
model.safetensors, the tokenizer files, which `transformers.AutoModelForCausalLM.from_pretrained`
loads, and with it every tool of that world. With LoRA (appendix E, `lora_rank`) the adapters are
merged back into the weights first, so the folder is a plain model.

    python -m ch07.gpt_instruction_finetuning --model path/to/Qwen3-0.6B --lora-rank 16 --lora-alpha 16
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from appendix_e.lora import add_lora, merge_lora
from ch05.gpt_generate import generate
from ch05.gpt_train import calc_loss_batch, calc_loss_loader, evaluate_model
from ch05.llama.generate_llm import FAMILIES, LoadedLLM, load_llm
from ch05.llama.hf_save import save_hf_folder
from ch05.llama.llama3 import read_hf_config
from ch07.cli import save_loss_plot
from ch07.gpt_instruction_finetuning import (
    InstructionDataset,
    custom_collate_fn,
    format_input,
    format_response,
    load_instruction_data,
    save_responses,
    split_data,
    validate_instruction_data,
)
from llmfs.atomic import atomic_write
from llmfs.errors import InvalidInput
from llmfs.grad_checkpoint import enable_gradient_checkpointing
from llmfs.runtime import eval_mode, get_device, outputs_dir, set_seed
from llmfs.trainer import make_optimizer, train

FAMILY_STYLES = ("chat", "alpaca")


def family_of(spec: str | os.PathLike) -> str | None:
    """The `model_type` of a Hugging Face folder this module fine-tunes (llama, qwen3, qwen3_moe,
    gemma3_text), or None for anything else (a GPT-2 name or file: chapter 7's own run)."""
    path = Path(spec).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()):
        return None
    family = read_hf_config(path).get("model_type")
    return family if family in FAMILIES else None


def chat_message(entry: dict) -> str:
    """The user's turn of a record: the instruction, then the input (if any) after a blank line."""
    extra = entry.get("input") or ""
    return entry["instruction"] + (f"\n\n{extra}" if extra else "")


def end_token_id(tokenizer, style: str) -> int:
    """The token the model learns to end its answer with (and that pads a batch)."""
    token = tokenizer.stop_tokens[0] if style == "chat" else tokenizer.stop_tokens[-1]
    token_id = tokenizer.token_id(token)
    if token_id is None:
        raise InvalidInput(f"{tokenizer.path} has no {token} token, which ends an answer in {style} style")
    return token_id


def encode_example(entry: dict, tokenizer, style: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a record; the end token is added by the collate function."""
    if style not in FAMILY_STYLES:
        raise InvalidInput(f"unknown prompt style {style!r} for a {', '.join(FAMILIES)} model; "
                           f"choose one of {FAMILY_STYLES}")
    if style == "chat":
        prompt_ids = tokenizer.encode(chat_message(entry), chat=True)  # the family's template, one user turn
        response = entry["output"]
    else:
        prompt_ids = tokenizer.encode(format_input(entry))  # the book's Alpaca text (after <bos> if any)
        response = format_response(entry)
    return prompt_ids, tokenizer.tokenizer.encode(response, add_special_tokens=False).ids


class FamilyInstructionDataset(InstructionDataset):
    """`InstructionDataset` with the family's prompt: items are (token ids, prompt length) when the
    prompt is masked, token ids otherwise, exactly what `custom_collate_fn` takes."""

    def __init__(self, data: list[dict], tokenizer, mask_instructions: bool = True, style: str = "chat"):
        self.data = data
        self.mask_instructions = mask_instructions
        self.encoded_texts, self.prompt_lengths = [], []
        for entry in data:
            prompt_ids, response_ids = encode_example(entry, tokenizer, style)
            self.encoded_texts.append(prompt_ids + response_ids)
            self.prompt_lengths.append(len(prompt_ids))


def create_family_loaders(train_data: list[dict], val_data: list[dict], tokenizer, style: str = "chat",
                          batch_size: int = 8, allowed_max_length: int | None = 1024,
                          mask_instructions: bool = True, seed: int = 123) -> tuple[DataLoader, DataLoader]:
    """(train_loader, val_loader) as chapter 7's `create_instruction_loaders` makes them, padded with the
    family's end token."""
    collate = functools.partial(custom_collate_fn, pad_token_id=end_token_id(tokenizer, style),
                                allowed_max_length=allowed_max_length)

    def loader(data, shuffle):
        dataset = FamilyInstructionDataset(data, tokenizer, mask_instructions=mask_instructions, style=style)
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, shuffle=shuffle, drop_last=shuffle,
                          generator=generator)

    train_loader = loader(train_data, True)
    if len(train_loader) == 0:
        raise InvalidInput(f"{len(train_data)} training records make no full batch of {batch_size}; "
                           "use more records or a smaller batch size")
    return train_loader, loader(val_data, False)


def generate_family_response(llm: LoadedLLM, entry: dict, style: str = "chat", max_new_tokens: int = 256) -> str:
    """Greedy answer to one record, in the prompt style it was trained with; stops at the family's end tokens."""
    tokenizer, model = llm.tokenizer, llm.model
    prompt_ids, _ = encode_example({**entry, "output": ""}, tokenizer, style)
    if style == "alpaca":  # the "### Response:" header belongs to the prompt when answering
        prompt_ids += tokenizer.tokenizer.encode(format_response({**entry, "output": ""}),
                                                 add_special_tokens=False).ids
    device = next(model.parameters()).device
    context = model.cfg["context_length"]
    out = generate(model, torch.tensor([prompt_ids[-context:]], device=device), max_new_tokens=max_new_tokens,
                   context_size=context, eos_id=end_token_id(tokenizer, style), use_cache=True)
    new = out[0, len(prompt_ids[-context:]):].tolist()
    stops = [i for i, t in enumerate(new) if t in tokenizer.stop_ids]
    return tokenizer.decode(new[:stops[0]] if stops else new).strip()


def finetune_family(settings: dict, model_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None, *,
                    mask_instructions: bool = True, lora_rank: int | None = None, lora_alpha: float | None = None,
                    lora_targets: tuple[str, ...] | None = None, gradient_checkpointing: bool = False,
                    device=None, data: list[dict] | None = None, progress: bool = True,
                    resume: str | os.PathLike | None = None, checkpoint_every: int | None = None) -> dict:
    """Fine-tune the model in the Hugging Face folder `model_dir` on chapter 7's instruction data, answer
    the test records and save a Hugging Face folder `<name>-sft` in `output_dir` (see the module docstring).

    `settings` are chapter 7's (`ch07.cli.DEFAULT_SETTINGS`), "style" "chat" or "alpaca". With `lora_rank`,
    only LoRA adapters train (on the `lora_targets` layers, all linear layers when None) and are merged
    before saving. `gradient_checkpointing` recomputes each block in the backward pass (less memory).
    """
    device = get_device(device)
    model_dir = Path(model_dir)
    output_dir = Path(output_dir) if output_dir is not None else outputs_dir("ch07")
    style = settings.get("style") or "chat"
    set_seed(settings["seed"])
    # float32 for training (the published weights are often bfloat16); no decoding layout: weights change
    llm = load_llm(model_dir, dtype=torch.float32, device=device, decoding_layout=False)
    model, tokenizer = llm.model, llm.tokenizer
    model.train()

    data = load_instruction_data() if data is None else validate_instruction_data(data)
    train_data, test_data, val_data = split_data(data)
    if settings.get("num_train"):
        train_data = train_data[:settings["num_train"]]
    if settings.get("num_test"):
        test_data = test_data[:settings["num_test"]]

    if lora_rank:  # appendix E: freeze the model, train low-rank adapters only
        trainable = add_lora(model, lora_rank, lora_alpha if lora_alpha is not None else lora_rank, lora_targets)
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    context_length = model.cfg["context_length"]
    allowed = min(settings.get("allowed_max_length") or context_length, context_length)
    train_loader, val_loader = create_family_loaders(
        train_data, val_data, tokenizer, style, settings["batch_size"], allowed, mask_instructions, settings["seed"])
    print(f"device: {device}; model: {llm.description}; {trainable:,} trainable parameters"
          + (f" (LoRA rank {lora_rank})" if lora_rank else ""))
    print(f"records: {len(train_data)} train, {len(val_data)} validation, {len(test_data)} test; "
          f"{len(train_loader)} batches per epoch; prompt style {style}")

    with torch.no_grad(), eval_mode(model):
        start_train = calc_loss_loader(train_loader, model, device, num_batches=settings["eval_iter"])
        start_val = calc_loss_loader(val_loader, model, device, num_batches=settings["eval_iter"])
    print(f"before fine-tuning: train loss {start_train:.3f}, val loss {start_val:.3f}")

    optimizer = make_optimizer(model, settings["learning_rate"], settings["weight_decay"])
    eval_iter = settings["eval_iter"]
    start = time.perf_counter()
    result = train(model, train_loader, val_loader, optimizer, device, settings["num_epochs"],
                   settings["eval_freq"], eval_iter,
                   loss_fn=lambda m, inputs, targets: calc_loss_batch(inputs, targets, m, device),
                   evaluate_fn=lambda m: evaluate_model(m, train_loader, val_loader, device, eval_iter),
                   checkpoint_path=output_dir / "checkpoint.pth", checkpoint_every=checkpoint_every,
                   resume_from=resume, final_checkpoint=False, progress=progress, desc="fine-tuning",
                   run_settings={**settings, "model": str(model_dir), "mask_instructions": mask_instructions,
                                 "allowed_max_length": allowed, "lora_rank": lora_rank, "lora_alpha": lora_alpha,
                                 "lora_targets": list(lora_targets) if lora_targets else None})
    train_seconds = time.perf_counter() - start
    train_losses, val_losses, tokens_seen = result["train_losses"], result["val_losses"], result["tokens_seen"]
    print(f"training took {train_seconds / 60:.2f} min")

    model.eval()
    if lora_rank:
        merge_lora(model)  # plain nn.Linear layers again: the folder is an ordinary model
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_path = save_loss_plot(output_dir, settings["num_epochs"], train_losses, val_losses, tokens_seen)

    with torch.no_grad():
        responses = [{**entry, "model_response": generate_family_response(llm, entry, style,
                                                                          settings["max_new_tokens"])}
                     for entry in test_data]
    responses_path = save_responses(responses, output_dir / "instruction-data-with-response.json")
    model_path = save_hf_folder(model, output_dir / f"{model_dir.name}-sft", model_dir)
    with atomic_write(model_path / "finetuning.json") as f:  # how it was made, for the reader
        json.dump({"source": str(model_dir), "style": style, "mask_instructions": mask_instructions,
                   "lora_rank": lora_rank, "lora_alpha": lora_alpha,
                   "lora_targets": list(lora_targets) if lora_targets else None, "settings": settings}, f, indent=2)
    print(f"responses: {responses_path}\nmodel: {model_path} (a Hugging Face folder)")
    return {"model": model, "tokenizer": tokenizer, "train_losses": [start_train, *train_losses],
            "val_losses": [start_val, *val_losses], "tokens_seen": [0, *tokens_seen], "responses": responses,
            "responses_path": responses_path, "model_path": model_path, "plot_path": plot_path,
            "seconds": train_seconds}


def count_lora_modules(model: nn.Module) -> int:
    """How many LoRA-wrapped layers `model` holds (0 after `merge_lora`)."""
    from appendix_e.lora import LinearWithLoRA

    return sum(isinstance(m, LinearWithLoRA) for m in model.modules())
