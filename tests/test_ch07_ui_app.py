"""Tests for ch07/ui/app.py, driven in a headless Chromium: an instruction typed in the page gets, token
by token, the answer chapter 7's `generate_response` gives (Alpaca prompt, greedy, stop at
<|endoftext|>); an empty instruction and a file that is not a chat model get a message. A tiny
random model saved with `save_finetuned_model` stands in for a fine-tuned one.
"""

import os

import pytest
import torch

import webapp
from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch06.gpt_class_finetune import build_classifier, save_classifier
from ch07.gpt_instruction_finetuning import generate_response, load_finetuned_model, save_finetuned_model
from ch07.ui import app as ch07_app
from llmfs.apps import EMPTY_INPUT_MESSAGE

# Gradio's queue calls a pandas option that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

TINY = {**GPT_CONFIG_124M, "context_length": 128, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0}
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(123)
    return save_finetuned_model(GPTModel(TINY), tmp_path_factory.mktemp("ch07") / "quick-sft.pth", style="alpaca")


def test_default_model_is_the_newest_fine_tuned_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ch07_app.default_model() == "outputs/ch07/gpt2-medium-sft.pth"
    out = tmp_path / "outputs" / "ch07"
    out.mkdir(parents=True)
    for name, when in (("gpt2-medium-sft.pth", 1), ("quick-sft.pth", 2)):
        (out / name).write_bytes(b"")
        os.utime(out / name, (when, when))
    assert ch07_app.default_model() == "outputs/ch07/quick-sft.pth"


def test_command_line_sets_the_answer_length(model_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        ch07_app.main(["--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m ch07.ui ")
    with pytest.raises(SystemExit) as exc:
        ch07_app.main(["--max-new-tokens", "-1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err == "error: argument --max-new-tokens: must be a whole number >= 0, got -1 (see --help)\n"
    built = []
    monkeypatch.setattr(ch07_app, "build_demo", lambda *args, int8=False: built.append((*args, int8)))
    monkeypatch.setattr(ch07_app, "serve_app", lambda args, build: build("cpu") or 0)
    assert ch07_app.main(["--model", str(model_path), "--max-new-tokens", "7"]) == 0
    assert ch07_app.main(["--model", str(model_path), "--int8"]) == 0
    assert ch07_app.main(["--model", str(model_path), "--int8", "dynamic"]) == 0
    assert built == [(str(model_path), "cpu", 7, False), (str(model_path), "cpu", ch07_app.MAX_NEW_TOKENS, "weights"),
                     (str(model_path), "cpu", ch07_app.MAX_NEW_TOKENS, "dynamic")]


@webapp.requires_chromium
def test_chat_streams_generate_responses_answer(model_path):
    model, _ = load_finetuned_model(model_path)
    instruction = "Rewrite the sentence using a simile."
    expected = generate_response(model, {"instruction": instruction, "input": ""}, get_gpt2_tokenizer(), "cpu",
                                 max_new_tokens=MAX_NEW_TOKENS)
    assert expected  # the random model does not stop at once: there is an answer to compare
    demo = ch07_app.build_demo(str(model_path), max_new_tokens=MAX_NEW_TOKENS)
    with webapp.slowed_generation(), webapp.app_page(demo) as page:
        assert "alpaca prompts" in page.inner_text("body")
        page.fill("#prompt textarea", instruction)
        answer = "#chat .bot .message-content"  # the assistant's bubble
        webapp.record_changes(page, answer, prop="textContent")
        page.click("#send")
        webapp.wait_for_text(page, answer, expected, prop="textContent")
        seen = webapp.recorded(page)
        assert instruction in page.inner_text("#chat")
        assert page.input_value("#prompt textarea") == ""  # the box is cleared for the next message
        webapp.screenshot(page, "ch07-app")
    assert len(seen) >= 5, f"the answer arrived in {len(seen)} step(s), not token by token"
    assert all(expected.startswith(text) for text in seen)


@webapp.requires_chromium
def test_chat_says_what_is_wrong(model_path, tmp_path):
    classifier = save_classifier(build_classifier({**TINY, "context_length": 8}), tmp_path / "review_classifier.pth")
    with webapp.chromium() as browser:
        with webapp.app_page(ch07_app.build_demo(str(model_path)), browser) as page:
            page.click("#send")
            assert webapp.message_text(page) == EMPTY_INPUT_MESSAGE
        with webapp.app_page(ch07_app.build_demo(str(classifier)), browser) as page:
            text = webapp.message_text(page)  # a spam classifier's head has 2 outputs, not 50,257
            assert text.startswith(f"Could not load {classifier}") and "ch07.gpt_instruction_finetuning" in text
