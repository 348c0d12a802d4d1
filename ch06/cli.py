"""Chapter 6's run as a script: fine-tune a GPT model as an SMS spam classifier.

    python -m ch06.gpt_class_finetune                 # the book's run: pretrained GPT-2 124M, 5 epochs
    python -m ch06.gpt_class_finetune --quick         # offline: small random-init model, about a minute on a CPU
    python -m ch06.gpt_class_finetune --from-scratch  # GPT-2 124M shape, random init, every layer trained
    python -m ch06.gpt_class_finetune --quick --init-checkpoint outputs/ch05/model.pth
    python -m ch06.gpt_class_finetune --trainable-layers lora --lora-rank 16 --lora-alpha 16  # a bonus experiment
    python -m ch06.gpt_class_finetune --model path/to/Llama-3.2-1B   # New: Llama 3.x / Qwen3 / Gemma 3 (ch06.experiments.families)

`finetune` does the work with the chapter's listings (`ch06.gpt_class_finetune`) inside the
project's training layer (`llmfs.trainer`: checkpoints on Ctrl-C, exact resume, progress bar);
`main` is the command line. `load_pretrained` and `load_init_checkpoint` (where the model to
fine-tune comes from) serve chapter 7 too. The book's additional-experiment switches
(`--trainable-layers`, `--trainable-token-pos`, `--context-length`, `--disable-causal-mask`, ...) build a
`ch06.experiments.additional_experiments.Experiment`, which `finetune` uses in place of the listings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT2_SIZES, GPT_CONFIG_124M, GPTModel
from ch05.gpt_download import PretrainedWeightsUnavailable, load_pretrained_gpt2
from ch05.gpt_generate import load_model_for_generation
from llmfs.cli import (
    Parser,
    add_common_args,
    chapter_module,
    check_input_file,
    check_output_dir,
    common_overrides,
    positive_float,
    positive_int,
    run,
    whole_number,
)
from llmfs.errors import InvalidInput
from llmfs.finetuning import add_model_source_args, cpu_threads
from llmfs.runtime import get_device, is_quick, outputs_dir, set_seed
from llmfs.trainer import make_optimizer, train

# The chapter's listings, looked up so that `python -m ch06.gpt_class_finetune` runs its file once.
book = chapter_module("ch06.gpt_class_finetune")


# --- Where the model to fine-tune comes from (chapters 6 and 7) ---------------------------------------

def family_of(model_name: str | os.PathLike) -> str | None:
    """New: the family of a Llama 3.x / Qwen3 / Gemma 3 text folder (config.json's model_type), None for
    a GPT-2 name, folder or file (`ch05.llama.family_training.family_of`)."""
    from ch05.llama.family_training import family_of

    return family_of(model_name)


def load_pretrained(model_name: str, device, offline_alternatives: str) -> GPTModel:
    """OpenAI's GPT-2 weights (dropout off, as both chapters do); when they cannot be had, chapter 5's
    message (how to get them) plus the chapter's `offline_alternatives`."""
    try:
        return load_pretrained_gpt2(model_name, drop_rate=0.0, device=device)
    except PretrainedWeightsUnavailable as exc:
        raise PretrainedWeightsUnavailable(f"{exc}\n{offline_alternatives}") from exc


def load_init_checkpoint(path: str | os.PathLike, device="cpu", n_heads: int | None = None) -> GPTModel:
    """A GPTModel (dropout off) from a file chapter 5 wrote: checkpoint.pth, model.pth or .safetensors.

    The config comes from the file (or config.json beside it), else from the tensor shapes
    (`n_heads` settles the head count); see `ch05.gpt_generate.load_model_for_generation`.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"--init-checkpoint {path} does not exist (create one with "
                                "`python -m ch05.gpt_train --quick`, which writes outputs/ch05/model.pth)")
    model, _ = load_model_for_generation(path, device=device, n_heads=n_heads)
    return model


QUICK_CLASSIFIER_CONFIG = {**GPT_CONFIG_124M, "context_length": 128, "emb_dim": 64, "n_heads": 4,
                           "n_layers": 2, "drop_rate": 0.1}

BOOK_SETTINGS = {
    "learning_rate": 5e-5, "weight_decay": 0.1, "batch_size": 8, "num_epochs": 5,
    "eval_freq": 50, "eval_iter": 5, "max_length": None, "trainable": "last_block", "seed": 123,
    "num_threads": None,  # None: PyTorch's default number of CPU threads
}
# Random init learns everything from 1,045 messages: every layer trains, with a higher learning rate.
QUICK_SETTINGS = {**BOOK_SETTINGS, "learning_rate": 1e-3, "num_epochs": 4, "max_length": 64, "trainable": "all",
                  "num_threads": 1}
FROM_SCRATCH_SETTINGS = {**BOOK_SETTINGS, "learning_rate": 1e-4, "trainable": "all"}

OFFLINE_ALTERNATIVES = """\
Without pretrained weights the chapter still runs offline:
  python -m ch06.gpt_class_finetune --quick          # small model from random init, about a minute on a CPU
  python -m ch06.gpt_class_finetune --from-scratch   # GPT-2 124M shape from random init (slow on a CPU, less accurate)
  python -m ch06.gpt_class_finetune --quick --init-checkpoint outputs/ch05/model.pth   # start from chapter 5"""


def finetune(settings: dict, output_dir: str | Path | None = None, *, mode: str = "pretrained",
             model_name: str = "gpt2", init_checkpoint: str | Path | None = None, n_heads: int | None = None,
             cfg: dict | None = None, device=None, progress: bool = True, resume: str | Path | None = None,
             checkpoint_every: int | None = None, experiment=None, plots: bool = True) -> dict:
    """Prepare the data, build the model, fine-tune, evaluate, save plots and the classifier.

    mode: "pretrained" (the book: GPT-2 weights via chapter 5; PretrainedWeightsUnavailable with
    instructions when they cannot be had), "quick" (small random-init model, or `init_checkpoint`),
    "scratch" (GPT-2 shape of `model_name`, random init). `cfg` overrides the model config in the
    random-init modes. `settings["num_threads"]` (quick: 1) limits CPU threads while it runs.
    A Ctrl-C writes `output_dir/checkpoint.pth`, which `resume` continues exactly.
    `experiment` (a `ch06.experiments.additional_experiments.Experiment`; None: the chapter's run) supplies
    the head, freezing, loaders, loss, accuracy and saving with the book's bonus switches; `plots=False`
    skips the loss and accuracy plots (a grid of runs).

    New: `model_name` may be a Hugging Face Llama 3.x, Qwen3 or Gemma 3 text folder ("pretrained": its
    weights, "scratch": its shape, random init); its tokenizer and pad id are used (`ch06.experiments.families`).
    """
    if mode not in ("pretrained", "quick", "scratch"):
        raise InvalidInput(f"mode must be 'pretrained', 'quick' or 'scratch', got {mode!r}")
    device = get_device(device)
    with cpu_threads(settings.get("num_threads") if device.type == "cpu" else None):
        output_dir = Path(output_dir) if output_dir is not None else outputs_dir("ch06")
        return _finetune(settings, output_dir, mode, model_name, init_checkpoint, n_heads, cfg, device,
                         progress, resume, checkpoint_every, experiment, plots)


def _finetune(settings, output_dir, mode, model_name, init_checkpoint, n_heads, cfg, device, progress,
              resume, checkpoint_every, experiment=None, plots=True) -> dict:
    # The chapter's listings, or an experiment's versions of them (same names and arguments).
    ops = book if experiment is None else experiment
    set_seed(settings["seed"])
    tokenizer = None
    family = None if init_checkpoint is not None or mode == "quick" else family_of(model_name)
    if family is not None:  # New: a Llama / Qwen3 / Gemma 3 folder brings its tokenizer and pad id
        from ch06.experiments.families import family_experiment, load_family_model

        model, tokenizer, source = load_family_model(model_name, from_scratch=mode == "scratch")
        experiment = ops = family_experiment(experiment, settings["trainable"], family, model_name,
                                             tokenizer.pad_token_id)
    elif init_checkpoint is not None:
        model = load_init_checkpoint(init_checkpoint, n_heads=n_heads)
        source = f"weights from {init_checkpoint}"
    elif mode == "pretrained":
        model = load_pretrained(model_name, device, OFFLINE_ALTERNATIVES)
        source = f"pretrained {model_name}"
    else:
        if cfg is None:
            cfg = QUICK_CLASSIFIER_CONFIG if mode == "quick" else {**GPT_CONFIG_124M, **GPT2_SIZES.get(model_name, {}),
                                                                   "drop_rate": 0.0}
        model = GPTModel(cfg)
        source = "random init"
    set_seed(settings["seed"])  # the same head init and batch order, whatever the model source consumed
    ops.prepare_classifier(model, num_classes=2, trainable=settings["trainable"])
    model.to(device)
    paths = book.prepare_spam_splits(output_dir, seed=settings["seed"])
    if experiment is not None:
        paths = experiment.prepare_splits(paths)

    context_length = model.cfg["context_length"]  # New: from the config (other families have no pos_emb)
    max_length = settings["max_length"]
    if experiment is not None:
        max_length = experiment.max_length(max_length, context_length)
    if max_length is not None and max_length > context_length:
        raise InvalidInput(f"max_length {max_length} exceeds the model's context length {context_length}")
    tokenizer = get_gpt2_tokenizer() if tokenizer is None else tokenizer
    train_loader, val_loader, test_loader = ops.create_spam_loaders(
        paths, tokenizer, batch_size=settings["batch_size"], max_length=max_length, seed=settings["seed"])
    truncated = ""
    if train_loader.dataset.max_length > context_length:
        # The longest message does not fit: truncate every split to the context length (and say so).
        truncated = (f" (the model's context length: the longest training message has "
                     f"{train_loader.dataset.max_length} tokens, longer ones are truncated)")
        train_loader, val_loader, test_loader = ops.create_spam_loaders(
            paths, tokenizer, batch_size=settings["batch_size"], max_length=context_length, seed=settings["seed"])
    max_length = train_loader.dataset.max_length
    print(f"device: {device}; model: {source}; {book.count_trainable_parameters(model):,} of "
          f"{sum(p.numel() for p in model.parameters()):,} parameters trainable "
          f"({settings['trainable'] if experiment is None else experiment.label}); "
          f"max_length {max_length}{truncated}; {len(train_loader)} training batches per epoch")

    eval_iter = settings["eval_iter"]

    def accuracies_after_epoch(m, epoch: int) -> dict:  # the end of the book's epoch loop
        train_accuracy = ops.calc_accuracy_loader(train_loader, m, device, num_batches=eval_iter)
        val_accuracy = ops.calc_accuracy_loader(val_loader, m, device, num_batches=eval_iter)
        print(f"Training accuracy: {train_accuracy * 100:.2f}% | Validation accuracy: {val_accuracy * 100:.2f}%")
        return {"train_accs": train_accuracy, "val_accs": val_accuracy}

    optimizer = make_optimizer(model, settings["learning_rate"], settings["weight_decay"])
    start = time.perf_counter()
    result = train(model, train_loader, val_loader, optimizer, device, settings["num_epochs"],
                   settings["eval_freq"], eval_iter,
                   loss_fn=lambda m, inputs, targets: ops.calc_loss_batch(inputs, targets, m, device),
                   evaluate_fn=lambda m: ops.evaluate_model(m, train_loader, val_loader, device, eval_iter),
                   epoch_end_fn=accuracies_after_epoch, checkpoint_path=output_dir / "checkpoint.pth",
                   checkpoint_every=checkpoint_every, resume_from=resume, final_checkpoint=False,
                   progress=progress, desc="fine-tuning", run_settings={**settings, "max_length": max_length,
                                 **({} if experiment is None else {"experiment": experiment.as_dict()})})
    seconds = time.perf_counter() - start
    train_losses, val_losses = result["train_losses"], result["val_losses"]
    train_accs, val_accs, examples_seen = result.get("train_accs", []), result.get("val_accs", []), result["examples"]

    accuracies = {name: ops.calc_accuracy_loader(loader, model, device)
                  for name, loader in zip(book.SPLIT_NAMES, (train_loader, val_loader, test_loader))}
    for name, acc in accuracies.items():
        print(f"{name.capitalize()} accuracy: {acc * 100:.2f}%")
    print(f"Training took {seconds / 60:.2f} minutes")

    import matplotlib.pyplot as plt

    num_epochs = settings["num_epochs"]
    if train_losses and plots:
        book.plot_values(torch.linspace(0, num_epochs, len(train_losses)).tolist(),
                    torch.linspace(0, examples_seen, len(train_losses)).tolist(),
                    train_losses, val_losses, label="loss", path=output_dir / "loss-plot.png")
    if plots:
        book.plot_values(torch.linspace(0, num_epochs, len(train_accs)).tolist(),
                         torch.linspace(0, examples_seen, len(train_accs)).tolist(),
                         train_accs, val_accs, label="accuracy", path=output_dir / "accuracy-plot.png")
    plt.close("all")
    model_path = ops.save_classifier(model, output_dir / book.MODEL_FILE, max_length=max_length)
    print(f"saved {model_path}{' and plots' if plots else ''} in {output_dir}")
    return {"model": model, "accuracies": accuracies, "train_losses": train_losses, "val_losses": val_losses,
            "train_accs": train_accs, "val_accs": val_accs, "examples_seen": examples_seen, "seconds": seconds,
            "max_length": max_length, "model_path": model_path, "loaders": (train_loader, val_loader, test_loader)}


DEFAULT_MODEL = "gpt2"


def parser() -> Parser:
    p = Parser(prog="python -m ch06.gpt_class_finetune",
               description="Fine-tune a GPT model as an SMS spam classifier (chapter 6). New: --model also takes a "
                           "Hugging Face Llama 3.x, Qwen3 or Gemma 3 text folder (its weights, tokenizer and pad id).")
    add_model_source_args(p, DEFAULT_MODEL, "offline: a small random-init model (or --init-checkpoint), all layers "
                                     "trained, ~1 min on a CPU")
    add_common_args(p, str(outputs_dir("ch06")))
    p.add_argument("--trainable", choices=book.TRAINABLE_CHOICES, help="what trains (default last_block; quick/scratch: all)")
    p.add_argument("--max-length", type=positive_int,
                   help="pad/truncate messages to N tokens (default: the longest training message; quick: 64)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, help="also checkpoint every N steps")
    p.add_argument("--resume", default=None, help="continue from this checkpoint (same other options)")
    add_experiment_args(p)
    return p


def context_length_argument(text: str) -> str | int:
    """--context-length: longest_training_example, model_context_length or a positive number of tokens."""
    if text in ("longest_training_example", "model_context_length"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected longest_training_example, model_context_length or a positive "
                                         f"number of tokens, got {text!r}")
    return value


def add_experiment_args(p: Parser) -> None:
    """The book's additional-experiment switches (ch06/experiments; its names, dashed)."""
    from ch06.experiments.additional_experiments import TRAINABLE_LAYERS, TRAINABLE_TOKEN_POS

    g = p.add_argument_group("additional experiments (the book's chapter-6 bonus, see ch06/experiments)")
    g.add_argument("--trainable-layers", choices=TRAINABLE_LAYERS,
                   help="what trains: last_layer (= --trainable head), last_block, last_two_blocks, all, or lora "
                        "(appendix E's adapters on every linear layer)")
    g.add_argument("--trainable-token-pos", choices=TRAINABLE_TOKEN_POS,
                   help="which output feeds the loss: last real token (default), first token, or the average / "
                        "max of the final hidden states over the real tokens")
    g.add_argument("--average-embeddings", action="store_true",
                   help="the book's switch for --trainable-token-pos average")
    g.add_argument("--context-length", type=context_length_argument,
                   help="pad/truncate to longest_training_example (default), model_context_length or N tokens")
    g.add_argument("--disable-causal-mask", action="store_true", help="every token attends to every token")
    g.add_argument("--pad-token-id", type=whole_number(0, 50256),
                   help=f"token id used for padding (default {book.PAD_TOKEN_ID}, <|endoftext|>)")
    g.add_argument("--ignore-index", type=int,
                   help="targets equal to this are skipped by the cross-entropy loss (default -100)")
    g.add_argument("--lora-rank", type=positive_int, help="LoRA rank with --trainable-layers lora (default 8)")
    g.add_argument("--lora-alpha", type=positive_float, help="LoRA alpha with --trainable-layers lora (default 8)")
    g.add_argument("--weights", choices=("pretrained", "random"),
                   help="the book's switch: random = --from-scratch (the --model shape from random init)")
    g.add_argument("--model-size", dest="model", default=argparse.SUPPRESS,
                   help="the book's name for --model, e.g. 'gpt2-medium (355M)'")


EXPERIMENT_OPTIONS = ("trainable_layers", "trainable_token_pos", "average_embeddings", "context_length",
                      "disable_causal_mask", "pad_token_id", "ignore_index", "lora_rank", "lora_alpha")


def experiment_from_args(args, settings: dict):
    """The run's Experiment (None when no experiment switch is given: the chapter's run), after refusing
    combinations that contradict each other or would be ignored (InvalidInput). Updates `settings`."""
    given = [name for name in EXPERIMENT_OPTIONS if getattr(args, name, None) is not None
             and getattr(args, name) is not False]  # (0 is a value: --ignore-index 0, --pad-token-id 0)
    if not given:
        return None
    from ch06.experiments.additional_experiments import Experiment

    if args.trainable is not None and args.trainable_layers is not None:
        raise InvalidInput("--trainable and --trainable-layers both choose what trains: give one of them")
    if args.max_length is not None and args.context_length is not None:
        raise InvalidInput("--max-length and --context-length both choose the padded length: give one of them")
    token = args.trainable_token_pos
    if args.average_embeddings:
        if token not in (None, "average"):
            raise InvalidInput(f"--average-embeddings means --trainable-token-pos average, not {token}: "
                               "give one of them")
        token = "average"
    layers = args.trainable_layers or {"head": "last_layer"}.get(settings["trainable"], settings["trainable"])
    if layers != "lora" and (args.lora_rank is not None or args.lora_alpha is not None):
        raise InvalidInput("--lora-rank and --lora-alpha only apply to --trainable-layers lora")
    context = args.context_length if args.context_length is not None else "longest_training_example"
    if args.context_length is not None:
        settings["max_length"] = context if isinstance(context, int) else None
    settings["trainable"] = layers
    values = {"trainable_layers": layers, "trainable_token_pos": token or "last", "context_length": context,
              "disable_causal_mask": args.disable_causal_mask, "pad_token_id": args.pad_token_id,
              "ignore_index": args.ignore_index, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha}
    return Experiment(**{k: v for k, v in values.items() if v is not None})


def settings_from_args(args) -> tuple[str, dict]:
    random = args.from_scratch or getattr(args, "weights", None) == "random"  # New: the book's --weights random
    mode = "quick" if args.quick else "scratch" if random else "pretrained"
    base = {"quick": QUICK_SETTINGS, "scratch": FROM_SCRATCH_SETTINGS, "pretrained": BOOK_SETTINGS}[mode]
    extra = {k: v for k, v in {"max_length": args.max_length, "trainable": args.trainable}.items() if v is not None}
    return mode, {**base, **common_overrides(args), **extra}


def check_model_source(args, default_model: str = DEFAULT_MODEL) -> None:
    """Options that choose the model (`llmfs.finetuning.add_model_source_args`, chapters 6 and 7) must agree:
    nothing given is silently ignored (InvalidInput). `default_model` is the command's --model default."""
    from ch05.gpt_download import canonical_model_name

    quick = "LLMFS_QUICK=1 (quick mode)" if is_quick() else "--quick"
    if args.quick and args.from_scratch:
        raise InvalidInput(f"{quick} and --from-scratch both choose a random-init model: give one of them")
    weights = getattr(args, "weights", None)  # the book's --weights switch
    if weights == "pretrained" and (args.quick or args.from_scratch or args.init_checkpoint is not None):
        used = quick if args.quick else "--from-scratch" if args.from_scratch else "--init-checkpoint"
        raise InvalidInput(f"--weights pretrained contradicts {used}: give one of them")
    if weights == "random" and (args.quick or args.init_checkpoint is not None):
        used = quick if args.quick else "--init-checkpoint"
        raise InvalidInput(f"--weights random and {used} both choose the model: give one of them")
    if weights == "random":
        args.from_scratch = True
    if args.n_heads is not None and args.init_checkpoint is None:
        raise InvalidInput("--n-heads only applies to --init-checkpoint (a file without a config)")
    if args.from_scratch:
        if args.init_checkpoint is not None:
            raise InvalidInput("--from-scratch starts from random weights, --init-checkpoint from a file: "
                               "give one of them")
        if family_of(args.model) is None:  # New: or a Llama / Qwen3 / Gemma 3 folder, whose shape is built
            canonical_model_name(args.model)  # the GPT-2 shape to build: a name, not a path
    elif args.model != default_model and (args.quick or args.init_checkpoint is not None):
        used = quick if args.init_checkpoint is None else "--init-checkpoint"
        raise InvalidInput(f"--model {args.model} is not used with {used} (which brings its own model); "
                           "drop one of them")
    if family_of(args.model) is not None and getattr(args, "disable_causal_mask", False):
        raise InvalidInput("--disable-causal-mask switches GPTModel's mask buffer; Llama, Qwen3 and Gemma 3 "
                           "attention has none (leave the option out with --model DIR)")


def main(argv: list[str] | None = None) -> int:
    """`python -m ch06.gpt_class_finetune [options]`; returns the exit code."""
    args = parser().parse_args(argv)
    mode, settings = settings_from_args(args)

    def main_run():
        experiment = experiment_from_args(args, settings)
        check_model_source(args)
        check_output_dir(args.output_dir, args.overwrite, (book.MODEL_FILE,), resume=args.resume,
                         checkpoint="checkpoint.pth")
        check_input_file(args.init_checkpoint, "--init-checkpoint")
        check_input_file(args.resume, "--resume")
        finetune(settings, args.output_dir, mode=mode, model_name=args.model, init_checkpoint=args.init_checkpoint,
                 n_heads=args.n_heads, device=args.device, progress=not args.no_progress, resume=args.resume,
                 checkpoint_every=args.checkpoint_every, experiment=experiment)

    return run(main_run, argv, onednn=args.onednn)


if __name__ == "__main__":
    sys.exit(main())
