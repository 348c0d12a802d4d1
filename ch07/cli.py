"""Chapter 7's run as a script: instruction fine-tuning, then answers to the test instructions.

    python -m ch07.gpt_instruction_finetuning                # the book's run: GPT-2 medium (355M), 2 epochs
    python -m ch07.gpt_instruction_finetuning --quick        # offline: a small model from scratch, ~1 minute
    python -m ch07.gpt_instruction_finetuning --quick --init-checkpoint outputs/ch05/model.pth
    python -m ch07.gpt_instruction_finetuning --model path/to/Qwen3-0.6B --lora-rank 16   # Llama 3, Qwen3, Gemma 3

A Hugging Face folder of Llama 3, Qwen3 or Gemma 3 is fine-tuned by `ch07.other_families` (its own chat
template, the loss on the answers only, saved as a Hugging Face folder); LoRA (appendix E) and gradient
checkpointing (`llmfs.grad_checkpoint`) apply to every model.

`finetune` does the work with the chapter's listings (`ch07.gpt_instruction_finetuning`) inside the
project's training layer (`llmfs.trainer`: checkpoints on Ctrl-C, exact resume, progress bar), whose
loop is the book's `train_model_simple`; `main` is the command line.

    python -m ch07.serve --model outputs/ch07/quick-sft.pth   # the Ollama-API server (`serve_main`)

`load_chat_model` hands chapter 7's models and prompt format to the project's chat layer
(`llmfs.chat`), which the server, the chat web page and the DPO data generator use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT2_SIZES, GPT_CONFIG_124M, GPTModel
from ch04.gpt import QUICK_CONFIG as CH05_QUICK_CONFIG
from ch05.cli import print_sample
from ch05.gpt_generate import load_model_for_generation
from ch05.gpt_train import calc_loss_batch, calc_loss_loader, evaluate_model, plot_losses
from ch06.cli import check_model_source, load_init_checkpoint, load_pretrained
from llmfs import serve
from llmfs.chat import ChatModel, PromptFormat, default_model_name, finetuned_file
from llmfs.cli import (
    Parser,
    add_common_args,
    chapter_module,
    check_input_file,
    check_output_dir,
    common_overrides,
    non_negative_int,
    positive_float,
    positive_int,
    run,
)
from llmfs.decoding_layout import layout_for_decoding
from llmfs.errors import InvalidInput
from llmfs.finetuning import add_model_source_args
from llmfs.grad_checkpoint import enable_gradient_checkpointing
from llmfs.int8 import int8_description, quantize_int8
from llmfs.runtime import eval_mode, get_device, outputs_dir, set_seed
from llmfs.trainer import make_optimizer, train

DEFAULT_MODEL = "gpt2-medium"  # the book's chapter-7 model

# The offline stand-in for GPT-2: small enough to fine-tune in about a minute on two CPU cores,
# with a context long enough for every record of the chapter's data (the longest is 91 tokens).
QUICK_CONFIG = {**CH05_QUICK_CONFIG, "context_length": 256, "drop_rate": 0.0}

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

OFFLINE_ALTERNATIVES = """\
Or fine-tune offline, without OpenAI's weights:
  --quick                  a small model trained from scratch (about a minute on a CPU)
  --from-scratch           the full-size model, randomly initialized (slow on a CPU)
  --init-checkpoint FILE   start from a chapter-5 model, e.g. outputs/ch05/model.pth (`python -m ch05.gpt_train --quick`)"""

# The chapter's listings, looked up so that `python -m ch07.gpt_instruction_finetuning` runs its file once.
book = chapter_module("ch07.gpt_instruction_finetuning")


def scratch_config(model_name: str = "gpt2-medium") -> dict:
    """GPT-2's shape for `model_name` (context 1024, qkv bias, no dropout), for training from scratch."""
    if model_name not in GPT2_SIZES:
        raise InvalidInput(f"unknown GPT-2 size {model_name!r}; choose one of {sorted(GPT2_SIZES)}")
    return {**GPT_CONFIG_124M, **GPT2_SIZES[model_name], "context_length": 1024, "qkv_bias": True,
            "drop_rate": 0.0}


def save_loss_plot(output_dir: Path, num_epochs: int, train_losses: list, val_losses: list,
                   tokens_seen: list) -> Path | None:
    """The chapter's loss plot (`plot_losses`) as output_dir/loss-plot.png; None when no loss was recorded."""
    if not train_losses:
        return None
    import matplotlib.pyplot as plt

    epochs_seen = torch.linspace(0, num_epochs, len(train_losses)).tolist()
    plot_path = output_dir / "loss-plot.png"
    plt.close(plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, plot_path))
    return plot_path


def finetune(settings: dict, output_dir: str | os.PathLike | None = None, *, model_name: str = "gpt2-medium",
             quick: bool = False, from_scratch: bool = False, init_checkpoint: str | None = None,
             n_heads: int | None = None, cfg: dict | None = None, mask_instructions: bool = False, device=None,
             data: list[dict] | None = None, progress: bool = True, resume: str | os.PathLike | None = None,
             checkpoint_every: int | None = None, lora_rank: int | None = None, lora_alpha: float | None = None,
             lora_targets: tuple[str, ...] | None = None, gradient_checkpointing: bool = False) -> dict:
    """Fine-tune, plot the losses, answer the test records and save everything in `output_dir`.

    The starting model is, in this order: `init_checkpoint` (`n_heads` settles its head count when the
    file holds no config); a fresh model of `cfg`
    (or QUICK_CONFIG when `quick`, or GPT-2 `model_name`'s shape with `from_scratch`);
    otherwise OpenAI's pretrained `model_name` (PretrainedWeightsUnavailable when offline).
    A Ctrl-C writes `output_dir/checkpoint.pth`, which `resume` continues exactly.
    New: `lora_rank` trains appendix E's LoRA adapters only (merged into the weights before saving);
    `gradient_checkpointing` recomputes each block in the backward pass instead of storing its activations.
    """
    device = get_device(device)
    output_dir = Path(output_dir) if output_dir is not None else outputs_dir("ch07")
    style = settings.get("style", "alpaca")
    set_seed(settings["seed"])
    tokenizer = get_gpt2_tokenizer()

    data = book.load_instruction_data() if data is None else book.validate_instruction_data(data)
    train_data, test_data, val_data = book.split_data(data)
    if settings.get("num_train"):
        train_data = train_data[:settings["num_train"]]
    if settings.get("num_test"):
        test_data = test_data[:settings["num_test"]]

    if init_checkpoint:
        model, tag = load_init_checkpoint(init_checkpoint, device, n_heads=n_heads), "init"
        source = f"weights from {init_checkpoint}"
    elif cfg is not None or quick or from_scratch:
        cfg = cfg or (QUICK_CONFIG if quick else scratch_config(model_name))
        model, tag = GPTModel(cfg).to(device), ("quick" if quick else f"{model_name}-scratch")
        source = "random initialization"
    else:
        model, tag = load_pretrained(model_name, device, OFFLINE_ALTERNATIVES), Path(str(model_name)).name
        source = f"OpenAI's pretrained {model_name}"
    model.to(device)
    if lora_rank:  # New: appendix E's adapters on the `lora_targets` layers (all linear layers when None)
        from appendix_e.lora import add_lora

        add_lora(model, lora_rank, lora_alpha if lora_alpha is not None else lora_rank, lora_targets)
    if gradient_checkpointing:  # New: less activation memory, one more forward pass per block
        enable_gradient_checkpointing(model)
    context_length = model.cfg["context_length"]
    allowed = min(settings.get("allowed_max_length") or context_length, context_length)

    train_loader, val_loader, _ = book.create_instruction_loaders(
        train_data, val_data, None, tokenizer, batch_size=settings["batch_size"], allowed_max_length=allowed,
        device="cpu", mask_instructions=mask_instructions, style=style, seed=settings["seed"])
    too_long = sum(len(ids) + 1 > allowed for ids in train_loader.dataset.encoded_texts)
    print(f"device: {device}; model: {source}, {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"records: {len(train_data)} train, {len(val_data)} validation, {len(test_data)} test; "
          f"{len(train_loader)} batches per epoch" + (f"; {too_long} training examples are longer than "
                                                     f"{allowed} tokens and get truncated" if too_long else ""))

    with torch.no_grad(), eval_mode(model):  # the losses before fine-tuning, as the chapter shows them
        start_train = calc_loss_loader(train_loader, model, device, num_batches=settings["eval_iter"])
        start_val = calc_loss_loader(val_loader, model, device, num_batches=settings["eval_iter"])
    print(f"before fine-tuning: train loss {start_train:.3f}, val loss {start_val:.3f}")

    sample_tokens = settings.get("sample_tokens", 35)

    def sample(m, epoch: int) -> None:  # the book's generate_and_print_sample at the end of each epoch
        if sample_tokens:
            print_sample(m, tokenizer, device, book.format_input(val_data[0], style), sample_tokens)

    optimizer = make_optimizer(model, settings["learning_rate"], settings["weight_decay"])
    start = time.perf_counter()
    eval_iter = settings["eval_iter"]
    result = train(model, train_loader, val_loader, optimizer, device, settings["num_epochs"],
                   settings["eval_freq"], eval_iter,
                   loss_fn=lambda m, inputs, targets: calc_loss_batch(inputs, targets, m, device),
                   evaluate_fn=lambda m: evaluate_model(m, train_loader, val_loader, device, eval_iter),
                   epoch_end_fn=sample,
                   checkpoint_path=output_dir / "checkpoint.pth", checkpoint_every=checkpoint_every,
                   resume_from=resume, final_checkpoint=False, progress=progress, desc="fine-tuning",
                   run_settings={**settings, "mask_instructions": mask_instructions, "allowed_max_length": allowed,
                                 **({"lora_rank": lora_rank, "lora_alpha": lora_alpha,
                                     "lora_targets": list(lora_targets or [])} if lora_rank else {})})
    train_losses, val_losses, tokens_seen = result["train_losses"], result["val_losses"], result["tokens_seen"]
    train_seconds = time.perf_counter() - start
    print(f"training took {train_seconds / 60:.2f} min")

    output_dir.mkdir(parents=True, exist_ok=True)
    plot_path = save_loss_plot(output_dir, settings["num_epochs"], train_losses, val_losses, tokens_seen)

    if lora_rank:  # New: fold the adapters back in, so the saved model is a plain GPTModel
        from appendix_e.lora import merge_lora

        merge_lora(model)
    responses = book.generate_responses(model, test_data, tokenizer, device, settings["max_new_tokens"], style,
                                   progress=progress)
    responses_path = book.save_responses(responses, output_dir / "instruction-data-with-response.json")
    model_path = book.save_finetuned_model(
        model, output_dir / f"{tag}-sft.pth", style=style, mask_instructions=mask_instructions, source=source,
        settings={k: v for k, v in settings.items()})
    print(f"responses: {responses_path}\nmodel: {model_path}")
    return {"model": model, "train_losses": [start_train, *train_losses], "val_losses": [start_val, *val_losses],
            "tokens_seen": [0, *tokens_seen], "responses": responses, "responses_path": responses_path,
            "model_path": model_path, "plot_path": plot_path, "seconds": train_seconds}


def parser() -> Parser:
    p = Parser(prog="python -m ch07.gpt_instruction_finetuning",
               description="Instruction fine-tune a GPT model (chapter 7), or a Llama 3 / Qwen3 / Gemma 3 Hugging "
                           "Face folder given as --model, and answer the test instructions.")
    add_model_source_args(p, DEFAULT_MODEL, "offline: a small model from scratch, 320 records, 3 test answers "
                                            "(about a minute)")
    add_common_args(p, str(outputs_dir("ch07")))
    p.add_argument("--mask-instructions", action=argparse.BooleanOptionalAction, default=None,
                   help="compute the loss on the response tokens only (exercise 7.2; default: off for GPT, on for "
                        "Llama / Qwen3 / Gemma folders)")
    p.add_argument("--prompt-style", choices=(*book.PROMPT_STYLES, "chat"), default=None,
                   help="prompt format (default alpaca for GPT; chat, the model's own template, for Llama / Qwen3 / "
                        "Gemma folders)")
    p.add_argument("--num-train", type=positive_int, help="train on the first N training records (default all; "
                                                          "quick: 320)")
    p.add_argument("--lora-rank", type=positive_int, default=None,
                   help="train LoRA adapters of this rank instead of all weights (appendix E); merged before saving")
    p.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated layers that get adapters: q,k,v,o,gate,up,down,head (default all linear "
                        "layers)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each transformer block in the backward pass: less memory, about 1/3 more time")
    p.add_argument("--num-test", type=positive_int, help="answer only the first N test records (default all; quick: 3)")
    p.add_argument("--max-new-tokens", type=non_negative_int, help="answer length cap (default 256; quick: 32)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, help="also checkpoint every N steps")
    p.add_argument("--resume", default=None, help="continue from this checkpoint (same other options)")
    return p


def settings_from_args(args) -> dict:
    extra = {"num_test": args.num_test, "max_new_tokens": args.max_new_tokens, "style": args.prompt_style,
             "num_train": args.num_train}
    return {**(QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS), **common_overrides(args),
            **{k: v for k, v in extra.items() if v is not None}}


def main(argv: list[str] | None = None) -> int:
    """`python -m ch07.gpt_instruction_finetuning [options]`; returns the exit code."""
    args = parser().parse_args(argv)

    def main_run():
        from appendix_e.lora import parse_lora_targets
        from ch07.other_families.family_finetuning import family_of, finetune_family

        if (args.lora_alpha is not None or args.lora_targets is not None) and args.lora_rank is None:
            raise InvalidInput("--lora-alpha and --lora-targets only apply with --lora-rank")
        try:
            targets = parse_lora_targets(args.lora_targets)
        except ValueError as exc:
            raise InvalidInput(f"--lora-targets: {exc}") from None
        family = family_of(args.model)
        if family is not None:  # New: a Llama 3 / Qwen3 / Gemma 3 folder (ch07.other_families)
            used = [o for o, v in (("--from-scratch", args.from_scratch), ("--init-checkpoint", args.init_checkpoint),
                                   ("--n-heads", args.n_heads)) if v]
            if used:
                raise InvalidInput(f"{' and '.join(used)} build a GPT model; --model {args.model} is a {family} "
                                   "folder, fine-tuned from its own weights")
            if args.prompt_style not in (None, "chat", "alpaca"):
                raise InvalidInput(f"--prompt-style {args.prompt_style} is for GPT models; a {family} model takes "
                                   "chat (its own template) or alpaca")
            check_output_dir(args.output_dir, args.overwrite, ("*-sft.pth", "*-sft"), resume=args.resume,
                             checkpoint="checkpoint.pth")
            check_input_file(args.resume, "--resume")
            settings = {**settings_from_args(args), "style": args.prompt_style or "chat"}
            if args.lr is None:  # quick mode's rate is for a model trained from scratch, not a pretrained one
                settings["learning_rate"] = DEFAULT_SETTINGS["learning_rate"]
            finetune_family(settings, args.model, args.output_dir, mask_instructions=args.mask_instructions is not False,
                            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=targets,
                            gradient_checkpointing=args.gradient_checkpointing, device=args.device,
                            progress=not args.no_progress, resume=args.resume, checkpoint_every=args.checkpoint_every)
            return
        if args.prompt_style == "chat":
            raise InvalidInput("--prompt-style chat uses a model's own chat template; GPT-2 has none (use alpaca or "
                               "phi3, or give a Llama 3 / Qwen3 / Gemma 3 folder as --model)")
        check_model_source(args, DEFAULT_MODEL)
        check_output_dir(args.output_dir, args.overwrite, ("*-sft.pth",), resume=args.resume,
                         checkpoint="checkpoint.pth")
        check_input_file(args.init_checkpoint, "--init-checkpoint")
        check_input_file(args.resume, "--resume")
        finetune(settings_from_args(args), args.output_dir, model_name=args.model, quick=args.quick,
                 from_scratch=args.from_scratch, init_checkpoint=args.init_checkpoint, n_heads=args.n_heads,
                 mask_instructions=bool(args.mask_instructions), device=args.device, progress=not args.no_progress,
                 resume=args.resume, checkpoint_every=args.checkpoint_every, lora_rank=args.lora_rank,
                 lora_alpha=args.lora_alpha, lora_targets=targets, gradient_checkpointing=args.gradient_checkpointing)

    return run(main_run, argv, onednn=args.onednn)



# --- The chat layer and the Ollama-API server (python -m ch07.serve) -----------------------------------

# Chapter 7's instruction format, handed to the project's chat layer (llmfs.chat).
PROMPT_FORMAT = PromptFormat(styles=book.PROMPT_STYLES, format_input=book.format_input,
                             format_response=book.format_response)


def load_chat_model(spec: str | os.PathLike, device: torch.device | str | None = None,
                    name: str | None = None, style: str | None = "auto", int8: bool | str = False) -> ChatModel:
    """A `llmfs.chat.ChatModel` for the model `spec` names: a chapter-7 instruction-tuned model (the
    `.pth` plus `.json` that `book.save_finetuned_model` writes) or anything chapter 5's
    `load_model_for_generation` reads (GPT-2 weights, chapter-5 checkpoints).

    New: a Hugging Face folder of another family (Llama 3.x, Qwen3, Qwen3-MoE, Gemma 3 text) loads
    through chapter 5's `load_llm` instead (`load_family_chat_model`).

    `style` "auto" uses the chapter-7 prompt style saved with an instruction-tuned model (and no
    template for other models); "alpaca"/"phi3" or None force one. What cannot be loaded raises a
    `llmfs.errors.UserError` (InvalidInput, CheckpointMismatchError, PretrainedWeightsUnavailable) or
    FileNotFoundError: the commands print it as one line. `int8` stores the linear layers' weights as int8
    (`llmfs.int8`, the server's `--int8`).
    """
    if style not in ("auto", None, *book.PROMPT_STYLES):
        raise InvalidInput(f"unknown prompt style {style!r}; choose auto, none or one of {book.PROMPT_STYLES}")
    if family_folder(spec) is not None:  # New: Llama 3.x, Qwen3 and Gemma 3 folders serve too
        return load_family_chat_model(spec, device=device, name=name, style=style, int8=int8)
    device = get_device(device)
    finetuned = finetuned_file(Path(spec).expanduser())
    if finetuned is not None:
        model, metadata = book.load_finetuned_model(finetuned, device=device)
        saved_style = metadata.get("style", "alpaca")
        described = f"{finetuned} (instruction-tuned, {metadata.get('source', 'chapter 7')})"
        source = str(finetuned)
    else:
        model, described = load_model_for_generation(spec, device=device)
        metadata, saved_style, source = {}, None, str(spec)
    if name is not None and not re.fullmatch(r"[A-Za-z0-9._:/-]+", name):
        raise InvalidInput(f"model name {name!r} may only hold letters, digits and . _ : / -")
    name = (name or default_model_name(spec)).lower()
    if int8:
        quantize_int8(model, int8)  # before the layout, which only touches float32 nn.Linear weights
        described += int8_description(int8)
    layout_for_decoding(model)  # same numbers, faster one-token products on the CPU (llmfs.decoding_layout)
    return ChatModel(model=model.eval(), name=name if ":" in name else f"{name}:latest",
                     style=saved_style if style == "auto" else style, description=described, source=source,
                     device=device, tokenizer=get_gpt2_tokenizer(), eos_id=book.END_OF_TEXT_ID,
                     prompt_format=PROMPT_FORMAT, metadata=metadata)


# New: the other model families (chapter 5's bonus loader) in the same chat layer.

def family_folder(spec: str | os.PathLike) -> str | None:
    """config.json's model_type when `spec` is a folder of a family `load_llm` runs other than GPT-2, else None."""
    from ch05.llama.generate_llm import FAMILIES

    path = Path(spec).expanduser()
    try:
        family = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):  # no folder, no config.json, not a JSON object
        return None
    return family if path.is_dir() and family in FAMILIES else None


def load_family_chat_model(spec: str | os.PathLike, device: torch.device | str | None = None,
                           name: str | None = None, style: str | None = "auto", int8: bool | str = False) -> ChatModel:
    """A `ChatModel` for a Llama 3.x, Qwen3 (dense or MoE) or Gemma 3 text folder, loaded by `load_llm`.

    It speaks its family's chat template (`style` "auto"; None: plain text, as a base model
    continues it), stops at the end of a turn or of the text, and its context is its config's. `int8`:
    int8 linear weights (`llmfs.int8`).
    """
    from ch05.llama.generate_llm import load_llm
    from llmfs.chat_families import TEMPLATE_NAMES, HFTokenizer, chat_template

    if style not in ("auto", None):
        raise InvalidInput(f"prompt style {style!r} is chapter 7's instruction format; a {family_folder(spec)} "
                           "model has its own chat template: use auto (the template) or none (plain text)")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9._:/-]+", name):
        raise InvalidInput(f"model name {name!r} may only hold letters, digits and . _ : / -")
    device = get_device(device)
    llm = load_llm(spec, device=device, int8=int8)  # its dtype is the file's; decoding layout on
    tok = llm.tokenizer
    adapter = HFTokenizer(tok.tokenizer)
    end_of_text = tok.token_id(tok.stop_tokens[-1])
    name = (name or default_model_name(spec)).lower()
    return ChatModel(model=llm.model.eval(), name=name if ":" in name else f"{name}:latest",
                     style=TEMPLATE_NAMES[llm.family] if style == "auto" else None, description=llm.description,
                     source=str(spec), device=device, tokenizer=adapter, eos_id=end_of_text,
                     metadata={"family": llm.family}, family=llm.family, stop_ids=frozenset(tok.stop_ids),
                     chat_template=chat_template(llm.family), bos=tok.plain_prompt(""))


def serve_main(argv: list[str] | None = None) -> int:
    """`python -m ch07.serve [options]`: the Ollama-API server (`llmfs.serve`) with this chapter's models."""
    return serve.main(load_chat_model, argv, prog="python -m ch07.serve")


if __name__ == "__main__":
    sys.exit(main())
