"""Chapter 5 in the browser: continue a prompt with the model you trained, or with GPT-2.

    python -m ch05.ui                    # the newest model in outputs/ch05 (python -m ch05.gpt_train)
    python -m ch05.ui --model gpt2       # OpenAI's GPT-2 124M (section 5.5)

then open http://127.0.0.1:7860. The text grows token by token; with the same settings and
seed it is exactly what `python -m ch05.gpt_generate` prints. `--model` takes what
`ch05.gpt_generate --model` takes. The page itself is built with Gradio; loading and
streaming live in `llmfs.apps`, shared with chapters 6 and 7. New: `--model` also takes a Llama 3.x,
Qwen3 (dense or MoE) or Gemma 3 text folder, continued as `python -m ch05.llama` (no --chat) continues it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr

from ch02.tokenizer import get_gpt2_tokenizer
from ch05.gpt_generate import load_model_for_generation
from ch05.llama.generate_llm import FAMILIES, load_llm, read_hf_config
from llmfs.apps import (
    EMPTY_INPUT_MESSAGE,
    app_parser,
    load_app_model,
    newest_file,
    page,
    serve_app,
    stream_text,
)
from llmfs.errors import UserError
from llmfs.int8 import add_int8_argument

OUTPUT_DIR = "outputs/ch05"  # ch05.gpt_train's --output-dir default
HINT = ("Train one with `python -m ch05.gpt_train` (add `--quick` for a one-minute run), "
        "or start the app with `--model gpt2` for OpenAI's weights.")
# The controls' starting values: sampling as in section 5.3, seeded so an answer can be repeated.
DEFAULTS = {"prompt": "Every effort moves you", "max_new_tokens": 50,
            "temperature": 0.7, "top_k": 50, "seed": 123}


def default_model() -> str:
    """What `python -m ch05.gpt_train` wrote last."""
    newest = newest_file(OUTPUT_DIR, ("model.pth", "checkpoint.pth", "model.safetensors"))
    return str(newest or f"{OUTPUT_DIR}/model.pth")


class FamilyTokenizer:
    """New: a Llama / Qwen3 / Gemma 3 tokenizer with what `stream_text` calls (plain text, no chat format)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # ch05.llama's Llama3Tokenizer, Qwen3Tokenizer or Gemma3Tokenizer

    def encode(self, text: str, allowed_special=None) -> list[int]:
        return self.tokenizer.encode(text)  # after the begin-of-text token, as python -m ch05.llama

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def is_family_folder(spec: str) -> bool:
    """New: whether `spec` is a Hugging Face folder of a family `load_llm` runs besides GPT-2."""
    path = Path(spec)
    try:
        hf = read_hf_config(path) if path.is_dir() else None
    except (OSError, ValueError, UserError):  # no readable config.json: chapter 5's loader says what is wrong
        return False
    return isinstance(hf, dict) and hf.get("model_type") in FAMILIES


def build_demo(model_spec: str, device="cpu", int8: bool | str = False) -> gr.Blocks:
    """The page: a prompt, the sampling controls of section 5.3, and the growing text (`int8`: llmfs.int8)."""
    eos_id = None
    if is_family_folder(model_spec):  # New: Llama 3.x, Qwen3, Gemma 3
        loaded = {}

        def load_family(spec, device):
            llm = loaded["llm"] = load_llm(spec, device=device)
            return llm.model, llm.description

        app = load_app_model(load_family, model_spec, device, HINT, int8=int8)
        if "llm" in loaded:
            tok = loaded["llm"].tokenizer
            tokenizer, eos_id = FamilyTokenizer(tok), tok.token_id(tok.stop_tokens[-1])  # the end of the text
    else:
        app = load_app_model(load_model_for_generation, model_spec, device, HINT, int8=int8)
        tokenizer = get_gpt2_tokenizer()

    def complete(prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int):
        """Yield (text so far, message) once per new token."""
        if app.error:
            yield "", app.error
            return
        if not prompt.strip():
            yield "", EMPTY_INPUT_MESSAGE
            return
        for text in stream_text(app.model, tokenizer, prompt, max_new_tokens, temperature,
                                top_k=int(top_k) or None, seed=int(seed or 0), eos_id=eos_id):  # top-k 0: off
            yield text, ""

    with page("Chapter 5: generate text") as demo:
        gr.Markdown(f"## Chapter 5: generate text\nModel: {app.info or 'none (see the message below)'}")
        prompt = gr.Textbox(DEFAULTS["prompt"], label="Prompt", lines=2, elem_id="prompt")
        with gr.Row():
            max_new_tokens = gr.Slider(1, 500, DEFAULTS["max_new_tokens"], step=1, label="New tokens",
                                       elem_id="max-new-tokens")
            temperature = gr.Slider(0.0, 2.0, DEFAULTS["temperature"], step=0.05, elem_id="temperature",
                                    label="Temperature (0: always the most likely token)")
            top_k = gr.Slider(0, 200, DEFAULTS["top_k"], step=1, label="Top-k (0: off)", elem_id="top-k")
            seed = gr.Number(DEFAULTS["seed"], precision=0, label="Seed", elem_id="seed")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        message = gr.Markdown(app.error or app.note, elem_id="message")
        output = gr.Textbox(label="Text", lines=8, interactive=False, elem_id="output")
        gr.on([button.click, prompt.submit], complete, [prompt, max_new_tokens, temperature, top_k, seed],
              [output, message])
    return demo


def main(argv: list[str] | None = None) -> int:
    """`python -m ch05.ui [options]`; returns the exit code."""
    p = app_parser("python -m ch05.ui", "Chapter 5's text generation in the browser.", default_model(),
                   "gpt2, gpt2-medium, ... (or 124M ...); a Hugging Face GPT-2 folder or .safetensors file; "
                   "or checkpoint.pth / model.pth from ch05.gpt_train")
    add_int8_argument(p, dynamic=True)
    args = p.parse_args(argv)
    return serve_app(args, lambda device: build_demo(args.model, device, int8=args.int8))


if __name__ == "__main__":
    sys.exit(main())
