"""ch07.serve against the official `ollama` client and plain HTTP, with tiny random models saved in tmp.

Every answer is checked against ch05.gpt_generate.generate for the same prompt, seed and
settings; the servers run with uvicorn in a thread on a free port of 127.0.0.1 (the command
line, and ch07.ollama_evaluate against it, run as subprocesses).
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import ollama
import pytest
import torch
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
from llmfs.serve import bind_socket, create_app

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
def serving(path, **defaults):
    """uvicorn in a thread on a free port; yields (base URL, app). `defaults`: GenerationOptions' fields."""
    app = create_app(load_chat_model(path, device="cpu"), GenerationOptions(**defaults))
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
    assert "num_predict 128" in shown.parameters


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_generate_equals_ch05_generate(base_server, reference, sampling):
    host, app = base_server
    client, name = ollama.Client(host=host), app.state.worker.chat.name
    prompt_ids = TOKENIZER.encode(PROMPT)
    # 40 new tokens with a 32-token context: the window slides.
    want = expected_text(reference, prompt_ids, 40, **sampling)
    reply = client.generate(model=name, prompt=PROMPT, options=ollama_options(40, **sampling))
    assert reply.response == want
    assert reply.done and reply.done_reason == "length" and reply.eval_count == 40
    assert reply.prompt_eval_count == len(prompt_ids)
    assert reply.total_duration >= reply.eval_duration > 0 and reply.prompt_eval_duration > 0
    assert reply.load_duration >= 0
    chunks = list(client.generate(model=name, prompt=PROMPT, options=ollama_options(40, **sampling), stream=True))
    assert "".join(c.response for c in chunks) == want
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(chunks) > 10  # token by token, not in one piece
    final = chunks[-1]
    assert final.done_reason == "length" and final.eval_count == 40 and final.prompt_eval_count == len(prompt_ids)
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


def test_bad_requests_get_ollama_errors(base_server, reference):
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
    for options, word in [({"num_predict": -1}, "num_predict"), ({"temperature": -0.5}, "temperature"),
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


def test_client_disconnect_stops_generation(base_server, reference):
    host, app = base_server
    worker = app.state.worker
    before = dict(worker.stats)
    payload = {"model": worker.chat.name, "prompt": PROMPT, "options": {"num_predict": 100_000, "temperature": 0}}
    with httpx.stream("POST", f"{host}/api/generate", json=payload) as reply:
        lines = reply.iter_lines()
        first = [json.loads(next(lines)) for _ in range(3)]
    assert not any(c["done"] for c in first)
    deadline = time.monotonic() + 10
    while worker.stats["requests"] == before["requests"] or worker.lock.locked():
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.02)
    assert worker.stats["stopped_early"] == before["stopped_early"] + 1
    assert worker.stats["tokens"] - before["tokens"] < 20_000
    # The model (and its cache) is fine for the next client.
    reply = ollama.Client(host=host).generate(model=worker.chat.name, prompt=PROMPT, options=ollama_options(8))
    assert reply.response == expected_text(reference, TOKENIZER.encode(PROMPT), 8)


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


def test_command_line_answer_length_is_the_requests_default(base_path, reference):
    """`python -m ch07.serve --max-new-tokens 7`: a request without num_predict gets 7 tokens; one with it, its own."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMFS_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "ch07.serve", "--model", str(base_path), "--port", "0",
                             "--max-new-tokens", "7"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        lines = []
        while not (lines and "OLLAMA_HOST=" in lines[-1]):
            lines.append(proc.stderr.readline())
            assert lines[-1], "the server stopped: " + "".join(lines)
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its log flowing
        assert "answers of at most 7 tokens" in lines[-2]
        client = ollama.Client(host=re.search(r"OLLAMA_HOST=(\S+)", lines[-1]).group(1))
        name = client.list().models[0].model
        assert "num_predict 7" in client.show(name).parameters
        prompt_ids = TOKENIZER.encode(PROMPT)
        reply = client.generate(model=name, prompt=PROMPT, options={"temperature": 0})
        assert reply.eval_count == 7 and reply.response == expected_text(reference, prompt_ids, 7)
        reply = client.generate(model=name, prompt=PROMPT, options={"temperature": 0, "num_predict": 3})
        assert reply.eval_count == 3
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
