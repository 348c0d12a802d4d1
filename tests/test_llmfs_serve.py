"""ch07.serve against the official `ollama` client and plain HTTP, with tiny random models saved in tmp.

Every answer is checked against ch05.gpt_generate.generate for the same prompt, seed and
settings; the servers run with uvicorn in a thread on a free port of 127.0.0.1 (the command
line, and ch07.ollama_evaluate against it, run as subprocesses).
"""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import httpx
import ollama
import pytest
import torch
import torch.nn.functional as F
import uvicorn

from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPTModel
from ch05.gpt_generate import generate, load_model_for_generation
from ch07.cli import load_chat_model, serve_main
from ch07.gpt_instruction_finetuning import (
    END_OF_TEXT_ID,
    format_input,
    load_finetuned_model,
    save_finetuned_model,
)
from llmfs.chat import GenerationOptions
from llmfs.checkpoint import save_model
from llmfs.onednn_linear import onednn_linear_supported
from llmfs.serve import DEFAULT_MAX_BATCH_SIZE, DEFAULT_REQUEST_TIMEOUT, bind_socket, create_app, model_thread

REPO = Path(__file__).resolve().parents[1]
BASE_CFG = {"vocab_size": 50257, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
            "drop_rate": 0.0, "qkv_bias": False}
SFT_CFG = {**BASE_CFG, "context_length": 256}  # room for ollama_evaluate's judge prompts
TOKENIZER = get_gpt2_tokenizer()
PROMPT = "Every effort moves you"


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def base_path(tmp_path_factory) -> Path:
    """A chapter-5 style model.pth with its config.json."""
    folder = tmp_path_factory.mktemp("ch05")
    torch.manual_seed(123)
    save_model(GPTModel(BASE_CFG), folder / "model.pth")
    (folder / "config.json").write_text(json.dumps(BASE_CFG))
    return folder / "model.pth"


@pytest.fixture(scope="module")
def sft_path(tmp_path_factory) -> Path:
    """A chapter-7 instruction-tuned model as save_finetuned_model writes it."""
    torch.manual_seed(123)
    return save_finetuned_model(GPTModel(SFT_CFG), tmp_path_factory.mktemp("ch07") / "tiny-sft.pth", style="alpaca")


@contextmanager
def serving(path, step_delay=0.0, max_num_predict=None, request_timeout=DEFAULT_REQUEST_TIMEOUT,
            max_batch_size=DEFAULT_MAX_BATCH_SIZE, executor=None, **defaults):
    """uvicorn in a thread on a free port; yields (base URL, app). `defaults`: GenerationOptions' fields
    (none: the server's); `step_delay`: seconds each forward pass (or batched step) sleeps first (a slow model);
    `executor`: a `model_thread` that loads the model (as the command does) and runs it."""
    if executor is not None:
        chat = executor.submit(load_chat_model, path, device="cpu").result()
    else:
        chat = load_chat_model(path, device="cpu")
    if step_delay:
        chat.model.register_forward_pre_hook(lambda module, args: time.sleep(step_delay))
    app = create_app(chat, GenerationOptions(**defaults) if defaults else None, max_num_predict=max_num_predict,
                     request_timeout=request_timeout, max_batch_size=max_batch_size, executor=executor)
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def base_server(base_path):
    with serving(base_path) as served:
        yield served


@pytest.fixture(scope="module")
def sft_server(sft_path):
    with serving(sft_path, max_new_tokens=12) as served:
        yield served


@pytest.fixture(scope="module")
def slow_server(base_path):
    """The base model at 0.2 s a token: a full answer (the ceiling, 32 tokens) takes 6 seconds."""
    with serving(base_path, step_delay=0.2) as served:
        yield served


@pytest.fixture
def server_log():
    """What the server logs at warning level and above: a malformed request must leave no traceback there."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "asyncio")]  # uvicorn's errors, asyncio's
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def reference(base_path):
    """An independent copy of the base model, for ch05's generate."""
    return load_model_for_generation(base_path)[0]


def expected_text(model, prompt_ids, num_predict, temperature=0.0, top_k=None, top_p=None, seed=123) -> str:
    """What ch05.gpt_generate.generate writes after the prompt, up to (not including) <|endoftext|>."""
    out = generate(model, torch.tensor([prompt_ids]), num_predict, model.cfg["context_length"],
                   temperature=temperature, top_k=top_k, top_p=top_p, use_cache=True,
                   generator=torch.Generator().manual_seed(seed))[0, len(prompt_ids):].tolist()
    return TOKENIZER.decode(out[:out.index(END_OF_TEXT_ID)] if END_OF_TEXT_ID in out else out)


def ollama_options(num_predict, temperature=0.0, top_k=None, top_p=None, seed=123, **extra) -> dict:
    return {"num_predict": num_predict, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0,
            "seed": seed, **extra}


SAMPLINGS = [dict(temperature=0.0), dict(temperature=1.0, top_k=50, seed=7), dict(temperature=0.8, top_p=0.9, seed=3)]


@pytest.mark.parametrize("max_batch_size", [1, DEFAULT_MAX_BATCH_SIZE])
def test_the_model_runs_on_the_thread_that_loaded_it(base_path, max_batch_size):
    """As `python -m ch07.serve` does: loaded on its model thread, then every step of every request there,
    one at a time or batched (PyTorch's CPU kernels are fastest with one calling thread: llmfs.serve)."""
    executor = model_thread()
    with serving(base_path, max_batch_size=max_batch_size, executor=executor) as (host, app):
        steps = []
        app.state.worker.chat.model.register_forward_pre_hook(lambda module, args: steps.append(threading.get_ident()))
        for prompt in ("Hello", "Every effort moves you"):
            assert httpx.post(f"{host}/api/generate", json={"model": app.state.worker.chat.name, "prompt": prompt,
                              "stream": False, "options": {"num_predict": 3}}, timeout=60).status_code == 200
        assert app.state.worker.executor is executor
        assert len(steps) == 6 and set(steps) == {executor.submit(threading.get_ident).result()}
        assert threading.get_ident() not in steps


def test_the_command_loads_the_model_on_its_model_thread(capsys):
    """`llmfs.serve.main` calls the chapter's loader on the thread that will run the model, and a loader's
    user error is still one line."""
    from llmfs.errors import UserError
    from llmfs.serve import main as serve_command

    seen = []

    def loader(spec, **kwargs):
        seen.append(threading.current_thread())
        raise UserError(f"no model at {spec}")

    assert serve_command(loader, ["--model", "nowhere.pth", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: no model at nowhere.pth"
    assert len(seen) == 1 and seen[0] is not threading.main_thread() and seen[0].name.startswith("model")


@pytest.mark.skipif(not onednn_linear_supported(), reason="oneDNN linear layers need an x86 CPU with PyTorch's oneDNN op")
def test_onednn_routes_the_model_threads_linear_layers_only(base_path):
    """`--onednn` (model_thread(onednn=True)): every float32 linear layer the model thread computes goes to
    oneDNN, batched steps included, and the answers are those of the default path; other threads are untouched."""
    import llmfs.onednn_linear as onednn

    routed, real = [], onednn._product

    def counting(x2d, weight, bias):
        routed.append(threading.get_ident())
        return real(x2d, weight, bias)

    answers = {}
    for use in (False, True):
        executor = model_thread(onednn=use)
        with mock.patch.object(onednn, "_product", counting), \
                serving(base_path, step_delay=0.05, executor=executor) as (host, app):
            name = app.state.worker.chat.name
            with ThreadPoolExecutor(3) as clients:
                answers[use] = list(clients.map(lambda prompt: httpx.post(
                    f"{host}/api/generate", json={"model": name, "prompt": prompt, "stream": False,
                                                  "options": {"num_predict": 6, "temperature": 0}},
                    timeout=60).json()["response"], ["Hello", "Every effort moves you", "I"]))
            thread = executor.submit(threading.get_ident).result()
            assert set(routed) == ({thread} if use else set())
            assert bool(routed) == use and max(app.state.worker.batch_sizes) > 1
            routed.clear()
            assert F.linear(torch.ones(1, 2), torch.ones(3, 2)).shape == (1, 3) and not routed  # not this thread
    assert answers[True] == answers[False]


def test_the_command_refuses_onednn_with_int8(capsys):
    from llmfs.serve import main as serve_command

    loaded = []
    assert serve_command(lambda spec, **kw: loaded.append(spec), ["--model", "m.pth", "--onednn", "--int8"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --int8 and --onednn do not combine")
    assert not loaded


def test_version_list_and_show(base_server):
    host, app = base_server
    client = ollama.Client(host=host)
    name = app.state.worker.chat.name
    assert name == f"{Path(app.state.worker.chat.source).parent.name}-model:latest"
    assert [m.model for m in client.list().models] == [name]
    assert httpx.get(f"{host}/api/version").json()["version"]
    assert httpx.get(host).text == "Ollama is running" and httpx.head(host).status_code == 200
    shown = client.show(name.removesuffix(":latest"))  # a name without a tag means :latest
    assert shown.modelinfo["gpt2.context_length"] == 32 and shown.modelinfo["gpt2.block_count"] == 2
    assert shown.details.family == "gpt2" and shown.template == "{{ .Prompt }}"
    assert "num_predict 32" in shown.parameters  # 128 by default, but no more than the context


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_generate_equals_ch05_generate(base_server, reference, sampling):
    host, app = base_server
    client, name = ollama.Client(host=host), app.state.worker.chat.name
    prompt_ids = TOKENIZER.encode(PROMPT)
    # 4 prompt tokens and 32 new ones with a 32-token context: the window slides.
    want = expected_text(reference, prompt_ids, 32, **sampling)
    reply = client.generate(model=name, prompt=PROMPT, options=ollama_options(32, **sampling))
    assert reply.response == want
    assert reply.done and reply.done_reason == "length" and reply.eval_count == 32
    assert reply.prompt_eval_count == len(prompt_ids)
    assert reply.total_duration >= reply.eval_duration > 0 and reply.prompt_eval_duration > 0
    assert reply.load_duration >= 0
    chunks = list(client.generate(model=name, prompt=PROMPT, options=ollama_options(32, **sampling), stream=True))
    assert "".join(c.response for c in chunks) == want
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(chunks) > 10  # token by token, not in one piece
    final = chunks[-1]
    assert final.done_reason == "length" and final.eval_count == 32 and final.prompt_eval_count == len(prompt_ids)
    assert final.total_duration >= final.prompt_eval_duration + final.eval_duration


def test_chat_with_base_model_continues_the_text(base_server, reference):
    host, app = base_server
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "there"}]
    reply = ollama.Client(host=host).chat(model=app.state.worker.chat.name, messages=messages,
                                          options=ollama_options(10))
    assert reply.message.role == "assistant"
    assert reply.message.content == expected_text(reference, TOKENIZER.encode("Hello\n\nthere"), 10)


def test_stop_strings_cut_the_answer(base_server, reference):
    host, app = base_server
    client, name = ollama.Client(host=host), app.state.worker.chat.name
    full = expected_text(reference, TOKENIZER.encode(PROMPT), 30)
    stop = full[12:15]  # three characters from the middle of the answer
    cut = full[:full.index(stop)]
    reply = client.generate(model=name, prompt=PROMPT, options=ollama_options(30, stop=[stop, "never§"]))
    assert reply.response == cut and reply.done_reason == "stop" and reply.eval_count < 30
    streamed = list(client.generate(model=name, prompt=PROMPT, options=ollama_options(30, stop=[stop]), stream=True))
    assert "".join(c.response for c in streamed) == cut and streamed[-1].done_reason == "stop"


def test_instruction_model_gets_the_alpaca_prompt(sft_path, sft_server):
    host, app = sft_server
    client, name = ollama.Client(host=host), "tiny-sft"
    model = load_finetuned_model(sft_path)[0]
    entry = {"instruction": "Name a color.", "input": ""}
    prompt_ids = TOKENIZER.encode(format_input(entry) + "\n\n### Response:\n")
    want = expected_text(model, prompt_ids, 12)  # the server's --max-new-tokens is 12
    reply = client.chat(model=name, messages=[{"role": "user", "content": "Name a color."}],
                        options={"temperature": 0})
    assert reply.message.content == want and reply.prompt_eval_count == len(prompt_ids)
    streamed = client.chat(model=name, messages=[{"role": "user", "content": "Name a color."}], stream=True,
                           options={"temperature": 0})
    assert "".join(c.message.content for c in streamed) == want
    assert client.generate(model=name, prompt="Name a color.", options={"temperature": 0}).response == want
    raw = client.generate(model=name, prompt=PROMPT, raw=True, options={"temperature": 0})
    assert raw.response == expected_text(model, TOKENIZER.encode(PROMPT), 12)
    assert "### Instruction:\n{{ .Prompt }}" in client.show(name).template


def test_bad_requests_get_ollama_errors(base_server, reference, server_log):
    host, app = base_server
    name = app.state.worker.chat.name
    long_prompt = " ".join(["word"] * 40)  # 40 tokens > context 32

    def post(path, payload, status):
        body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        reply = httpx.post(f"{host}{path}", content=body, headers={"Content-Type": "application/json"})
        assert reply.status_code == status, reply.text
        return reply.json()

    assert "invalid JSON" in post("/api/generate", b'{"model": "x", "prompt": ', 400)["error"]
    assert "JSON object" in post("/api/chat", "[1, 2]", 400)["error"]
    assert post("/api/generate", {"prompt": "hi"}, 400)["error"] == "model is required"
    assert "not found" in post("/api/generate", {"model": "llama3", "prompt": "hi"}, 404)["error"]
    assert "not found" in post("/api/show", {"model": "llama3"}, 404)["error"]
    error = post("/api/generate", {"model": name, "prompt": long_prompt, "stream": False}, 400)["error"]
    assert "40 tokens" in error and "context of 32" in error and "truncate" in error
    error = post("/api/chat", {"model": name, "messages": [{"role": "user", "content": long_prompt}]}, 400)["error"]
    assert "context of 32" in error
    for options, word in [({"num_predict": -3}, "num_predict"), ({"temperature": -0.5}, "temperature"),
                          ({"top_p": 0}, "top_p"), ({"temperature": "hot"}, "temperature"),
                          ({"mirostat": 2}, "mirostat"), ({"stop": [""]}, "stop")]:
        assert word in post("/api/generate", {"model": name, "prompt": "hi", "options": options}, 400)["error"]
    assert "role" in post("/api/chat", {"model": name, "messages": [{"role": "tool", "content": "x"}]}, 400)["error"]
    assert "format" in post("/api/generate", {"model": name, "prompt": "hi", "format": "json"}, 400)["error"]
    assert httpx.get(f"{host}/api/nothing").json() == {"error": "not found"}
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=host).generate(model="llama3", prompt="hi")
    assert info.value.status_code == 404 and "llama3" in info.value.error
    # Truncation on request keeps the last 32 tokens, top-level or as an option.
    want = expected_text(reference, TOKENIZER.encode(long_prompt)[-32:], 5)
    for extra in ({"truncate": True}, {"options": {"truncate": True, "num_predict": 5, "temperature": 0}}):
        payload = {"model": name, "prompt": long_prompt, "stream": False,
                   "options": {"num_predict": 5, "temperature": 0}, **extra}
        reply = post("/api/generate", payload, 200)
        assert reply["response"] == want and reply["prompt_eval_count"] == 32
    # An empty prompt loads the model, as in Ollama.
    assert post("/api/generate", {"model": name}, 200)["done_reason"] == "load"
    assert server_log == []


def _wait_for_generations(worker, requests: int, deadline_s: float = 10) -> None:
    """Until the worker has finished `requests` generations and holds the model no more."""
    deadline = time.monotonic() + deadline_s
    while worker.stats["requests"] < requests or worker.lock.locked():
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.02)


def test_client_disconnect_stops_streaming_generation(slow_server, reference, server_log):
    host, app = slow_server
    worker = app.state.worker
    before = dict(worker.stats)
    payload = {"model": worker.chat.name, "prompt": PROMPT, "options": {"num_predict": -1, "temperature": 0}}
    with httpx.stream("POST", f"{host}/api/generate", json=payload) as reply:
        lines = reply.iter_lines()
        first = [json.loads(next(lines)) for _ in range(3)]
    assert not any(c["done"] for c in first)
    _wait_for_generations(worker, before["requests"] + 1, deadline_s=4)  # 32 tokens would take 6 s
    assert worker.stats["stopped_early"] == before["stopped_early"] + 1
    assert worker.stats["tokens"] - before["tokens"] < 32
    # The model (and its cache) is fine for the next client.
    reply = ollama.Client(host=host).generate(model=worker.chat.name, prompt=PROMPT, options=ollama_options(3))
    assert reply.response == expected_text(reference, TOKENIZER.encode(PROMPT), 3)
    assert server_log == [], [r.getMessage() for r in server_log]


def test_client_that_gives_up_on_a_whole_reply_frees_the_model(slow_server, reference, server_log):
    """"stream": false: the client waits for one reply and gives up (its timeout); the server stops that
    generation at once instead of finishing 32 tokens (6 s) that no one will read."""
    host, app = slow_server
    worker = app.state.worker
    before = dict(worker.stats)
    payload = {"model": worker.chat.name, "prompt": PROMPT, "stream": False,
               "options": {"num_predict": -1, "temperature": 0}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{host}/api/generate", json=payload, timeout=0.6)
    start = time.monotonic()
    reply = httpx.post(f"{host}/api/generate", timeout=10,
                       json={**payload, "options": {"num_predict": 2, "temperature": 0}})
    waited = time.monotonic() - start
    assert reply.status_code == 200 and reply.json()["response"] == expected_text(reference, TOKENIZER.encode(PROMPT), 2)
    assert waited < 3, f"the next request waited {waited:.1f} s: the abandoned one kept the model"
    assert worker.stats["requests"] == before["requests"] + 2
    assert worker.stats["stopped_early"] == before["stopped_early"] + 1
    assert worker.stats["tokens"] - before["tokens"] < 32 + 2
    assert server_log == [], [r.getMessage() for r in server_log]


def test_a_request_over_the_time_limit_is_stopped_with_an_error(base_path, reference, server_log):
    """--request-timeout 0.5 at 0.1 s a token: an answer of 32 tokens is stopped after about 5 of them."""
    with serving(base_path, step_delay=0.1, request_timeout=0.5) as (host, app):
        worker, client = app.state.worker, ollama.Client(host=host)
        name, options = worker.chat.name, ollama_options(-1)
        start = time.monotonic()
        reply = httpx.post(f"{host}/api/generate", json={"model": name, "prompt": PROMPT, "stream": False,
                                                         "options": options}, timeout=10)
        assert reply.status_code == 503 and "limit of 0.5 s per request" in reply.json()["error"]
        assert "--request-timeout" in reply.json()["error"]
        assert time.monotonic() - start < 2.5  # not the 3.2 s of the whole answer
        # Streamed: the text so far, then Ollama's error line, which the official client raises.
        pieces = []
        with pytest.raises(ollama.ResponseError, match="limit of 0.5 s") as info:
            for part in client.chat(model=name, messages=[{"role": "user", "content": PROMPT}], stream=True,
                                    options=options):
                pieces.append(part)
        assert pieces and not any(p.done for p in pieces) and info.value.status_code == -1  # in the stream
        with pytest.raises(ollama.ResponseError) as info:
            client.generate(model=name, prompt=PROMPT, options=options)
        assert info.value.status_code == 503
        assert worker.stats["timed_out"] == 3 and not worker.lock.locked()
        # A request within the limit is answered as usual.
        reply = client.generate(model=name, prompt=PROMPT, options=ollama_options(2))
        assert reply.response == expected_text(reference, TOKENIZER.encode(PROMPT), 2)
    assert server_log == []


def test_num_predict_ceiling_and_ollamas_negative_values(base_server, reference, server_log):
    """The ceiling is the context (32 tokens); -1 means up to it, -2 until prompt and answer fill the context."""
    host, app = base_server
    client, name = ollama.Client(host=host), app.state.worker.chat.name
    prompt_ids = TOKENIZER.encode(PROMPT)
    reply = client.generate(model=name, prompt=PROMPT, options=ollama_options(-1))
    assert reply.eval_count == 32 and reply.response == expected_text(reference, prompt_ids, 32)
    reply = client.generate(model=name, prompt=PROMPT, options=ollama_options(-2))
    assert reply.eval_count == 32 - len(prompt_ids) and reply.done_reason == "length"
    assert reply.response == expected_text(reference, prompt_ids, 32 - len(prompt_ids))
    full = client.generate(model=name, prompt=" ".join(["word"] * 40), options=ollama_options(-2, truncate=True))
    assert full.prompt_eval_count == 32 and full.eval_count == 0 and full.response == ""  # no room left
    for num_predict in (33, 10**9):
        with pytest.raises(ollama.ResponseError, match="ceiling of 32 tokens") as info:
            client.generate(model=name, prompt=PROMPT, options=ollama_options(num_predict))
        assert info.value.status_code == 400
    with pytest.raises(ollama.ResponseError, match=r"-1 \(as many as allowed\) or -2"):
        client.generate(model=name, prompt=PROMPT, options=ollama_options(-3))
    assert server_log == []


def test_a_smaller_ceiling(base_path, reference):
    with serving(base_path, max_num_predict=5) as (host, app):
        client, name = ollama.Client(host=host), app.state.worker.chat.name
        assert "num_predict 5" in client.show(name).parameters  # the default answer length follows it down
        assert client.generate(model=name, prompt=PROMPT, options={"temperature": 0}).eval_count == 5
        assert client.generate(model=name, prompt=PROMPT, options=ollama_options(-1)).eval_count == 5
        with pytest.raises(ollama.ResponseError, match="ceiling of 5 tokens"):
            client.generate(model=name, prompt=PROMPT, options=ollama_options(6))


def test_limits_the_model_cannot_have_are_refused(base_path):
    chat = load_chat_model(base_path, device="cpu")
    with pytest.raises(ValueError, match="--max-num-predict must be from 1 to the model's context length of 32"):
        create_app(chat, max_num_predict=33)
    with pytest.raises(ValueError, match="--max-new-tokens 20 is more than the ceiling of 16 tokens"):
        create_app(chat, GenerationOptions(max_new_tokens=20), max_num_predict=16)


DEEP = 100_000  # levels of nesting: more than Python's recursion limit
MALFORMED = [  # (path, body, a word of the error)
    ("/api/generate", b'{"model": "M", "prompt": "hi", "options": {"temperature": NaN}}', "NaN"),
    ("/api/generate", b'{"model": "M", "prompt": "hi", "keep_alive": Infinity}', "Infinity"),
    ("/api/chat", b'{"model": "M", "messages": [{"role": "user", "content": "x", "n": -Infinity}]}', "-Infinity"),
    ("/api/show", b'{"model": "M", "verbose": NaN}', "NaN"),
    ("/api/generate", b'{"model": "M", "prompt": "hi", "options": {"temperature": 1e999}}', "temperature"),
    ("/api/generate", b'{"model": "M", "prompt": "hi", "options": {"top_k": -1e999}}', "top_k"),
    ("/api/generate", b"[" * DEEP + b"]" * DEEP, "nested too deeply"),
    ("/api/chat", b'{"a": ' * DEEP + b"1" + b"}" * DEEP, "nested too deeply"),
    ("/api/generate", b'{"model": "M", "prompt": "hi", "options": {"stop": ' + b"[" * 500 + b"]" * 500 + b"}}", "stop"),
    ("/api/generate", b"\xff\xfe{", "invalid JSON"),
    ("/api/generate", b"[1, 2]", "JSON object"),
    ("/api/chat", b'"hello"', "JSON object"),
    ("/api/show", b"null", "JSON object"),
    ("/api/generate", {"prompt": "hi", "stream": "false"}, "'stream' must be true or false"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "stream": 0}, "'stream'"),
    ("/api/generate", {"prompt": "hi", "raw": "yes"}, "'raw'"),
    ("/api/generate", {"prompt": "hi", "options": []}, "'options' must be a JSON object"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "options": "fast"}, "'options'"),
    ("/api/generate", {"prompt": "hi", "options": {"temperature": "hot"}}, "temperature"),
    ("/api/generate", {"prompt": "hi", "options": {"temperature": -1}}, "temperature"),
    ("/api/generate", {"prompt": "hi", "options": {"temperature": True}}, "temperature"),
    ("/api/generate", {"prompt": "hi", "options": {"top_k": 1.5}}, "top_k"),
    ("/api/generate", {"prompt": "hi", "options": {"top_k": -1}}, "top_k"),
    ("/api/generate", {"prompt": "hi", "options": {"top_p": 0}}, "top_p"),
    ("/api/generate", {"prompt": "hi", "options": {"top_p": 1.5}}, "top_p"),
    ("/api/generate", {"prompt": "hi", "options": {"top_p": 10**400}}, "top_p"),
    ("/api/generate", {"prompt": "hi", "options": {"seed": "x"}}, "seed"),
    ("/api/generate", {"prompt": "hi", "options": {"seed": 2**64}}, "seed"),
    ("/api/generate", {"prompt": "hi", "options": {"num_predict": 10**9}}, "ceiling of 32"),
    ("/api/generate", {"prompt": "hi", "options": {"num_predict": -3}}, "num_predict"),
    ("/api/generate", {"prompt": "hi", "options": {"num_predict": "10"}}, "num_predict"),
    ("/api/generate", {"prompt": "hi", "options": {"stop": 5}}, "stop"),
    ("/api/generate", {"prompt": "hi", "options": {"stop": ["###", 1]}}, "stop"),
    ("/api/generate", {"prompt": "hi", "options": {"stop": ["x"] * 33}}, "stop"),
    ("/api/generate", {"prompt": "hi", "options": {"stop": "x" * 257}}, "stop"),
    ("/api/generate", {"prompt": "hi", "options": {"truncate": "yes"}}, "truncate"),
    ("/api/generate", {"prompt": "hi", "truncate": 1}, "truncate"),
    ("/api/generate", {"prompt": "hi", "options": {"num_ctx": "big"}}, "num_ctx"),
    ("/api/generate", {"prompt": "hi", "options": {"num_ctx": 0}}, "num_ctx"),
    ("/api/generate", {"prompt": "hi", "options": {"num_thread": 1.5}}, "num_thread"),
    ("/api/generate", {"prompt": "hi", "options": {"use_mmap": "no"}}, "use_mmap"),
    ("/api/generate", {"prompt": "hi", "options": {"mirostat": 2}}, "mirostat"),
    ("/api/generate", {"prompt": 5}, "'prompt' must be a string"),
    ("/api/generate", {"prompt": ["hi"]}, "'prompt'"),
    ("/api/generate", {"prompt": "hi", "system": {"role": "system"}}, "'system'"),
    ("/api/generate", {"prompt": "hi", "think": 5}, "'think'"),
    ("/api/generate", {"prompt": "hi", "keep_alive": [5]}, "'keep_alive'"),
    ("/api/chat", {"messages": "hi"}, "'messages' must be a list"),
    ("/api/chat", {"messages": {"role": "user", "content": "hi"}}, "'messages'"),
    ("/api/chat", {"messages": [5]}, "message 0"),
    ("/api/chat", {"messages": [{"role": "user", "content": 5}]}, "message 0"),
    ("/api/chat", {"messages": [{"role": 5, "content": "hi"}]}, "message 0"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "images"),
    ("/api/generate", {"model": 5, "prompt": "hi"}, "'model' must be a string"),
    ("/api/chat", {"model": ["M"], "messages": []}, "'model'"),
    ("/api/show", {"model": {"name": "M"}}, "'model'"),
    ("/api/show", b'{"name": 5}', "'name'"),
    ("/api/show", {"model": "M", "verbose": "yes"}, "'verbose'"),
]


@pytest.mark.parametrize("path, body, word", MALFORMED, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(MALFORMED)])
def test_malformed_requests_are_400_without_a_traceback(base_server, server_log, path, body, word):
    host, app = base_server
    name = app.state.worker.chat.name
    if isinstance(body, dict):  # every field right but one: the model is the server's unless the test is about it
        body = json.dumps({"model": name, **body}).encode()
    reply = httpx.post(f"{host}{path}", content=body.replace(b'"M"', json.dumps(name).encode()),
                       headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert word in reply.json()["error"] and len(reply.json()["error"]) < 400
    assert server_log == [], [r.getMessage() for r in server_log]
    assert not app.state.worker.lock.locked()


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_load_concurrent_streams_and_flat_memory(base_server, reference):
    host, app = base_server
    name = app.state.worker.chat.name
    prompt_ids = TOKENIZER.encode(PROMPT)
    # Sampling with a different seed per request: answers served interleaved with another would differ.
    wanted = {seed: expected_text(reference, prompt_ids, 10, temperature=1.0, top_k=50, seed=seed)
              for seed in range(16)}
    results, errors = {}, []

    def stream(seed):
        try:
            parts = ollama.Client(host=host).generate(
                model=name, prompt=PROMPT, stream=True, options=ollama_options(10, temperature=1.0, top_k=50, seed=seed))
            results[seed] = "".join(p.response for p in parts)
        except Exception as exc:  # collected: an assertion in a thread would be lost
            errors.append(repr(exc))

    threads = [threading.Thread(target=stream, args=(seed,)) for seed in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and results == wanted

    if not Path("/proc/self/statm").is_file():
        pytest.skip("RSS is read from /proc (Linux)")
    payload = {"model": name, "prompt": PROMPT, "stream": False, "options": ollama_options(2)}
    want = expected_text(reference, prompt_ids, 2)
    with httpx.Client(base_url=host) as client:
        rss = []
        for i in range(220):
            assert client.post("/api/generate", json=payload).json()["response"] == want
            if i in (19, 219):  # after a warm-up, and after 200 more
                rss.append(_rss_bytes())
    assert rss[1] - rss[0] < 16 * 2**20, f"RSS grew by {(rss[1] - rss[0]) / 2**20:.1f} MiB over 200 requests"


# --- the command line, and chapter 7's judge script against it ------------------------------------

def test_cli_errors_before_serving(tmp_path, capsys, monkeypatch):
    assert serve_main(["--model", str(tmp_path / "missing.pth"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing.pth" in err
    import ch07.cli

    monkeypatch.setattr(ch07.cli, "load_chat_model", lambda *a, **k: pytest.fail("loaded before the port check"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert serve_main(["--model", str(tmp_path), "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot listen on 127.0.0.1:") and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--port", "65536"], "argument --port: must be a whole number from 0 to 65535, got 65536"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be a whole number >= 0, got -1"),
    (["--max-num-predict", "0"], "argument --max-num-predict: must be a whole number >= 1, got 0"),
    (["--request-timeout", "0"], "argument --request-timeout: must be a finite number > 0, got 0"),
    (["--request-timeout", "inf"], "argument --request-timeout: must be a finite number > 0, got inf"),
    (["--num-predict", "5"], "unrecognized arguments: --num-predict 5"),  # Ollama's name is for requests only
    (["--device", "tpu"], "argument --device: "),
    (["--prompt-style", "chatml"], "argument --prompt-style: invalid choice: 'chatml'"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        serve_main(["--model", "gpt2", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        serve_main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m ch07.serve ")


@pytest.mark.parametrize("argv, message", [
    (["--max-num-predict", "33"], "--max-num-predict must be from 1 to the model's context length of 32 tokens"),
    (["--max-new-tokens", "40"], "--max-new-tokens 40 is more than the ceiling of 32 tokens per answer"),
    (["--max-num-predict", "8", "--max-new-tokens", "9"], "--max-new-tokens 9 is more than the ceiling of 8"),
])
def test_limits_are_checked_against_the_model_at_start_up(base_path, argv, message, capsys):
    assert serve_main(["--model", str(base_path), "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_command_line_answer_length_is_the_requests_default(base_path, reference):
    """`python -m ch07.serve --max-new-tokens 7 --max-num-predict 20`: a request without num_predict gets 7
    tokens; one with it, its own, up to 20."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMFS_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "ch07.serve", "--model", str(base_path), "--port", "0",
                             "--max-new-tokens", "7", "--max-num-predict", "20", "--request-timeout", "60"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not (lines and "OLLAMA_HOST=" in lines[-1]):
            lines.append(proc.stderr.readline())
            assert lines[-1], "the server stopped: " + "".join(lines)
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its log flowing
        assert "answers of at most 7 tokens unless a request sets num_predict (at most 20); 60 s per" in lines[-2]
        assert re.search(r"OLLAMA_HOST=(\S+) \(OpenAI API: base_url http://\1/v1\)$", lines[-1])
        client = ollama.Client(host=re.search(r"OLLAMA_HOST=(\S+)", lines[-1]).group(1))
        name = client.list().models[0].model
        assert "num_predict 7" in client.show(name).parameters
        prompt_ids = TOKENIZER.encode(PROMPT)
        reply = client.generate(model=name, prompt=PROMPT, options={"temperature": 0})
        assert reply.eval_count == 7 and reply.response == expected_text(reference, prompt_ids, 7)
        reply = client.generate(model=name, prompt=PROMPT, options={"temperature": 0, "num_predict": 3})
        assert reply.eval_count == 3
        assert client.generate(model=name, prompt=PROMPT, options=ollama_options(-1)).eval_count == 20
        with pytest.raises(ollama.ResponseError, match="ceiling of 20"):
            client.generate(model=name, prompt=PROMPT, options=ollama_options(21))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ollama_evaluate_runs_against_the_server(sft_server, tmp_path):
    """The chapter's judge script, unchanged, finds the server through OLLAMA_HOST (as any client does).

    (`python -m ch07.serve` itself runs as a subprocess in tests/test_benchmarks_serve.py.)"""
    host, app = sft_server
    before = app.state.worker.stats["requests"]
    address = host.removeprefix("http://")
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps([
        {"instruction": "Name a color.", "input": "", "output": "Blue.", "model_response": "Blue."},
        {"instruction": "Add 2 and 3.", "input": "", "output": "5", "model_response": "6"}]))
    judge = subprocess.run([sys.executable, "-m", "ch07.ollama_evaluate", "--file", str(responses),
                            "--model", "tiny-sft", "--no-progress"], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(REPO), "OLLAMA_HOST": address}, timeout=120)
    assert judge.returncode == 0, judge.stderr
    assert f"at http://{address}; judge: tiny-sft; 2 entries" in judge.stdout
    assert re.search(r"Number of scores: \d of 2", judge.stdout)
    assert "Replies that could not be parsed:" in judge.stdout
    # One chat per entry, and a second, stricter one for each reply without a score.
    assert 2 <= app.state.worker.stats["requests"] - before <= 4
