"""Chapter 6 bonus: the spam classifier on a Llama 3.x, Qwen3 or Gemma 3 model (every model family).

    python -m ch06.gpt_class_finetune --model path/to/Llama-3.2-1B          # its pretrained weights
    python -m ch06.gpt_class_finetune --model path/to/Qwen3-0.6B --trainable-layers lora
    python -m ch06.gpt_class_finetune --model DIR --from-scratch             # DIR's shape, random init

`ch06.cli.finetune` does the run as for GPT-2; this module supplies what differs. The model and
tokenizer come from the folder (`ch05.llama.family_training`). The messages are padded with the
family's pad id (tokenizer_config.json's pad token, Gemma's <pad>, else end-of-text: Llama 3 and
Qwen3 base models have no pad token), and, as in the chapter, the head reads each message at its
last *real* token (the last non-pad position), so padding is never read and adding more of it
changes nothing. A `FamilyExperiment` (the bonus experiments' `Experiment`, with the family's pad
id) carries that through the loaders, loss, accuracy and saving; the LoRA and trainable-layer
switches apply unchanged, the causal-mask switch does not (these attention modules have no mask
buffer to switch). The classifier is saved as the chapter's (review_classifier.pth and its .json,
which names the family), with the folder's tokenizer files beside it; `load_family_classifier`
rebuilds it.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from ch05.llama.family_training import MODEL_CLASSES, BookTokenizer, build_family_model, family_of
from ch05.llama.generate_llm import FAMILIES
from ch05.llama.hf_save import TOKENIZER_FILES
from ch06.experiments.additional_experiments import Experiment, book
from llmfs.checkpoint import load_model
from llmfs.errors import InvalidInput
from llmfs.finetuning import save_with_config

__all__ = ["FamilyExperiment", "family_experiment", "family_of", "load_family_classifier", "load_family_model"]


@dataclass(frozen=True)
class FamilyExperiment(Experiment):
    """An `Experiment` for a model of another family: `family` and the folder it came from are saved
    with the classifier; the pad id is the family's."""

    family: str = "llama"
    model_dir: str = ""

    def check(self, vocab_size: int | None = None) -> None:
        super().check(vocab_size)
        if self.disable_causal_mask:
            raise InvalidInput("--disable-causal-mask switches GPTModel's mask buffer; Llama, Qwen3 and Gemma 3 "
                               "attention has none (leave the option out with --model DIR)")

    def save_classifier(self, model: nn.Module, path, max_length: int | None = None) -> Path:
        """The chapter's files (LoRA merged into a copy first, as `Experiment.save_classifier`) naming the
        family, and the folder's tokenizer files beside them, so the classifier stands on its own."""
        if self.trainable_layers == "lora":
            from appendix_e.lora import merge_lora

            model = merge_lora(copy.deepcopy(model))
        path = save_with_config(model, path, num_classes=model.out_head.out_features, max_length=max_length,
                                pad_token_id=self.pad_token_id, family=self.family, experiment=self.as_dict())
        for name in TOKENIZER_FILES[:3]:  # tokenizer.json, tokenizer_config.json, special_tokens_map.json
            source = Path(self.model_dir) / name
            if source.is_file() and source.resolve() != (path.parent / name).resolve():
                shutil.copyfile(source, path.parent / name)
        return path


def load_family_model(model_dir: str | os.PathLike, from_scratch: bool = False) -> tuple[nn.Module, BookTokenizer, str]:
    """(model, tokenizer, description) of a Llama / Qwen3 / Gemma 3 folder: its weights, or with
    `from_scratch` its shape with random init."""
    model, tokenizer, family = build_family_model(model_dir, load_weights=not from_scratch)
    return model, tokenizer, f"{family} from {model_dir} ({'random init' if from_scratch else 'its weights'})"


def family_experiment(experiment: Experiment | None, trainable: str, family: str, model_dir: str | os.PathLike,
                      pad_token_id: int) -> FamilyExperiment:
    """The run's switches for a family model: the command's experiment (or the chapter's settings, with
    `trainable` layers) with the family's pad id, unless a pad id other than GPT-2's was chosen."""
    values = experiment.as_dict() if experiment is not None else {
        "trainable_layers": {"head": "last_layer"}.get(trainable, trainable)}
    if values.get("pad_token_id", book.PAD_TOKEN_ID) == book.PAD_TOKEN_ID:
        values["pad_token_id"] = pad_token_id
    values = {k: v for k, v in values.items() if k not in ("family", "model_dir")}
    return FamilyExperiment(**values, family=family, model_dir=str(model_dir))


def load_family_classifier(path: str | os.PathLike, device="cpu") -> tuple[nn.Module, dict, BookTokenizer]:
    """A classifier that `finetune` saved for a family model: (model in eval mode, metadata, tokenizer)."""
    import json

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: it holds the classifier's config and family")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    family = meta.get("family")
    if family not in MODEL_CLASSES:
        raise InvalidInput(f"{meta_path} names no model family ({family!r}); a GPT-2 classifier loads with "
                           "ch06.gpt_class_finetune.load_classifier")
    cfg = {k: v for k, v in meta["config"].items() if k != "num_classes"}
    model = MODEL_CLASSES[family]({**cfg, "dtype": None})
    model.cfg.pop("dtype", None)
    book.prepare_classifier(model, num_classes=meta["num_classes"], trainable="all")
    load_model(model, path)
    tokenizer = BookTokenizer(FAMILIES[family][1](path.parent))
    return model.to(device).eval(), meta, tokenizer
