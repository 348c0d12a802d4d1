"""Chapter 6 in the browser: is a text message spam? Asks the classifier chapter 6's CLI trained.

    python -m ch06.ui                                        # outputs/ch06/review_classifier.pth
    python -m ch06.ui --model path/to/review_classifier.pth

The classifier may be one chapter 6 trained on a Llama 3.x, Qwen3 or Gemma 3 folder (`--model DIR` of
`ch06.gpt_class_finetune`; its .json names the family): it then reads the message with that family's
tokenizer, saved beside it (`ch06.experiments.families.load_family_classifier`). Then open http://127.0.0.1:7860. The page shows "spam" or "not spam" with the model's probability
for each: the softmax of the two logits that section 6.8's `classify_review` takes the larger of.
Loading and the command line are shared with the other chapters' apps (`llmfs.apps`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gradio as gr
import torch
import torch.nn as nn

from ch02.tokenizer import get_gpt2_tokenizer
from ch06.experiments.families import load_family_classifier
from ch06.gpt_class_finetune import (
    CLASS_NAMES,
    MODEL_FILE,
    encode_text,
    last_token_logits,
    load_classifier,
)
from llmfs.apps import EMPTY_INPUT_MESSAGE, MODEL_THREAD, app_parser, load_app_model, page, serve_app
from llmfs.runtime import eval_mode, outputs_dir

HINT = ("Train one with `python -m ch06.gpt_class_finetune` (`--quick` trains a small one offline in about a "
        "minute); `--model` takes the `review_classifier.pth` it writes (with its `.json` beside it).")
EXAMPLES = ["You are a winner you have been specially selected to receive $1000 cash or a $2000 award.",
            "Hey, just wanted to check if we're still on for dinner tonight? Let me know!"]  # section 6.8's two


def class_probabilities(text: str, model: nn.Module, tokenizer,
                        max_length: int | None = None) -> dict[str, float]:
    """{"not spam": p, "spam": 1 - p}: softmax over the class logits at the text's last token.

    Truncated like `classify_review` (to `max_length`, and never beyond the context length);
    padding is left out because it would not change the logits at the last real token.
    """
    supported = model.cfg["context_length"]  # New: any family's (GPT-2's is pos_emb's rows)
    input_ids = encode_text(text, tokenizer)[:supported if max_length is None else min(max_length, supported)]
    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():  # New: the length given, so no token id is taken for padding
        logits = last_token_logits(model, torch.tensor([input_ids], device=device), lengths=[len(input_ids)])
    probas = torch.softmax(logits, dim=-1)[0]
    return {CLASS_NAMES[i]: float(p) for i, p in enumerate(probas)}


def load_any_classifier(path: str, device) -> tuple[nn.Module, dict]:
    """New: chapter 6's classifier (GPT-2), or one of another family, whose .json names it; the info
    holds its tokenizer then ("tokenizer")."""
    meta_path = Path(path).with_suffix(".json")
    try:
        family = json.loads(meta_path.read_text(encoding="utf-8")).get("family")
    except (OSError, ValueError, AttributeError):  # load_classifier says what is wrong with the files
        family = None
    if family is None:
        return load_classifier(path, device)
    model, meta, tokenizer = load_family_classifier(path, device)
    return model, {**meta, "tokenizer": tokenizer}


def build_demo(model_path: str, device="cpu") -> gr.Blocks:
    """The page: a text box, a button, and the verdict with both probabilities."""
    app = load_app_model(load_any_classifier, model_path, device, HINT)
    tokenizer = (app.info or {}).get("tokenizer") or get_gpt2_tokenizer()

    def classify(text: str):
        """(the label's value, message)."""
        if app.error:
            return None, app.error
        if not text.strip():
            return None, EMPTY_INPUT_MESSAGE
        # On the thread that loaded the model (llmfs.apps.MODEL_THREAD: one thread for its torch work)
        return MODEL_THREAD.submit(class_probabilities, text, app.model, tokenizer, app.info.get("max_length")).result(), ""

    with page("Chapter 6: spam classifier") as demo:
        source = "none (see the message below)" if app.error else f"`{model_path}`"
        gr.Markdown(f"## Chapter 6: spam or not spam?\nClassifier: {source}")
        text = gr.Textbox(label="Text message", lines=3, elem_id="text")
        button = gr.Button("Classify", variant="primary", elem_id="classify")
        message = gr.Markdown(app.error or app.note, elem_id="message")
        verdict = gr.Label(label="Verdict", num_top_classes=2, elem_id="verdict")
        gr.Examples(EXAMPLES, text)
        gr.on([button.click, text.submit], classify, text, [verdict, message])
    return demo


def main(argv: list[str] | None = None) -> int:
    """`python -m ch06.ui [options]`; returns the exit code."""
    args = app_parser("python -m ch06.ui", "Chapter 6's spam classifier in the browser.",
                      f"{outputs_dir('ch06')}/{MODEL_FILE}",
                      "review_classifier.pth from ch06.gpt_class_finetune").parse_args(argv)
    return serve_app(args, lambda device: build_demo(args.model, device))


if __name__ == "__main__":
    sys.exit(main())
