"""Chapter 7 in the browser: chat with the model `python -m ch07.gpt_instruction_finetuning` fine-tuned.

    python -m ch07.ui                                    # the newest outputs/ch07/*-sft.pth
    python -m ch07.ui --model outputs/ch07/gpt2-medium-sft.pth --max-new-tokens 100

then open http://127.0.0.1:7860. Each message becomes the instruction of an Alpaca prompt
(section 7.2's `format_input`) and the answer appears token by token. As in the book's chat app,
every message stands alone: the model was fine-tuned on single instructions, not conversations.
`--model` also takes GPT-2 weights or chapter 5's files (which answer, but not as instructed).
New: or a Llama 3.x, Qwen3 (dense or MoE) or Gemma 3 text folder (`python -m ch05.llama` runs
them), which gets its own chat template and stops at its end-of-turn token (`ch07.cli`'s chat layer).
Loading and streaming are shared with the other chapters' apps (`llmfs.apps`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr
import torch.nn as nn

from ch02.tokenizer import get_gpt2_tokenizer
from ch05.gpt_generate import load_model_for_generation
from ch07.cli import family_folder, load_family_chat_model
from ch07.gpt_instruction_finetuning import (
    END_OF_TEXT_ID,
    extract_response,
    format_input,
    load_finetuned_model,
)
from llmfs.apps import (
    EMPTY_INPUT_MESSAGE,
    app_parser,
    load_app_model,
    newest_file,
    on_model_thread,
    page,
    serve_app,
    stream_text,
)
from llmfs.chat import GenerationOptions
from llmfs.cli import non_negative_int
from llmfs.errors import InvalidInput
from llmfs.int8 import add_int8_argument

OUTPUT_DIR = "outputs/ch07"  # the fine-tuning CLI's --output-dir default; it writes <model>-sft.pth there
HINT = ("Fine-tune one with `python -m ch07.gpt_instruction_finetuning` (`--quick` trains a small one offline "
        "in about a minute); `--model` takes the `*-sft.pth` it writes, GPT-2 weights or chapter 5's files.")
MAX_NEW_TOKENS = 256  # as the chapter's generate_response


def default_model() -> str:
    """What `python -m ch07.gpt_instruction_finetuning` wrote last."""
    return str(newest_file(OUTPUT_DIR, ("*-sft.pth",)) or f"{OUTPUT_DIR}/gpt2-medium-sft.pth")


def load_chat_model(spec: str, device) -> tuple[nn.Module, dict]:
    """A fine-tuned model (with its metadata: the prompt style) or any model chapter 5 can load."""
    if Path(spec).with_suffix(".json").is_file():
        return load_finetuned_model(spec, device)
    model, description = load_model_for_generation(spec, device)
    return model, {"source": description}


def load_family_model(spec: str, device) -> tuple[nn.Module, object]:
    """New: a Llama / Qwen3 / Gemma 3 folder as the chat layer serves it (its `ChatModel` is the info)."""
    chat = load_family_chat_model(spec, device=device)
    return chat.model, chat


def family_answers(chat, instruction: str, max_new_tokens: int):
    """New: the answer so far, once per token: the family's template around the message, greedy
    (as `python -m ch05.llama --chat` answers it)."""
    options = GenerationOptions(temperature=0.0, top_k=None, top_p=None, max_new_tokens=max_new_tokens)
    text = ""
    prompt_ids = chat.encode(chat.chat_prompt([{"role": "user", "content": instruction}]))
    for piece in on_model_thread(chat.generation(prompt_ids, options)):  # llmfs.apps: one thread for the model
        text += piece
        yield text


def refused(app, instruction: str, history: list[dict]) -> tuple | None:
    """What the page shows instead of an answer (conversation, text box, message): the model's load error,
    or the empty-message hint; None when the instruction gets an answer."""
    if app.error:
        return history, instruction, app.error
    if not instruction.strip():
        return history, "", EMPTY_INPUT_MESSAGE
    return None


def build_demo(model_spec: str, device="cpu", max_new_tokens: int = MAX_NEW_TOKENS, int8: bool | str = False) -> gr.Blocks:
    """The page: the conversation, a text box and a send button (`int8`: llmfs.int8)."""
    if family_folder(model_spec) is not None:  # New: another family's folder, through the chat layer
        return build_family_demo(model_spec, device, max_new_tokens, int8=int8)
    app = load_app_model(load_chat_model, model_spec, device, HINT, int8=int8)
    tokenizer = get_gpt2_tokenizer()
    style = (app.info or {}).get("style", "alpaca")

    def respond(instruction: str, history: list[dict]):
        """Yield (conversation, text box, message) once per new token."""
        if (refusal := refused(app, instruction, history)) is not None:
            yield refusal
            return
        input_text = format_input({"instruction": instruction, "input": ""}, style)
        history = [*history, {"role": "user", "content": instruction}, {"role": "assistant", "content": ""}]
        for text in stream_text(app.model, tokenizer, input_text, max_new_tokens, eos_id=END_OF_TEXT_ID):
            history[-1]["content"] = extract_response(text, input_text, style)
            yield history, "", ""
        yield history, "", ""  # also when the model's first token already ends the answer

    with page("Chapter 7: chat") as demo:
        source = "none (see the message below)" if app.error else f"`{model_spec}`, {style} prompts"
        gr.Markdown(f"## Chapter 7: chat with the instruction-tuned model\nModel: {source}")
        chat = gr.Chatbot(label="Conversation", render_markdown=False, buttons=["copy", "copy_all"],
                          elem_id="chat")
        message = gr.Markdown(app.error or app.note, elem_id="message")
        with gr.Row():
            box = gr.Textbox(placeholder="Give an instruction, e.g. Rewrite the sentence using a simile.",
                             show_label=False, scale=4, elem_id="prompt")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        gr.on([send.click, box.submit], respond, [box, chat], [chat, box, message])
    return demo


def build_family_demo(model_spec: str, device="cpu", max_new_tokens: int = MAX_NEW_TOKENS,
                      int8: bool | str = False) -> gr.Blocks:
    """New: the same page for a Llama 3.x, Qwen3 or Gemma 3 folder, which answers in its chat template."""
    app = load_app_model(load_family_model, model_spec, device, HINT, int8=int8)

    def respond(instruction: str, history: list[dict]):
        if (refusal := refused(app, instruction, history)) is not None:
            yield refusal
            return
        history = [*history, {"role": "user", "content": instruction}, {"role": "assistant", "content": ""}]
        try:
            for text in family_answers(app.info, instruction, max_new_tokens):
                history[-1]["content"] = text
                yield history, "", ""
        except InvalidInput as exc:  # a message longer than the model's context
            yield history[:-2], instruction, f"**{exc}**"
            return
        yield history, "", ""

    with page("Chapter 7: chat") as demo:
        source = ("none (see the message below)" if app.error
                  else f"`{model_spec}`, {app.info.family} chat template ({app.info.style})")
        gr.Markdown(f"## Chapter 7: chat with the instruction-tuned model\nModel: {source}")
        chat = gr.Chatbot(label="Conversation", render_markdown=False, buttons=["copy", "copy_all"],
                          elem_id="chat")
        message = gr.Markdown(app.error or app.note, elem_id="message")
        with gr.Row():
            box = gr.Textbox(placeholder="Send a message, e.g. Why is the sky blue?", show_label=False, scale=4,
                             elem_id="prompt")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        gr.on([send.click, box.submit], respond, [box, chat], [chat, box, message])
    return demo


def main(argv: list[str] | None = None) -> int:
    """`python -m ch07.ui [options]`; returns the exit code."""
    p = app_parser("python -m ch07.ui", "Chapter 7's instruction-tuned model in the browser.", default_model(),
                   "*-sft.pth from ch07.gpt_instruction_finetuning (with its .json beside it), a GPT-2 name "
                   "or folder, chapter 5's model.pth / checkpoint.pth, or a Llama 3.x / Qwen3 / Gemma 3 "
                   "Hugging Face folder")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=MAX_NEW_TOKENS,
                   help=f"answer length cap in tokens (default {MAX_NEW_TOKENS}, as the chapter's generate_response)")
    add_int8_argument(p, dynamic=True)
    args = p.parse_args(argv)
    return serve_app(args, lambda device: build_demo(args.model, device, args.max_new_tokens, int8=args.int8))


if __name__ == "__main__":
    sys.exit(main())
