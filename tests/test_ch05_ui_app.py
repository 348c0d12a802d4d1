"""Tests for ch05/ui/app.py and llmfs/apps.py, the page driven in a headless Chromium: the page loads, the
streamed text equals `generate`'s for the same controls and seed, and the messages for an
empty prompt and a missing model; the command line's errors; Gradio kept offline without touching
the environment. A tiny random model saved to tmp_path stands in for a trained one.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import webapp
from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch05.gpt_generate import generate, load_model_for_generation
from ch05.gpt_train import text_to_token_ids, token_ids_to_text
from ch05.ui import app as ch05_app
from llmfs.apps import EMPTY_INPUT_MESSAGE, MODEL_THREAD, launch, load_app_model, on_model_thread, stream_text
from llmfs.checkpoint import save_model

# Gradio's queue calls a pandas option that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

TINY = {**GPT_CONFIG_124M, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A tiny random model saved the way ch05.gpt_train saves one: model.pth and config.json."""
    folder = tmp_path_factory.mktemp("ch05")
    torch.manual_seed(123)
    save_model(GPTModel(TINY), folder / "model.pth")
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder / "model.pth"


def expected_text(model_path, prompt, max_new_tokens, temperature, top_k, seed) -> str:
    model, _ = load_model_for_generation(model_path)
    out = generate(model, text_to_token_ids(prompt, get_gpt2_tokenizer()), max_new_tokens, TINY["context_length"],
                   temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(seed))
    return token_ids_to_text(out, get_gpt2_tokenizer())


def test_stream_text_ends_with_generates_text(model_path):
    model, _ = load_model_for_generation(model_path)
    texts = list(stream_text(model, get_gpt2_tokenizer(), "Every effort moves you", 40, 1.0, top_k=20, seed=7))
    assert len(texts) == 40  # one text per token; the window slides past the 32-token context
    assert texts[-1] == expected_text(model_path, "Every effort moves you", 40, 1.0, 20, 7)


def test_the_model_loads_and_generates_on_one_thread(model_path):
    """Every torch call of an app's model on MODEL_THREAD, whichever thread the page's handler runs on."""
    import threading

    threads = []
    app = load_app_model(lambda spec, device: (threads.append(threading.get_ident()) or
                                               load_model_for_generation(spec, device)), str(model_path), "cpu", "")
    app.model.register_forward_pre_hook(lambda module, args: threads.append(threading.get_ident()))
    handler = threading.Thread(target=lambda: list(stream_text(app.model, get_gpt2_tokenizer(), "Hi", 3)))
    handler.start()
    handler.join(timeout=60)
    model_thread = MODEL_THREAD.submit(threading.get_ident).result()
    assert len(threads) == 4 and set(threads) == {model_thread} != {handler.ident}
    closed = []

    def items():
        try:
            yield from range(5)
        finally:
            closed.append(threading.get_ident())

    stream = on_model_thread(items())
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()  # a page that stops early: the iterator is closed on the model thread too
    assert closed == [model_thread]


def test_load_app_model_turns_failures_and_warnings_into_page_text(model_path, tmp_path):
    hint = "Train one first."
    missing = load_app_model(load_model_for_generation, str(tmp_path / "model.pth"), "cpu", hint)
    assert missing.model is None and "does not exist" in missing.error and missing.error.endswith(hint)
    (tmp_path / "model.pth").write_bytes(b"not a model")
    broken = load_app_model(load_model_for_generation, str(tmp_path / "model.pth"), "cpu", hint)
    assert broken.model is None and broken.error.startswith(f"**Could not load `{tmp_path / 'model.pth'}`:**")
    weights_only = tmp_path / "weights" / "model.pth"  # no config.json beside it: the head count is guessed
    save_model(GPTModel({**TINY, "emb_dim": 64, "n_heads": 1}), weights_only)
    loaded = load_app_model(load_model_for_generation, str(weights_only), "cpu", hint)
    assert loaded.error is None and not loaded.model.training and "n_heads" in loaded.note
    good = load_app_model(load_model_for_generation, str(model_path), "cpu", hint)
    assert good.error is None and good.note == "" and good.info.endswith("(2 layers, emb_dim 16)")


def test_importing_the_apps_changes_no_environment_variable():
    code = ("import json, os; before = dict(os.environ)\n"
            "import llmfs.apps, ch05.ui.app, ch06.ui.app, ch07.ui.app\n"
            "after = dict(os.environ)\n"
            "print(json.dumps(sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))))")
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_gradio_reports_nothing_and_checks_no_version(model_path, monkeypatch):
    """Gradio's default (no GRADIO_ANALYTICS_ENABLED) is to report; a page built with `page()` does not."""
    import gradio.analytics

    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    calls = []
    for name in ("version_check", "initiated_analytics", "launched_analytics", "_do_analytics_request"):
        monkeypatch.setattr(gradio.analytics, name, lambda *a, name=name, **k: calls.append(name))
    demo = ch05_app.build_demo(str(model_path))
    assert demo.analytics_enabled is False
    with webapp.served(demo):
        pass
    assert calls == []
    with gradio.Blocks() as reporting:  # what `gr.Blocks()` alone would do here
        gradio.Markdown("hi")
    assert "version_check" in calls or "initiated_analytics" in calls
    with pytest.raises(ValueError, match="analytics on"):
        launch(reporting, port=webapp.free_port(), block=False)


def test_default_model_is_what_gpt_train_wrote_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ch05_app.default_model() == "outputs/ch05/model.pth"  # nothing trained yet: the usual name
    out = tmp_path / "outputs" / "ch05"
    out.mkdir(parents=True)
    (out / "model.pth").write_bytes(b"older")
    (out / "checkpoint.pth").write_bytes(b"newer")
    os.utime(out / "model.pth", (1, 1))
    assert ch05_app.default_model() == "outputs/ch05/checkpoint.pth"


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "argument --port: must be a whole number from 1 to 65535, got 70000"),
    (["--port", "0"], "argument --port: must be a whole number from 1 to 65535, got 0"),
    (["--device", "tpu"], "argument --device: "),
    (["--max-new-tokens", "5"], "unrecognized arguments: --max-new-tokens 5"),  # a slider in this page
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        ch05_app.main(["--model", "gpt2", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as exc:
        ch05_app.main(["--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m ch05.ui ")


def test_taken_port_is_a_one_line_error_before_the_model_loads(model_path, capsys, monkeypatch):
    monkeypatch.setattr(ch05_app, "build_demo", lambda *a, **k: pytest.fail("the model loaded before the port check"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert ch05_app.main(["--model", str(model_path), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot listen on 127.0.0.1:") and err.count("\n") == 1


@webapp.requires_chromium
def test_page_streams_the_same_text_as_generate(model_path):
    settings = {"prompt": "Every effort moves you", "max_new_tokens": 30, "temperature": 1.2, "top_k": 20, "seed": 7}
    expected = expected_text(model_path, **settings)
    with webapp.slowed_generation(), webapp.app_page(ch05_app.build_demo(str(model_path))) as page:
        assert "2 layers, emb_dim 16" in page.inner_text("body")
        page.fill("#prompt textarea", settings["prompt"])
        for control in ("max-new-tokens", "temperature", "top-k"):
            page.fill(f"#{control} input[type=number]", str(settings[control.replace("-", "_")]))
            page.press(f"#{control} input[type=number]", "Enter")
        page.fill("#seed input", str(settings["seed"]))
        webapp.record_changes(page, "#output textarea")  # every text the box shows while the answer streams in
        page.click("#generate")
        webapp.wait_for_text(page, "#output textarea", expected)
        seen = webapp.recorded(page)
        webapp.screenshot(page, "ch05-app")
    assert len(seen) >= 5, f"the text arrived in {len(seen)} step(s), not token by token"
    assert all(expected.startswith(text) for text in seen)


@webapp.requires_chromium
def test_page_says_what_is_wrong(model_path, tmp_path):
    with webapp.chromium() as browser:
        with webapp.app_page(ch05_app.build_demo(str(model_path)), browser) as page:
            page.fill("#prompt textarea", "   ")
            page.click("#generate")
            assert webapp.message_text(page) == EMPTY_INPUT_MESSAGE
            assert page.input_value("#output textarea") == ""
        missing = tmp_path / "outputs" / "ch05" / "model.pth"
        with webapp.app_page(ch05_app.build_demo(str(missing)), browser) as page:
            text = webapp.message_text(page)
            assert f"{missing} does not exist" in text and "python -m ch05.gpt_train" in text
            page.click("#generate")  # still the message, and no text
            time.sleep(0.5)
            assert page.input_value("#output textarea") == "" and "does not exist" in webapp.message_text(page)
