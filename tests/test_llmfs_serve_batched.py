"""The server's continuous batching (llmfs.serve.ModelWorker with llmfs.batched), against the official
`ollama` and `openai` clients: concurrent streams decode together and each still gets exactly the
answer ch05's generate gives its prompt alone; a client that leaves mid-stream changes no other
answer; `--max-batch-size 1` is one request at a time.

The servers and tiny models are those of tests/test_llmfs_serve.py (uvicorn in a thread on 127.0.0.1).
"""

import json
import threading

import httpx
import ollama
import openai
import pytest

import test_llmfs_serve as ollama_side
from ch07.cli import serve_main
from test_llmfs_serve import TOKENIZER, _wait_for_generations, expected_text, serving

base_path, reference = ollama_side.base_path, ollama_side.reference
_no_proxy_for_localhost, server_log = ollama_side._no_proxy_for_localhost, ollama_side.server_log

# Prompts of different lengths (2 to 13 tokens), each with its own answer length; sampled requests use the
# server's top_k (40) on both APIs.
PROMPTS = ["Hi", "Every effort moves you", "The quick brown fox jumps over the lazy dog and then",
           "In a hole in the ground there lived", "Once upon a time", "Hello, world", "Why", "A B C D E F G H I"]
NUM_PREDICT = [6, 12, 3, 17, 9, 1, 14, 8]


@pytest.fixture(scope="module")
def batched_server(base_path):
    """The base model at 0.05 s a step, so that concurrent requests meet in the batch."""
    with serving(base_path, step_delay=0.05) as served:
        yield served


def _run_threads(target, n: int) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


def _request(host: str, name: str, i: int) -> str:
    """Request i of eight: Ollama's generate/chat and OpenAI's completions/chat in turn, greedy or seeded."""
    prompt, n = PROMPTS[i], NUM_PREDICT[i]
    sampled = dict(temperature=1.0, top_p=0.9, seed=i) if i % 3 else dict(temperature=0.0, seed=i)
    messages = [{"role": "user", "content": prompt}]  # a base model's chat prompt is the message itself
    if i % 4 == 0:
        parts = ollama.Client(host=host).generate(model=name, prompt=prompt, stream=True,
                                                  options={"num_predict": n, **sampled})
        return "".join(p.response for p in parts)
    if i % 4 == 1:
        parts = ollama.Client(host=host).chat(model=name, messages=messages, stream=True,
                                              options={"num_predict": n, **sampled})
        return "".join(p.message.content for p in parts)
    client = openai.OpenAI(base_url=f"{host}/v1", api_key="unused", max_retries=0)
    if i % 4 == 2:
        parts = client.completions.create(model=name, prompt=prompt, max_tokens=n, stream=True, **sampled)
        return "".join(p.choices[0].text for p in parts)
    parts = client.chat.completions.create(model=name, messages=messages, max_tokens=n, stream=True, **sampled)
    return "".join(p.choices[0].delta.content or "" for p in parts if p.choices)


def _expected(reference, i: int) -> str:
    """What ch05's generate gives request i's prompt alone."""
    sampled = dict(temperature=1.0, top_k=40, top_p=0.9) if i % 3 else dict(temperature=0.0)
    return expected_text(reference, TOKENIZER.encode(PROMPTS[i]), NUM_PREDICT[i], seed=i, **sampled)


def test_eight_concurrent_streams_each_get_their_own_answer(batched_server, reference, server_log):
    host, app = batched_server
    worker, name = app.state.worker, app.state.worker.chat.name
    assert worker.batch is not None and worker.max_batch_size == 8
    results, errors = {}, []

    def stream(i):
        try:
            results[i] = _request(host, name, i)
        except Exception as exc:  # collected: an assertion in a thread would be lost
            errors.append(repr(exc))

    _run_threads(stream, len(PROMPTS))
    assert errors == []
    assert results == {i: _expected(reference, i) for i in range(len(PROMPTS))}
    assert max(worker.batch_sizes) >= 4, worker.batch_sizes  # they did decode together
    assert not worker.lock.locked() and len(worker.batch) == 0
    assert server_log == [], [r.getMessage() for r in server_log]


def test_a_client_that_leaves_mid_stream_changes_no_other_answer(batched_server, reference, server_log):
    host, app = batched_server
    worker, name = app.state.worker, app.state.worker.chat.name
    before = dict(worker.stats)
    results, errors, left = {}, [], threading.Event()

    def stream(i):
        try:
            if i == 0:  # reads three chunks of a long answer, then closes its connection
                payload = {"model": name, "prompt": PROMPTS[3], "options": {"num_predict": -1, "temperature": 0}}
                with httpx.stream("POST", f"{host}/api/generate", json=payload) as reply:
                    lines = reply.iter_lines()
                    results[i] = [json.loads(next(lines))["done"] for _ in range(3)]
                left.set()
            else:
                results[i] = _request(host, name, i)
        except Exception as exc:
            errors.append(repr(exc))

    _run_threads(stream, 5)
    assert errors == [] and left.is_set() and results.pop(0) == [False] * 3
    assert results == {i: _expected(reference, i) for i in range(1, 5)}
    _wait_for_generations(worker, before["requests"] + 5)
    assert worker.stats["stopped_early"] == before["stopped_early"] + 1
    assert worker.stats["tokens"] - before["tokens"] < 32 + sum(NUM_PREDICT[1:5])  # the long one was cut short
    assert server_log == [], [r.getMessage() for r in server_log]


def test_the_time_limit_stops_one_request_of_a_batch(base_path, reference, server_log):
    """At 0.1 s a step and 1.5 s per request: the long answer (32 tokens) is stopped, the short one beside it
    (2 tokens) is whole."""
    with serving(base_path, step_delay=0.1, request_timeout=1.5) as (host, app):
        name = app.state.worker.chat.name
        replies = {}

        def ask(i):
            n = -1 if i == 0 else 2
            replies[i] = httpx.post(f"{host}/api/generate", timeout=10, json={
                "model": name, "prompt": PROMPTS[1], "stream": False, "options": {"num_predict": n, "temperature": 0}})

        _run_threads(ask, 2)
        assert replies[0].status_code == 503 and "limit of 1.5 s" in replies[0].json()["error"], replies[0].text
        assert replies[1].status_code == 200, replies[1].text
        assert replies[1].json()["response"] == expected_text(reference, TOKENIZER.encode(PROMPTS[1]), 2)
        assert app.state.worker.stats["timed_out"] == 1 and not app.state.worker.lock.locked()
    assert server_log == []


def test_max_batch_size_one_serves_one_request_at_a_time(base_path, reference):
    with serving(base_path, max_batch_size=1) as (host, app):
        worker, name = app.state.worker, app.state.worker.chat.name
        assert worker.batch is None and worker.max_batch_size == 1
        results = {}
        _run_threads(lambda i: results.__setitem__(i, _request(host, name, i)), 4)
        assert results == {i: _expected(reference, i) for i in range(4)}
        assert not worker.batch_sizes  # the one-at-a-time path, as before batching


def test_bad_max_batch_size_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        serve_main(["--model", "gpt2", "--max-batch-size", "0"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: argument --max-batch-size: must be a whole number >= 1, got 0"), err
