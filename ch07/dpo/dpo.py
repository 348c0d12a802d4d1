"""Chapter 7 bonus: preference tuning with Direct Preference Optimization (DPO).

After instruction fine-tuning (sections 7.2-7.7) a model answers, but not always in
the way we prefer. The book's bonus material aligns it with a preference data set:
for every instruction a *chosen* (polite) and a *rejected* (impolite) answer. DPO
raises the fine-tuned ("policy") model's log-probability of the chosen answer and
lowers that of the rejected one, each measured relative to a frozen copy of the
starting model (the "reference"), so no separate reward model is needed.

What this module holds, in the bonus notebook's order:

* the preference data: `load_preference_data` (`instruction-data-with-preference.json`
  through `llmfs.download`, or a JSON / JSONL file written by `ch07.dpo.preference_data`);
* batching: `PreferenceDataset` (prompt, chosen and rejected token ids) and
  `preference_collate_fn` (pads chosen and rejected to one length and builds masks
  that keep only the answer tokens), `create_preference_loaders`;
* the loss: `compute_dpo_loss`, `compute_logprobs`, `compute_dpo_loss_batch`,
  `compute_dpo_loss_loader`, `evaluate_dpo_loss_loader`;
* `train_model_dpo_simple`: the training loop with a frozen reference model;
* the run as a command (`main`, `cli`): the same steps through the project's training layer
  (`train_dpo` on `llmfs.trainer.train`: a Ctrl-C or SIGTERM writes a checkpoint, `--resume`
  continues it exactly).

From chapter 7 it imports the prompt format (`format_input`, `format_response`),
the 85/10/5 split (`split_data`), record validation, model loading and
`generate_response`; from chapter 5 the model loading for other checkpoint
formats and the sample printer.

    python -m ch07.dpo --model outputs/ch07/gpt2-medium-sft.pth   # the book's run: 1 epoch, beta 0.1, lr 5e-6
    python -m ch07.dpo --model outputs/ch07/quick-sft.pth --quick # a small run, about a minute on a CPU
    python -m ch07.dpo --model outputs/ch07/gpt2-medium-sft.pth --resume outputs/ch07-dpo/checkpoint.pth
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ch02.tokenizer import get_gpt2_tokenizer
from ch05.gpt_train import generate_and_print_sample
from ch07.gpt_instruction_finetuning import (
    END_OF_TEXT_ID,
    format_input,
    format_response,
    generate_response,
    load_finetuned_model,
    read_json_file,
    save_finetuned_model,
    split_data,
    validate_instruction_data,
)
from llmfs.atomic import atomic_path, atomic_write
from llmfs.cli import (
    Parser,
    add_common_args,
    add_quick_argument,
    check_input_file,
    check_output_dir,
    common_overrides,
    non_negative_int,
    positive_float,
    positive_int,
    run,
)
from llmfs.download import get_data_file
from llmfs.errors import InvalidInput
from llmfs.finetuning import weights_fingerprint
from llmfs.runtime import get_device, outputs_dir, set_seed
from llmfs.trainer import make_optimizer, train

PREFERENCE_DATA_FILE = "instruction-data-with-preference.json"
PREFERENCE_KEYS = ("instruction", "chosen", "rejected")

# --- The preference data -------------------------------------------------------------------------


def validate_preference_data(data, source: str = "preference data") -> list[dict]:
    """Records with string `instruction`, `chosen` and `rejected` (and optional `input`, `output`).

    An empty answer has no tokens to score, so it is refused here rather than turning
    into a NaN loss in the middle of training.
    """
    validate_instruction_data(data, source, required=PREFERENCE_KEYS, optional=("input", "output"))
    for i, entry in enumerate(data):
        for key in ("chosen", "rejected"):
            if not entry[key].strip():
                raise InvalidInput(f"{source}: record {i} has an empty {key!r} answer")
    return data


def load_preference_data(path: str | os.PathLike | None = None) -> list[dict]:
    """The preference records of a JSON list or a JSONL file (default: the book's 1,100 records)."""
    if path is None:
        path = get_data_file(PREFERENCE_DATA_FILE)
    path = Path(path)
    if path.suffix == ".jsonl":  # written record by record by ch07.dpo.preference_data
        from ch07.dpo.preference_data import read_jsonl

        data = read_jsonl(path)
    else:
        data = read_json_file(path)
    return validate_preference_data(data, source=str(path))


# --- Batching: prompt, chosen and rejected answers -------------------------------------------------

class PreferenceDataset(Dataset):
    """Every record as token ids: the prompt, and prompt + chosen answer, prompt + rejected answer.

    The prompt, as DPO sees it, is everything the two answers share: `format_input(entry)`
    followed by the response header ("\\n\\n### Response:\\n"). The pieces are encoded
    separately and concatenated (as `InstructionDataset` does), so the number of prompt
    tokens is exact and the collate function can mask precisely the prompt.
    """

    def __init__(self, data: list[dict], tokenizer, style: str = "alpaca"):
        self.data = data
        self.encoded_texts = []
        for entry in data:
            prompt_tokens = (tokenizer.encode(format_input(entry, style))
                             + tokenizer.encode(format_response({"output": ""}, style)))
            self.encoded_texts.append({
                "prompt": prompt_tokens,
                "chosen": prompt_tokens + tokenizer.encode(entry["chosen"]),
                "rejected": prompt_tokens + tokenizer.encode(entry["rejected"]),
            })

    def __getitem__(self, index: int) -> dict:
        return self.encoded_texts[index]

    def __len__(self) -> int:
        return len(self.data)


def preference_collate_fn(
    batch: Sequence[dict],
    pad_token_id: int = END_OF_TEXT_ID,
    allowed_max_length: int | None = None,
    mask_prompt_tokens: bool = True,
    device: str | torch.device = "cpu",
) -> dict:
    """Pad the chosen and rejected sequences of a batch to one common length; build the answer masks.

    Returns a dict with "prompt" (a list of tensors) and four (batch, length) tensors:
    "chosen", "rejected" (token ids) and "chosen_mask", "rejected_mask" (True on the
    answer tokens, False on padding and, with `mask_prompt_tokens`, on the prompt).
    Chosen and rejected share one length so that both fit a single stacked tensor.
    The book's version masks two tokens past the prompt to skip "\\n\\n"; here the
    prompt already ends with the response header, so its own length is exact.
    """
    batch_data = {"prompt": [], "chosen": [], "rejected": [], "chosen_mask": [], "rejected_mask": []}
    max_length_common = max(len(item[key]) + 1 for item in batch for key in ("chosen", "rejected"))

    for item in batch:
        prompt = torch.tensor(item["prompt"])
        batch_data["prompt"].append(prompt)
        for key in ("chosen", "rejected"):
            sequence = item[key]
            padded = sequence + [pad_token_id] * (max_length_common - len(sequence))
            mask = torch.ones(len(padded), dtype=torch.bool)
            mask[len(sequence):] = False  # padding
            if mask_prompt_tokens:
                mask[:prompt.shape[0]] = False  # the prompt and the response header
            batch_data[key].append(torch.tensor(padded))
            batch_data[f"{key}_mask"].append(mask)

    for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
        tensor_stack = torch.stack(batch_data[key])  # (batch, max_length_common)
        if allowed_max_length is not None:
            tensor_stack = tensor_stack[:, :allowed_max_length]
        batch_data[key] = tensor_stack.to(device)
    return batch_data


def create_preference_loaders(train_data: list[dict], val_data: list[dict], test_data: list[dict] | None,
                              tokenizer, batch_size: int = 8, allowed_max_length: int | None = 1024,
                              device: str | torch.device = "cpu", style: str = "alpaca",
                              seed: int = 123) -> tuple:
    """(train_loader, val_loader, test_loader) of preference batches; test_loader is None without test data.

    As in chapter 7, the training loader shuffles (own seeded generator) and drops an
    incomplete last batch. A record whose prompt alone fills `allowed_max_length` would
    keep no answer token to score, so it is refused up front.
    """
    collate = functools.partial(preference_collate_fn, device=device, allowed_max_length=allowed_max_length)

    def loader(data, train):
        dataset = PreferenceDataset(data, tokenizer, style=style)
        if allowed_max_length is not None:
            for i, item in enumerate(dataset.encoded_texts):
                if len(item["prompt"]) >= allowed_max_length:
                    raise InvalidInput(f"record {i}: its prompt has {len(item['prompt'])} tokens, so nothing of "
                                     f"its answers fits in allowed_max_length={allowed_max_length}")
        generator = torch.Generator().manual_seed(seed) if train else None
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, shuffle=train, drop_last=train,
                          generator=generator)

    train_loader = loader(train_data, True)
    if len(train_loader) == 0:
        raise InvalidInput(f"{len(train_data)} training records make no full batch of {batch_size}; "
                         "use more records or a smaller batch size")
    return train_loader, loader(val_data, False), (loader(test_data, False) if test_data is not None else None)


# --- The DPO loss ----------------------------------------------------------------------------------

def compute_dpo_loss(
    model_chosen_logprobs: torch.Tensor,
    model_rejected_logprobs: torch.Tensor,
    reference_chosen_logprobs: torch.Tensor,
    reference_rejected_logprobs: torch.Tensor,
    beta: float = 0.1,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss and the implicit rewards of the chosen and rejected answers.

    Each argument holds one log-probability per pair, shape (batch,). The loss is
    -log sigmoid(beta * ((policy chosen - policy rejected) - (reference chosen - reference
    rejected))): it falls as the policy prefers the chosen answer *more than the reference
    does*; beta sets how far from the reference that pull may go (0.1 to 0.5 is usual).
    Returns (loss, chosen_rewards, rejected_rewards), averaged over the batch, or one
    value per pair with reduction="none".
    """
    model_logratios = model_chosen_logprobs - model_rejected_logprobs
    reference_logratios = reference_chosen_logprobs - reference_rejected_logprobs
    logits = model_logratios - reference_logratios

    # DPO (Eq. 7 of the paper): logsigmoid is the numerically stable log(sigmoid(x))
    losses = -F.logsigmoid(beta * logits)

    # New: the rewards are scaled by beta, as the DPO paper's implicit reward and trl's DPOTrainer
    # define them (the book's notebook leaves beta out); they are for tracking only, hence detach().
    chosen_rewards = beta * (model_chosen_logprobs - reference_chosen_logprobs).detach()
    rejected_rewards = beta * (model_rejected_logprobs - reference_rejected_logprobs).detach()

    if reduction == "none":  # New: per-pair values, to count the pairs where the chosen answer wins
        return losses, chosen_rewards, rejected_rewards
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def compute_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                     selection_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The average log-probability the model gives each sequence's tokens (answer tokens only, with a mask).

    logits: (batch, num_tokens, vocab_size); labels and selection_mask: (batch, num_tokens).
    The logits at position i predict token i + 1, so labels and mask shift by one.
    Returns one value per sequence, shape (batch,).
    """
    labels = labels[:, 1:].clone()  # (batch, num_tokens - 1): the tokens to predict
    logits = logits[:, :-1, :]      # (batch, num_tokens - 1, vocab_size): their predictions

    log_probs = F.log_softmax(logits, dim=-1)
    # the log-probability of each actual next token: (batch, num_tokens - 1)
    selected_log_probs = torch.gather(input=log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)

    if selection_mask is not None:
        mask = selection_mask[:, 1:].clone()
        selected_log_probs = selected_log_probs * mask  # zero out prompt and padding tokens
        return selected_log_probs.sum(-1) / mask.sum(-1)  # average over the answer tokens
    return selected_log_probs.mean(-1)


def compute_dpo_loss_batch(batch: dict, policy_model: nn.Module, reference_model: nn.Module, beta: float,
                           reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`compute_dpo_loss` on one batch from `preference_collate_fn`; the reference gets no gradient."""
    policy_chosen_log_probas = compute_logprobs(
        logits=policy_model(batch["chosen"]), labels=batch["chosen"], selection_mask=batch["chosen_mask"])
    policy_rejected_log_probas = compute_logprobs(
        logits=policy_model(batch["rejected"]), labels=batch["rejected"], selection_mask=batch["rejected_mask"])

    with torch.no_grad():
        ref_chosen_log_probas = compute_logprobs(
            logits=reference_model(batch["chosen"]), labels=batch["chosen"], selection_mask=batch["chosen_mask"])
        ref_rejected_log_probas = compute_logprobs(
            logits=reference_model(batch["rejected"]), labels=batch["rejected"],
            selection_mask=batch["rejected_mask"])

    return compute_dpo_loss(policy_chosen_log_probas, policy_rejected_log_probas,
                            ref_chosen_log_probas, ref_rejected_log_probas, beta=beta, reduction=reduction)


def compute_dpo_loss_loader(data_loader, policy_model: nn.Module, reference_model: nn.Module, beta: float,
                            num_batches: int | None = None) -> dict:
    """Loss, rewards, reward margin and reward accuracy averaged over the pairs of the first `num_batches`.

    The reward accuracy is the share of pairs whose chosen answer gets the higher reward.
    Before training the policy *is* the reference, so every reward is 0 and the accuracy 0.
    """
    if len(data_loader) == 0:
        raise ValueError("the data loader has no batches")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    sums = {"loss": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0, "reward_accuracy": 0.0}
    pairs = 0
    with torch.no_grad():
        for i, batch in enumerate(data_loader):
            if i >= num_batches:
                break
            losses, chosen, rejected = compute_dpo_loss_batch(batch, policy_model, reference_model, beta,
                                                              reduction="none")
            sums["loss"] += losses.sum().item()
            sums["chosen_reward"] += chosen.sum().item()
            sums["rejected_reward"] += rejected.sum().item()
            sums["reward_accuracy"] += (chosen > rejected).sum().item()
            pairs += losses.numel()
    result = {key: value / pairs for key, value in sums.items()}
    result["reward_margin"] = result["chosen_reward"] - result["rejected_reward"]
    return result


def evaluate_dpo_loss_loader(policy_model: nn.Module, reference_model: nn.Module, train_loader, val_loader,
                             beta: float, eval_iter: int) -> dict:
    """`compute_dpo_loss_loader` on `eval_iter` batches of each loader, in eval mode.

    Keys: train_loss, train_chosen_reward, train_rejected_reward, train_reward_margin,
    train_reward_accuracy, and the same with val_.
    """
    was_training = policy_model.training
    policy_model.eval()
    try:
        res = {}
        for split, loader in (("train", train_loader), ("val", val_loader)):
            stats = compute_dpo_loss_loader(loader, policy_model, reference_model, beta, num_batches=eval_iter)
            res.update({f"{split}_{key}": value for key, value in stats.items()})
    finally:
        policy_model.train(was_training)
    return res


# What the training loop records at each evaluation: value name -> list name in the tracking dict
TRACKED = {"loss": "losses", "chosen_reward": "chosen_rewards", "rejected_reward": "rejected_rewards",
           "reward_margin": "reward_margins", "reward_accuracy": "reward_accuracies"}


def train_model_dpo_simple(
    policy_model: nn.Module,
    reference_model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    num_epochs: int,
    beta: float,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer,
    print_sample: bool = True,
) -> dict:
    """The bonus notebook's training loop: DPO steps on the policy, the reference stays frozen.

    Every `eval_freq` steps it evaluates `eval_iter` batches of both loaders and records,
    in lists, train_/val_ loss, chosen and rejected rewards, reward margins and reward
    accuracies, plus tokens_seen; after each epoch it prints a sample answer to
    `start_context` (unless `print_sample=False`).
    """
    if eval_freq < 1:
        raise ValueError(f"eval_freq must be >= 1, got {eval_freq}")
    tracking = {f"{split}_{name}": [] for split in ("train", "val") for name in TRACKED.values()}
    tracking["tokens_seen"] = []
    tokens_seen, global_step = 0, -1
    device = next(policy_model.parameters()).device

    for epoch in range(num_epochs):
        policy_model.train()
        for batch in train_loader:
            optimizer.zero_grad()
            loss, chosen_rewards, rejected_rewards = compute_dpo_loss_batch(
                batch=batch, policy_model=policy_model, reference_model=reference_model, beta=beta)
            loss.backward()
            optimizer.step()
            tokens_seen += batch["chosen"].numel()
            global_step += 1

            if global_step % eval_freq == 0:
                res = evaluate_dpo_loss_loader(policy_model, reference_model, train_loader, val_loader,
                                               beta, eval_iter)
                for split in ("train", "val"):
                    for key, name in TRACKED.items():
                        tracking[f"{split}_{name}"].append(res[f"{split}_{key}"])
                tracking["tokens_seen"].append(tokens_seen)
                print(f"Ep {epoch + 1} (Step {global_step:06d}): "
                      f"Train loss {res['train_loss']:.3f}, Val loss {res['val_loss']:.3f}, "
                      f"Train reward margins {res['train_reward_margin']:.3f}, "
                      f"Val reward margins {res['val_reward_margin']:.3f}")

        if print_sample:
            generate_and_print_sample(policy_model, tokenizer, device, start_context)
    return tracking


# --- Models, plots and the bonus notebook's run as a script ------------------------------------------

def load_sft_model(path: str | os.PathLike, device=None) -> nn.Module:
    """An instruction-tuned model in eval mode: a file from `save_finetuned_model` (weights + .json config),
    or anything `ch05.gpt_generate.load_model_for_generation` reads (model.pth, .safetensors, ...)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; fine-tune a model first, e.g. "
                                "`python -m ch07.gpt_instruction_finetuning --quick` (writes outputs/ch07/quick-sft.pth)")
    if path.is_file() and path.with_suffix(".json").is_file():
        model, _ = load_finetuned_model(path, device=device)
        return model
    from ch05.gpt_generate import load_model_for_generation

    model, _ = load_model_for_generation(path, device=device or "cpu")
    return model


def make_reference_model(policy_model: nn.Module) -> nn.Module:
    """A frozen copy of the starting model: eval mode, no gradients."""
    reference_model = copy.deepcopy(policy_model)
    reference_model.eval()
    reference_model.requires_grad_(False)
    return reference_model


def plot_dpo_metrics(tracking: dict, num_epochs: int, path: str | os.PathLike | None = None):
    """Losses (left) and reward margins (right), train and validation, against epochs."""
    import matplotlib.pyplot as plt

    epochs_seen = torch.linspace(0, num_epochs, len(tracking["train_losses"])).tolist()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for ax, key, label in ((axes[0], "losses", "Loss"), (axes[1], "reward_margins", "Reward margin")):
        ax.plot(epochs_seen, tracking[f"train_{key}"], label=f"Training {label.lower()}")
        ax.plot(epochs_seen, tracking[f"val_{key}"], linestyle="-.", label=f"Validation {label.lower()}")
        ax.set_xlabel("Epochs")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    return fig


# The bonus notebook's settings for GPT-2 medium (355M) after chapter 7's fine-tuning.
DEFAULT_SETTINGS = {
    "learning_rate": 5e-6, "weight_decay": 0.01, "beta": 0.1, "batch_size": 8, "num_epochs": 1,
    "eval_freq": 5, "eval_iter": 5, "seed": 123, "allowed_max_length": 1024, "max_new_tokens": 256,
    "num_train": None, "num_val": None, "num_answers": 3, "print_sample": True,
}
# A small model from scratch barely moves at 5e-6; few pairs keep it well under a minute on a CPU
# (each step runs four forward passes over a 50,257-token output layer: two models, two answers).
QUICK_SETTINGS = {
    **DEFAULT_SETTINGS, "learning_rate": 3e-3, "num_train": 64, "num_val": 16, "eval_freq": 2, "eval_iter": 1,
    "max_new_tokens": 24, "num_answers": 2, "print_sample": False,
}


# Settings that change what is printed and answered, not what is trained (a resumed run may change them).
OUTPUT_ONLY_SETTINGS = ("num_answers", "print_sample", "max_new_tokens")


def train_dpo(policy_model: nn.Module, reference_model: nn.Module, train_loader, val_loader,
              optimizer: torch.optim.Optimizer, device, settings: dict, *, start_context: str, tokenizer,
              checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int | None = None,
              resume_from: str | os.PathLike | None = None, progress: bool = True,
              run_settings: dict | None = None) -> dict:
    """`train_model_dpo_simple`'s steps inside the project's training layer (`llmfs.trainer.train`).

    The same batches, losses, evaluations and prints in the same order (the tests check that the
    weights and the tracked values are identical), plus what a long run needs: a Ctrl-C or SIGTERM
    finishes the step and writes `checkpoint_path` (also every `checkpoint_every` steps), and
    `resume_from` continues such a checkpoint exactly. The reference model is not in the checkpoint:
    it stays frozen, so the caller rebuilds it from the same starting model. Returns the tracking
    dict of `train_model_dpo_simple`.
    """
    beta, eval_iter = settings["beta"], settings["eval_iter"]

    def evaluate(model: nn.Module) -> dict:
        res = evaluate_dpo_loss_loader(model, reference_model, train_loader, val_loader, beta, eval_iter)
        return {f"{split}_{name}": res[f"{split}_{key}"] for split in ("train", "val") for key, name in TRACKED.items()}

    def sample(model: nn.Module, epoch: int) -> None:
        if settings.get("print_sample", True):
            generate_and_print_sample(model, tokenizer, device, start_context)

    result = train(
        policy_model, train_loader, val_loader, optimizer, device, settings["num_epochs"], settings["eval_freq"],
        eval_iter,
        loss_fn=lambda model, batch: compute_dpo_loss_batch(batch, model, reference_model, beta)[0],
        count_fn=lambda batch: (batch["chosen"].numel(), batch["chosen"].shape[0]),
        evaluate_fn=evaluate,
        eval_line=lambda v: (f"Train loss {v['train_losses']:.3f}, Val loss {v['val_losses']:.3f}, "
                             f"Train reward margins {v['train_reward_margins']:.3f}, "
                             f"Val reward margins {v['val_reward_margins']:.3f}"),
        epoch_end_fn=sample, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
        resume_from=resume_from, final_checkpoint=False, progress=progress, desc="DPO", run_settings=run_settings)
    names = [f"{split}_{name}" for split in ("train", "val") for name in TRACKED.values()] + ["tokens_seen"]
    return {name: result.get(name, []) for name in names}


def check_enough_records(total: int, train: int, val: int, batch_size: int) -> None:
    """One training batch and one validation record at least, said before any model loads (an empty
    loader would otherwise fail deep inside PyTorch)."""
    if train >= batch_size and val >= 1:
        return
    need = next(n for n in range(1, 10 * batch_size + 100)
                if int(n * 0.85) >= batch_size and n - int(n * 0.85) - int(n * 0.10) >= 1)
    raise InvalidInput(f"{total} preference records are too few: the 85/10/5 split leaves {train} for training "
                       f"and {val} for validation, and a run needs one batch of {batch_size} (--batch-size) and "
                       f"one validation record; give at least {need} records or a smaller --batch-size")


def main(settings: dict, model: str | os.PathLike | nn.Module, output_dir: str | os.PathLike | None = None,
         *, data: list[dict] | None = None, device=None, source: str | None = None,
         resume: str | os.PathLike | None = None, checkpoint_every: int | None = None,
         progress: bool = True) -> dict:
    """Tune `model` (a model, or the file of one) with DPO, plot, answer a few validation prompts, save everything.

    Writes to `output_dir` (default `outputs/ch07-dpo`, see `llmfs.runtime.outputs_dir`):
    `<name>-dpo.pth` (+ .json config), `dpo-metrics.json` (tracked values, before/after validation
    figures), `dpo-plot.png` and `dpo-answers.json` (reference and tuned answers to the first
    `num_answers` validation prompts). `source` names a given model's file (for the output name).
    A Ctrl-C or SIGTERM during training writes `output_dir/checkpoint.pth`; `resume` continues it
    exactly, with the reference rebuilt from the same `model` (a different one is refused).
    """
    device = get_device(device)
    output_dir = Path(output_dir) if output_dir is not None else outputs_dir("ch07-dpo")
    set_seed(settings["seed"])
    tokenizer = get_gpt2_tokenizer()

    data = load_preference_data() if data is None else validate_preference_data(data)
    train_data, _test_data, val_data = split_data(data)
    train_data = train_data[:settings["num_train"]] if settings.get("num_train") else train_data
    val_data = val_data[:settings["num_val"]] if settings.get("num_val") else val_data
    check_enough_records(len(data), len(train_data), len(val_data), settings["batch_size"])

    if isinstance(model, nn.Module):
        policy_model = model.to(device)
    else:
        policy_model, source = load_sft_model(model, device).to(device), str(model)
    source = source or "the given model"
    reference_model = make_reference_model(policy_model)
    context_length = policy_model.cfg["context_length"]
    allowed = min(settings.get("allowed_max_length") or context_length, context_length)
    train_loader, val_loader, _ = create_preference_loaders(
        train_data, val_data, None, tokenizer, batch_size=settings["batch_size"], allowed_max_length=allowed,
        device=device, seed=settings["seed"])
    print(f"device: {device}; model: {source}, {sum(p.numel() for p in policy_model.parameters()):,} "
          f"parameters; pairs: {len(train_data)} train, {len(val_data)} validation")

    # New: the project's training layer instead of the notebook's loop (same steps; checkpoints, exact resume).
    # A checkpoint remembers the reference (the starting weights) and the data, so a resume with others is refused.
    run_settings = {**{k: v for k, v in settings.items() if k not in OUTPUT_ONLY_SETTINGS},
                    "allowed_max_length": allowed, "reference_sha256": weights_fingerprint(reference_model),
                    "data_sha256": _records_fingerprint(train_data + val_data)}
    output_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(policy_model, settings["learning_rate"], settings["weight_decay"])
    start = time.perf_counter()
    tracking = train_dpo(policy_model, reference_model, train_loader, val_loader, optimizer, device, settings,
                         start_context=format_input(val_data[0]), tokenizer=tokenizer,
                         checkpoint_path=output_dir / "checkpoint.pth", checkpoint_every=checkpoint_every,
                         resume_from=resume, progress=progress, run_settings=run_settings)
    seconds = time.perf_counter() - start
    # Before training the policy was the reference (the same weights): its figures and answers are the reference's,
    # measured after training so that a resume with the wrong checkpoint is refused before any other work.
    before = compute_dpo_loss_loader(val_loader, reference_model, reference_model, settings["beta"])
    answers = [{**entry, "reference_response": generate_response(reference_model, entry, tokenizer, device,
                                                                  settings["max_new_tokens"])}
               for entry in val_data[:settings["num_answers"]]]
    policy_model.eval()
    after = compute_dpo_loss_loader(val_loader, policy_model, reference_model, settings["beta"])
    print(f"training took {seconds / 60:.2f} min; validation reward margin {before['reward_margin']:.3f} -> "
          f"{after['reward_margin']:.3f}, chosen preferred {before['reward_accuracy']:.0%} -> "
          f"{after['reward_accuracy']:.0%}")
    for answer in answers:
        answer["policy_response"] = generate_response(policy_model, answer, tokenizer, device,
                                                      settings["max_new_tokens"])

    plot_path = None
    if tracking["train_losses"]:
        import matplotlib.pyplot as plt

        plot_path = output_dir / "dpo-plot.png"
        plt.close(plot_dpo_metrics(tracking, settings["num_epochs"], plot_path))
    with atomic_write(output_dir / "dpo-metrics.json") as f:
        json.dump({"settings": settings, "val_before": before, "val_after": after, "seconds": seconds,
                   "tracking": tracking}, f, indent=2)
    with atomic_write(output_dir / "dpo-answers.json") as f:
        json.dump(answers, f, indent=4, ensure_ascii=False)
    name = Path(source).stem if Path(source).exists() else "model"
    model_out = save_finetuned_model(policy_model, output_dir / f"{name}-dpo.pth", source=f"DPO from {source}",
                                     settings=settings)
    print(f"model: {model_out}\nanswers: {output_dir / 'dpo-answers.json'}")
    return {"model": policy_model, "reference_model": reference_model, "tracking": tracking,
            "val_before": before, "val_after": after, "answers": answers, "model_path": model_out,
            "plot_path": plot_path, "seconds": seconds}


def _records_fingerprint(records: list[dict]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


# --- python -m ch07.dpo ------------------------------------------------------------------------------

SFT_HINT = "fine-tune one first, e.g. `python -m ch07.gpt_instruction_finetuning --quick` (writes outputs/ch07/quick-sft.pth)"


def parser() -> Parser:
    p = Parser(prog="python -m ch07.dpo",
               description="Preference-tune an instruction-tuned GPT model with DPO (chapter 7 bonus).")
    p.add_argument("--model", required=True,
                   help="the instruction-tuned model: a file from `python -m ch07.gpt_instruction_finetuning` "
                        "(e.g. outputs/ch07/quick-sft.pth), or model.pth / .safetensors from chapter 5")
    add_quick_argument(p, "64 training pairs, a larger learning rate, short answers (well under a minute on a CPU)")
    p.add_argument("--data", default=None,
                   help="preference records (JSON list or JSONL from ch07.dpo.preference_data; default: the "
                        "book's instruction-data-with-preference.json)")
    add_common_args(p, str(outputs_dir("ch07-dpo")))
    p.add_argument("--beta", type=positive_float, help="DPO's beta (default 0.1)")
    p.add_argument("--max-new-tokens", type=non_negative_int,
                   help="length cap of the reference and tuned answers to validation prompts (default 256; quick: 24)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, help="also checkpoint every N steps")
    p.add_argument("--resume", default=None,
                   help="continue from this checkpoint (same --model, --data and other options)")
    return p


def settings_from_args(args: argparse.Namespace) -> dict:
    extra = {"beta": args.beta, "max_new_tokens": args.max_new_tokens}
    return {**(QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS), **common_overrides(args),
            **{k: v for k, v in extra.items() if v is not None}}


def cli(argv: list[str] | None = None) -> int:
    """`python -m ch07.dpo [options]`; returns the exit code."""
    args = parser().parse_args(argv)
    settings = settings_from_args(args)

    def run_dpo():
        # Everything the user named is checked before the model is loaded.
        if not Path(args.model).exists():
            raise FileNotFoundError(f"--model {args.model} does not exist; {SFT_HINT}")
        if Path(args.model).is_file():  # a folder is read by ch05's load_model_for_generation
            check_input_file(args.model, "--model")
        if args.data is not None and Path(args.data).is_dir():
            raise IsADirectoryError(f"--data {args.data} is a folder; give the JSON or JSONL file of preference records")
        if args.data is not None and not Path(args.data).is_file():
            raise FileNotFoundError(f"--data {args.data} does not exist")
        check_input_file(args.resume, "--resume")
        check_output_dir(args.output_dir, args.overwrite, ("*-dpo.pth",), resume=args.resume,
                         checkpoint="checkpoint.pth")
        data = load_preference_data(args.data)
        main(settings, args.model, args.output_dir, data=data, device=args.device, resume=args.resume,
             checkpoint_every=args.checkpoint_every, progress=not args.no_progress)

    return run(run_dpo, argv, onednn=args.onednn)


if __name__ == "__main__":
    sys.exit(cli())
