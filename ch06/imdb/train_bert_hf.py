"""Chapter 6 bonus: an encoder model from Hugging Face `transformers` (BERT, RoBERTa, DistilBERT, ModernBERT)
as a classifier of any labelled text, IMDb movie reviews by default.

    python -m ch06.imdb.train_bert_hf --model bert-base-uncased --trainable all       # the book's "bert" run
    python -m ch06.imdb.train_bert_hf --model FacebookAI/roberta-large --trainable last_block
    python -m ch06.imdb.train_bert_hf --model path/to/local/folder --data reviews.csv

The book's `train_bert_hf.py`: `AutoModelForSequenceClassification` puts a classification head on
the encoder (one output per class), the texts are padded with the tokenizer's padding id and an
attention mask hides the padding (`--no-attention-mask`: the book's --use_attention_mask false), and
the book's loss, accuracy and training loop read the head's `.logits`. `--model` is a local folder
(config.json, the weights, the tokenizer) or a Hub id, found through chapter 5's `resolve_model_dir`
(offline: the Hugging Face cache only, HF_HUB_OFFLINE=1), where the book hard-codes two names.
`--trainable` head / last_block / all replaces the book's per-model code with one rule that fits
every encoder: the head is what the task model adds around `model.base_model`; last_block adds the
encoder's last layer plus its pooler or final norm, where the model has one. The loop is
`llmfs.trainer.train`, as for the GPT model.

`write_tiny_encoder` (New) saves a small random encoder with its own tokenizer trained on the given
texts, so the notebook and the tests run the whole path offline.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ch06.gpt_class_finetune import TRAINABLE_CHOICES, count_trainable_parameters
from ch06.imdb.labeled_data import LabeledData, add_data_args, data_from_args
from ch06.imdb.report import print_accuracies, result, track_resources
from ch06.imdb.train_gpt import add_training_args, training_overrides
from llmfs.cli import Parser, add_quick_argument, run
from llmfs.errors import InvalidInput
from llmfs.finetuning import cpu_threads
from llmfs.runtime import get_device, outputs_dir, set_seed
from llmfs.trainer import make_optimizer, train

# The book's settings (train_bert_hf.py): as for GPT-2, with every layer trained and 256 tokens.
BOOK_SETTINGS = {
    "learning_rate": 5e-5, "weight_decay": 0.1, "batch_size": 8, "num_epochs": 1, "eval_freq": 50, "eval_iter": 20,
    "context_length": 256, "trainable": "all", "use_attention_mask": True, "seed": 123, "num_threads": None,
}
QUICK_SETTINGS = {**BOOK_SETTINGS, "learning_rate": 1e-3, "num_epochs": 3, "eval_freq": 20, "eval_iter": 5,
                  "context_length": 64, "num_threads": 1}


class IMDBDataset(Dataset):
    """Token ids, attention masks and class indices of a text/label table, padded to `max_length` tokens."""

    def __init__(self, csv_file, tokenizer, max_length=None, pad_token_id=50256, use_attention_mask=False):
        # New: a DataFrame with text and class-index label columns (labeled_data) works as well as a CSV path
        self.data = csv_file if isinstance(csv_file, pd.DataFrame) else pd.read_csv(csv_file)
        self.max_length = max_length if max_length is not None else self._longest_encoded_length(tokenizer)
        self.pad_token_id = pad_token_id
        self.use_attention_mask = use_attention_mask

        # Pre-tokenize texts and create attention masks if required
        self.encoded_texts = [
            tokenizer.encode(text, truncation=True, max_length=self.max_length)
            for text in self.data["text"]
        ]
        # New: the mask marks each text's real tokens by its length, so a pad id inside a text stays visible
        self.lengths = [len(et) for et in self.encoded_texts]
        self.encoded_texts = [
            et + [pad_token_id] * (self.max_length - len(et))
            for et in self.encoded_texts
        ]

        if self.use_attention_mask:
            self.attention_masks = [[1] * n + [0] * (self.max_length - n) for n in self.lengths]
        else:
            self.attention_masks = None

    def __getitem__(self, index):
        encoded = self.encoded_texts[index]
        label = self.data.iloc[index]["label"]

        if self.use_attention_mask:
            attention_mask = torch.tensor(self.attention_masks[index], dtype=torch.long)
        else:
            attention_mask = torch.ones(self.max_length, dtype=torch.long)

        return torch.tensor(encoded, dtype=torch.long), attention_mask, torch.tensor(label, dtype=torch.long)

    def __len__(self):
        return len(self.data)

    def _longest_encoded_length(self, tokenizer):
        return max(len(tokenizer.encode(text)) for text in self.data["text"])


def calc_loss_batch(input_batch, attention_mask_batch, target_batch, model, device):
    attention_mask_batch = attention_mask_batch.to(device)
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch, attention_mask=attention_mask_batch).logits
    loss = torch.nn.functional.cross_entropy(logits, target_batch)
    return loss


# Same as in chapter 5, for batches of three
def calc_loss_loader(data_loader, model, device, num_batches=None):
    total_loss = 0.
    if num_batches is None:
        num_batches = len(data_loader)
    else:
        # Reduce the number of batches to match the total number of batches in the data loader
        # if num_batches exceeds the number of batches in the data loader
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, attention_mask_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            loss = calc_loss_batch(input_batch, attention_mask_batch, target_batch, model, device)
            total_loss += loss.item()
        else:
            break
    return total_loss / num_batches


@torch.no_grad()  # Disable gradient tracking for efficiency
def calc_accuracy_loader(data_loader, model, device, num_batches=None):
    model.eval()
    correct_predictions, num_examples = 0, 0

    if num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, attention_mask_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            attention_mask_batch = attention_mask_batch.to(device)
            input_batch, target_batch = input_batch.to(device), target_batch.to(device)
            logits = model(input_batch, attention_mask=attention_mask_batch).logits
            predicted_labels = torch.argmax(logits, dim=1)
            num_examples += predicted_labels.shape[0]
            correct_predictions += (predicted_labels == target_batch).sum().item()
        else:
            break
    return correct_predictions / num_examples


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


# --- The model --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_transformers():
    """No "some weights were newly initialized" warning (the new head, as intended) and no progress bars
    for loading a few files."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_encoder(model: str | Path, num_classes: int):
    """(classifier, tokenizer) from a local folder or a Hub id: the encoder's weights with a new head of
    `num_classes` outputs (a head of another size in the folder is replaced)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ch05.llama.llama3 import resolve_model_dir

    folder = resolve_model_dir(model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a transformers model folder")
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        classifier = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_classes,
                                                                        ignore_mismatched_sizes=True)
    if tokenizer.pad_token_id is None:
        raise InvalidInput(f"the tokenizer of {model} has no padding token; an encoder model (BERT, RoBERTa, ...) "
                           "is expected")
    return classifier, tokenizer


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's list of transformer layers (bert.encoder.layer, distilbert.transformer.layer,
    model.layers, ...): the longest ModuleList inside `model.base_model`."""
    lists = [m for m in model.base_model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of layers")
    return max(lists, key=len)


def set_trainable(model: nn.Module, trainable: str = "all") -> nn.Module:
    """head: what the task model adds around `base_model`; last_block: that plus the last encoder layer
    and the pooler / final norm (the book's choice for BERT); all: everything."""
    if trainable not in TRAINABLE_CHOICES:
        raise ValueError(f"trainable must be one of {TRAINABLE_CHOICES}, got {trainable!r}")
    base = model.base_model
    in_base = {id(p) for p in base.parameters()}
    for param in model.parameters():
        param.requires_grad = trainable == "all" or id(param) not in in_base
    if trainable == "last_block":
        extra = [encoder_layers(model)[-1]]
        extra += [module for name, module in base.named_children() if name in ("pooler", "final_norm", "norm")]
        for module in extra:
            for param in module.parameters():
                param.requires_grad = True
    return model


def create_loaders(data: LabeledData, tokenizer, max_length: int, batch_size: int, seed: int,
                   use_attention_mask: bool) -> tuple[DataLoader, DataLoader, DataLoader]:
    datasets = [IMDBDataset(df, tokenizer, max_length=max_length, pad_token_id=tokenizer.pad_token_id,
                            use_attention_mask=use_attention_mask)
                for df in (data.train, data.validation, data.test)]
    generator = torch.Generator().manual_seed(seed)  # New: a seeded shuffle
    return (DataLoader(datasets[0], batch_size=batch_size, shuffle=True, drop_last=True, generator=generator),
            DataLoader(datasets[1], batch_size=batch_size, drop_last=False),
            DataLoader(datasets[2], batch_size=batch_size, drop_last=False))


def train_bert_hf(data: LabeledData, model: str | Path, settings: dict | None = None, *, quick: bool = False,
                  device=None, progress: bool = False) -> dict:
    """Fine-tune the encoder in `model` (folder or Hub id) on `data`; returns its result row plus "classifier"."""
    settings = {**(QUICK_SETTINGS if quick else BOOK_SETTINGS), **(settings or {})}
    if len(data.train) < settings["batch_size"]:
        raise InvalidInput(f"the training split has {len(data.train)} rows, fewer than one batch of "
                           f"{settings['batch_size']} (lower --batch-size)")
    device = get_device(device)
    with cpu_threads(settings["num_threads"] if device.type == "cpu" else None), track_resources(device) as stats:
        set_seed(settings["seed"])
        classifier, tokenizer = load_encoder(model, data.num_classes)
        set_trainable(classifier, settings["trainable"])
        classifier.to(device)
        supported = getattr(classifier.config, "max_position_embeddings", None) or tokenizer.model_max_length
        max_length = settings["context_length"]
        if max_length in ("model_context_length", "longest_training_example") or max_length > supported:
            max_length = min(supported, tokenizer.model_max_length or supported)  # New: what the model can take
        train_loader, val_loader, test_loader = create_loaders(
            data, tokenizer, max_length, settings["batch_size"], settings["seed"], settings["use_attention_mask"])
        eval_iter = settings["eval_iter"]

        def accuracies_after_epoch(m, epoch: int) -> dict:
            train_accuracy = calc_accuracy_loader(train_loader, m, device, num_batches=eval_iter)
            val_accuracy = calc_accuracy_loader(val_loader, m, device, num_batches=eval_iter)
            print(f"Training accuracy: {train_accuracy*100:.2f}% | Validation accuracy: {val_accuracy*100:.2f}%")
            return {"train_accs": train_accuracy, "val_accs": val_accuracy}

        start_time = time.perf_counter()
        optimizer = make_optimizer(classifier, settings["learning_rate"], settings["weight_decay"])
        train(classifier, train_loader, val_loader, optimizer, device, settings["num_epochs"], settings["eval_freq"],
              eval_iter, loss_fn=lambda m, ids, mask, targets: calc_loss_batch(ids, mask, targets, m, device),
              evaluate_fn=lambda m: evaluate_model(m, train_loader, val_loader, device, eval_iter),
              epoch_end_fn=accuracies_after_epoch, final_checkpoint=False, progress=progress, desc="fine-tuning")
        seconds = time.perf_counter() - start_time
        print(f"Training completed in {seconds / 60:.2f} minutes.")

        print("\nEvaluating on the full datasets ...\n")
        accuracies = {name: calc_accuracy_loader(loader, classifier, device)
                      for name, loader in zip(("train", "validation", "test"), (train_loader, val_loader, test_loader))}
        print_accuracies(accuracies)
    name = f"{classifier.config.model_type} ({Path(str(model)).name})"
    return {**result(name, "encoder (transformers)", accuracies, seconds, stats["peak_mib"],
                     sum(p.numel() for p in classifier.parameters()), count_trainable_parameters(classifier),
                     gpu_peak_mib=stats.get("gpu_peak_mib"), max_length=max_length),
            "classifier": classifier}


# --- New: a tiny random encoder, written offline ---------------------------------------------------------

ENCODER_FAMILIES = ("bert", "roberta", "distilbert", "modernbert")


def _train_tokenizer(texts: list[str], family: str, vocab_size: int):
    """A WordPiece tokenizer with `family`'s special tokens whose vocabulary is built from `texts`: the
    specials, every character (alone and as a "##" continuation), then the most frequent words (ties
    alphabetical). Built by counting rather than with a `tokenizers` trainer, whose ids depend on set
    order and change from run to run; a real RoBERTa uses byte-level BPE, which the path does not need."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if family == "roberta":
        special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0-4
        cls, sep, unk = "<s>", "</s>", "<unk>"
        names = {"bos_token": "<s>", "eos_token": "</s>", "cls_token": cls, "sep_token": sep, "pad_token": "<pad>",
                 "unk_token": unk, "mask_token": "<mask>"}
    else:
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        cls, sep, unk = "[CLS]", "[SEP]", "[UNK]"
        names = {"cls_token": cls, "sep_token": sep, "pad_token": "[PAD]", "unk_token": unk, "mask_token": "[MASK]"}
    normalizer = normalizers.BertNormalizer(lowercase=family != "roberta")
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = special + chars + [f"##{c}" for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(w) > 1]
    vocab += words[:max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece(vocab={token: i for i, token in enumerate(vocab)}, unk_token=unk))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128, **names)


def write_tiny_encoder(path: str | Path, family: str, texts: list[str], vocab_size: int = 300, seed: int = 123,
                       **overrides) -> Path:
    """Save a small random `family` encoder ("bert", "roberta", "distilbert", "modernbert") with a tokenizer built from
    `texts` into `path`, as `save_pretrained` writes a downloaded one; returns the folder."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        DistilBertConfig,
        ModernBertConfig,
        RobertaConfig,
    )

    if family not in ENCODER_FAMILIES:
        raise ValueError(f"family must be one of {ENCODER_FAMILIES}, got {family!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(list(texts), family, vocab_size)
    sizes = {"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 130, "pad_token_id": tokenizer.pad_token_id}
    if family == "distilbert":
        cfg = DistilBertConfig(vocab_size=sizes["vocab_size"], dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                               max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id, **overrides)
    elif family == "modernbert":
        ids = {"pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id,
               "sep_token_id": tokenizer.sep_token_id, "bos_token_id": tokenizer.cls_token_id,
               "eos_token_id": tokenizer.sep_token_id}
        cfg = ModernBertConfig(**{**sizes, **ids, **overrides})
    elif family == "roberta":
        cfg = RobertaConfig(**{**sizes, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                               **overrides})
    else:
        cfg = BertConfig(**{**sizes, **overrides})
    torch.manual_seed(seed)
    with quiet_transformers():
        AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


# --- The command ----------------------------------------------------------------------------------------------

def parser() -> Parser:
    p = Parser(prog="python -m ch06.imdb.train_bert_hf",
               description="Fine-tune a transformers encoder (BERT, RoBERTa, ...) as a classifier of a labelled "
                           "text file (IMDb by default).")
    add_data_args(p, outputs_dir("ch06-imdb"))
    p.add_argument("--model", required=True,
                   help="a local model folder (config.json, weights, tokenizer) or a Hub id such as "
                        "distilbert-base-uncased, bert-base-uncased, FacebookAI/roberta-large")
    add_quick_argument(p, "quick settings (higher learning rate, 64 tokens, 3 epochs)")
    add_training_args(p)
    p.add_argument("--trainable", choices=TRAINABLE_CHOICES, help="what trains: head, last_block or all (default)")
    p.add_argument("--no-attention-mask", action="store_true",
                   help="let the model attend to the padding (the book's --use_attention_mask false)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ch06.imdb.train_bert_hf [options]`; returns the exit code."""
    args = parser().parse_args(argv)
    settings = {**training_overrides(args), **({"use_attention_mask": False} if args.no_attention_mask else {})}

    def work():
        data = data_from_args(args, seed=args.seed)
        print(data.describe())
        train_bert_hf(data, args.model, settings, quick=args.quick, device=args.device, progress=not args.no_progress)

    return run(work, argv)


if __name__ == "__main__":
    sys.exit(main())
