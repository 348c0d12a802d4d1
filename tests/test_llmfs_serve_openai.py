"""llmfs.openai_api: the server's OpenAI routes against the official `openai` client, with tiny random models.

The servers are those of tests/test_llmfs_serve.py (uvicorn in a thread on a free port of 127.0.0.1);
every answer is checked against the Ollama routes, `llmfs.chat` called directly and ch05's generate.
"""

import json
import threading
import time

import httpx
import ollama
import openai
import pytest

import test_llmfs_serve as ollama_side
from llmfs.chat import GenerationOptions
from test_llmfs_serve import PROMPT, TOKENIZER, _wait_for_generations, expected_text, serving

# The Ollama side's fixtures: its tiny models, the proxy switch-off, the server's log.
base_path, sft_path, reference = ollama_side.base_path, ollama_side.sft_path, ollama_side.reference
_no_proxy_for_localhost, server_log = ollama_side._no_proxy_for_localhost, ollama_side.server_log
# ... and its servers (module-scoped: this module starts its own, on the same tiny models).
base_server, sft_server, slow_server = ollama_side.base_server, ollama_side.sft_server, ollama_side.slow_server

QUESTION = [{"role": "user", "content": "Name a color."}]


def client_for(host: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{host}/v1", api_key="unused", max_retries=0, **kwargs)


def test_models_are_listed_and_found(base_server):
    host, app = base_server
    client, name = client_for(host), app.state.worker.chat.name
    models = client.models.list().data
    assert [m.id for m in models] == [name] and models[0].object == "model" and models[0].created > 0
    assert client.models.retrieve(name).id == name
    assert client.models.retrieve(name.removesuffix(":latest")).id == name  # the tag may be left out
    with pytest.raises(openai.NotFoundError, match="model 'llama3' not found") as info:
        client.models.retrieve("llama3")
    assert info.value.body["code"] == "model_not_found"


def test_chat_equals_the_ollama_route_and_the_chat_layer(sft_server, sft_path):
    """An instruction-tuned model: the Alpaca prompt, the same greedy answer on every path."""
    host, app = sft_server
    client, chat = client_for(host), app.state.worker.chat
    want = chat.respond(QUESTION, GenerationOptions(temperature=0.0, max_new_tokens=12))
    prompt_tokens = len(chat.encode(chat.chat_prompt(QUESTION)))
    ollama_reply = ollama.Client(host=host).chat(model="tiny-sft", messages=QUESTION, options={"temperature": 0})
    assert ollama_reply.message.content == want and ollama_reply.prompt_eval_count == prompt_tokens

    reply = client.chat.completions.create(model="tiny-sft", messages=QUESTION, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.created > 0
    assert reply.model == "tiny-sft" and len(reply.choices) == 1
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == ollama_reply.done_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, ollama_reply.eval_count)
    assert reply.usage.total_tokens == prompt_tokens + ollama_reply.eval_count

    chunks = list(client.chat.completions.create(model="tiny-sft", messages=QUESTION, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == want
    assert chunks[0].choices[0].delta.role == "assistant" and len(chunks) > 5  # token by token
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    finish_reasons = [c.choices[0].finish_reason for c in chunks[:-1]]
    assert finish_reasons == [None] * (len(chunks) - 2) + [reply.choices[0].finish_reason]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage  # include_usage: a last chunk
    plain = list(client.chat.completions.create(model="tiny-sft", messages=QUESTION, temperature=0, stream=True))
    assert all(c.choices and c.usage is None for c in plain)  # without include_usage: no usage chunk

    # OpenAI's newer forms of a message: text parts, and "developer" for "system".
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Name a color."}]}]
    same = [{"role": "system", "content": "Be brief."}, *QUESTION]
    assert (client.chat.completions.create(model="tiny-sft", messages=parts, temperature=0).choices[0].message.content
            == chat.respond(same, GenerationOptions(temperature=0.0, max_new_tokens=12)))


def test_completions_continue_the_prompt_as_written(sft_server, sft_path):
    """/v1/completions is /api/generate with "raw": true: no Alpaca format around the prompt."""
    host, app = sft_server
    client, chat = client_for(host), app.state.worker.chat
    ids = TOKENIZER.encode(PROMPT)
    want = expected_text(chat.model, ids, 12)
    assert ollama.Client(host=host).generate(model="tiny-sft", prompt=PROMPT, raw=True,
                                             options={"temperature": 0}).response == want
    reply = client.completions.create(model="tiny-sft", prompt=PROMPT, temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-") and reply.choices[0].text == want
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 12
    assert client.completions.create(model="tiny-sft", prompt=[PROMPT], temperature=0).choices[0].text == want
    chunks = list(client.completions.create(model="tiny-sft", prompt=PROMPT, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == want and len(chunks) > 5
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12


@pytest.mark.parametrize("stream", [False, True])
def test_sampling_length_and_stop_strings(base_server, reference, stream):
    host, app = base_server
    client, name = client_for(host), app.state.worker.chat.name
    ids = TOKENIZER.encode(PROMPT)

    def complete(**kwargs) -> tuple[str, str, int | None]:
        """(text, finish_reason, completion tokens) from /v1/completions."""
        if not stream:
            reply = client.completions.create(model=name, prompt=PROMPT, **kwargs)
            return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens
        chunks = list(client.completions.create(model=name, prompt=PROMPT, stream=True,
                                                stream_options={"include_usage": True}, **kwargs))
        return ("".join(c.choices[0].text for c in chunks[:-1]), chunks[-2].choices[0].finish_reason,
                chunks[-1].usage.completion_tokens)

    # max_tokens -> num_predict, and the answer ends there: "length". The window slides past the context.
    assert complete(max_tokens=32, temperature=0) == (expected_text(reference, ids, 32), "length", 32)
    # Sampling: the same seed gives what the Ollama route and ch05's generate give (top_k is the server's 40).
    sampled = complete(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)[0]
    assert sampled == ollama.Client(host=host).generate(
        model=name, prompt=PROMPT, options={"num_predict": 20, "temperature": 1.0, "top_p": 0.9, "seed": 7}).response
    assert sampled == expected_text(reference, ids, 20, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    assert complete(max_tokens=20, temperature=1.0, seed=7, extra_body={"top_k": 0})[0] == expected_text(
        reference, ids, 20, temperature=1.0, top_p=0.9, seed=7)  # top_k, an extension, turns it off
    # Stop strings, one or a list: the answer ends before the first, with "stop".
    full = expected_text(reference, ids, 30)
    stop = full[12:15]
    cut = full[:full.index(stop)]
    for stops in (stop, [stop, "never§"]):
        text, finish_reason, tokens = complete(max_tokens=30, temperature=0, stop=stops)
        assert (text, finish_reason) == (cut, "stop") and tokens < 30
    # The chat route with a base model: the messages' text, continued; max_completion_tokens is max_tokens.
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "there"}]
    want = expected_text(reference, TOKENIZER.encode("Hello\n\nthere"), 10)
    reply = client.chat.completions.create(model=name, messages=messages, max_completion_tokens=10, temperature=0,
                                           stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in reply) if stream else reply.choices[0].message.content
    assert text == want


BAD = [  # (route, request fields besides the model, error class, words of the message, param)
    ("chat", {"n": 2}, openai.BadRequestError, "'n' must be 1", "n"),
    ("completions", {"n": 3}, openai.BadRequestError, "'n' must be 1", "n"),
    ("chat", {"model": "llama3"}, openai.NotFoundError, "model 'llama3' not found; this server has", "model"),
    ("completions", {"model": "llama3"}, openai.NotFoundError, "model 'llama3' not found", "model"),
    ("chat", {"temperature": -1}, openai.BadRequestError, "'temperature' must be >= 0", "temperature"),
    ("chat", {"extra_body": {"temperature": "hot"}}, openai.BadRequestError, "'temperature' must be a finite",
     "temperature"),
    ("chat", {"top_p": 0}, openai.BadRequestError, "'top_p' must be in (0, 1]", "top_p"),
    ("chat", {"extra_body": {"seed": "x"}}, openai.BadRequestError, "'seed' must be an integer", "seed"),
    ("chat", {"stop": [""]}, openai.BadRequestError, "'stop' must be a string or a list", "stop"),
    ("chat", {"max_tokens": 33}, openai.BadRequestError, "'max_tokens' must be from 1 to this server's ceiling of 32",
     "max_tokens"),
    ("chat", {"max_completion_tokens": 0}, openai.BadRequestError, "'max_completion_tokens' must be from 1",
     "max_completion_tokens"),
    ("completions", {"extra_body": {"max_tokens": "5"}}, openai.BadRequestError, "'max_tokens' must be an integer",
     "max_tokens"),
    ("chat", {"extra_body": {"n": True}}, openai.BadRequestError, "'n' must be an integer", "n"),
    ("chat", {"messages": []}, openai.BadRequestError, "'messages' must be a non-empty list", "messages"),
    ("chat", {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, openai.BadRequestError,
     "message 0: the role must be system, developer, user or assistant", "messages"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     openai.BadRequestError, "message 0: only text content", "messages"),
    ("chat", {"messages": [{"role": "user", "content": " ".join(["word"] * 40)}]}, openai.BadRequestError,
     "the prompt is 40 tokens, longer than the model's context of 32 tokens", None),
    ("completions", {"prompt": " ".join(["word"] * 40)}, openai.BadRequestError, "context of 32 tokens", None),
    ("completions", {"prompt": ["one", "two"]}, openai.BadRequestError, "'prompt' holds 2 prompts", "prompt"),
    ("completions", {"prompt": ""}, openai.BadRequestError, "'prompt' must be a non-empty string", "prompt"),
    ("completions", {"prompt": [1, 2, 3]}, openai.BadRequestError, "'prompt' must be a non-empty string", "prompt"),
    ("chat", {"logprobs": True}, openai.BadRequestError, "'logprobs' is not supported", "logprobs"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, openai.BadRequestError,
     "'tools' is not supported", "tools"),
    ("completions", {"echo": True}, openai.BadRequestError, "'echo' is not supported", "echo"),
    ("chat", {"extra_body": {"mirostat": 2}}, openai.BadRequestError, "unrecognized request argument(s): \"mirostat\"",
     "mirostat"),
    ("chat", {"extra_body": {"stream_options": {"include_usage": "yes"}}}, openai.BadRequestError,
     "'include_usage' must be true or false", "include_usage"),
]


@pytest.mark.parametrize("route, fields, error, words, param", BAD, ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD)])
def test_bad_requests_raise_the_clients_error_with_the_message(base_server, server_log, route, fields, error, words,
                                                                param):
    host, app = base_server
    client, name = client_for(host), app.state.worker.chat.name
    fields = {"model": name, "max_tokens": 3, **fields}
    for stream in (False, True):  # the request is refused before a stream begins
        with pytest.raises(error) as info:
            if route == "chat":
                client.chat.completions.create(**{"messages": QUESTION, **fields}, stream=stream)
            else:
                client.completions.create(**{"prompt": PROMPT, **fields}, stream=stream)
        assert words in info.value.message and words in info.value.body["message"]
        expected_type = "invalid_request_error"
        assert info.value.body["type"] == expected_type and info.value.body["param"] == param
    assert server_log == [], [r.getMessage() for r in server_log]
    assert not app.state.worker.lock.locked()


def test_malformed_bodies_and_unknown_routes_get_openais_error_shape(base_server, server_log):
    host, app = base_server
    for body, words in [(b'{"model": ', "invalid JSON"), (b"[1]", "JSON object"),
                        (b'{"model": "M", "prompt": "hi", "temperature": NaN}', "NaN"),
                        (json.dumps({"prompt": "hi"}).encode(), "model is required")]:
        reply = httpx.post(f"{host}/v1/completions", content=body, headers={"Content-Type": "application/json"})
        error = reply.json()["error"]
        assert reply.status_code == 400 and words in error["message"] and error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}
    reply = httpx.get(f"{host}/v1/embeddings")
    assert reply.status_code == 404 and reply.json()["error"]["message"] == "not found"
    assert httpx.get(f"{host}/api/nothing").json() == {"error": "not found"}  # the Ollama side keeps its shape
    assert server_log == []


def test_the_time_limit_is_an_error_never_a_finished_answer(base_path, server_log):
    """--request-timeout 0.5 at 0.1 s a token: an answer of 32 tokens is stopped after about 5 of them."""
    with serving(base_path, step_delay=0.1, request_timeout=0.5) as (host, app):
        client, name = client_for(host), app.state.worker.chat.name
        with pytest.raises(openai.InternalServerError, match="limit of 0.5 s per request") as info:
            # The client's default retries (2 for a 5xx): the reply tells it not to, the same request would fail.
            openai.OpenAI(base_url=f"{host}/v1", api_key="unused").completions.create(
                model=name, prompt=PROMPT, max_tokens=32, temperature=0)
        assert info.value.status_code == 503 and info.value.body["code"] == "timeout"
        assert app.state.worker.stats["timed_out"] == 1
        chunks = []
        with pytest.raises(openai.APIError, match="limit of 0.5 s per request") as info:
            for chunk in client.chat.completions.create(model=name, messages=QUESTION, max_tokens=32, stream=True):
                chunks.append(chunk)
        assert chunks and all(c.choices[0].finish_reason is None for c in chunks)  # no finished-looking end
        assert info.value.body["type"] == "server_error" and info.value.body["code"] == "timeout"
        assert app.state.worker.stats["timed_out"] == 2 and not app.state.worker.lock.locked()
    assert server_log == []


def test_a_client_that_leaves_frees_the_model(slow_server, reference, server_log):
    host, app = slow_server
    worker, client = app.state.worker, client_for(host)
    name = worker.chat.name
    before = dict(worker.stats)
    # Streaming: three chunks read, then the stream closed.
    with client.chat.completions.create(model=name, messages=QUESTION, max_tokens=32, temperature=0,
                                        stream=True) as stream:
        first = [next(stream) for _ in range(3)]
    assert all(c.choices[0].finish_reason is None for c in first)
    _wait_for_generations(worker, before["requests"] + 1, deadline_s=4)  # 32 tokens would take 6 s
    # One whole reply: the client gives up waiting (its timeout).
    with pytest.raises(openai.APITimeoutError):
        client_for(host, timeout=0.6).completions.create(model=name, prompt=PROMPT, max_tokens=32, temperature=0)
    start = time.monotonic()
    reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=2, temperature=0)
    assert time.monotonic() - start < 3, "the abandoned request kept the model"
    assert reply.choices[0].text == expected_text(reference, TOKENIZER.encode(PROMPT), 2)
    assert worker.stats["requests"] == before["requests"] + 3
    assert worker.stats["stopped_early"] == before["stopped_early"] + 2
    assert worker.stats["tokens"] - before["tokens"] < 32 + 2
    assert server_log == [], [r.getMessage() for r in server_log]


def test_both_apis_share_one_queue(base_server, reference):
    """Streams on both APIs at once, each sampled with its own seed: served one after another, none mixed up."""
    host, app = base_server
    name, ids = app.state.worker.chat.name, TOKENIZER.encode(PROMPT)
    wanted = {seed: expected_text(reference, ids, 10, temperature=1.0, top_k=40, top_p=0.9, seed=seed)
              for seed in range(8)}
    results, errors = {}, []

    def stream(seed):
        try:
            if seed % 2:
                parts = client_for(host).completions.create(model=name, prompt=PROMPT, max_tokens=10, temperature=1.0,
                                                            top_p=0.9, seed=seed, stream=True)
                results[seed] = "".join(p.choices[0].text for p in parts)
            else:
                parts = ollama.Client(host=host).generate(model=name, prompt=PROMPT, stream=True, options={
                    "num_predict": 10, "temperature": 1.0, "top_p": 0.9, "seed": seed})
                results[seed] = "".join(p.response for p in parts)
        except Exception as exc:  # collected: an assertion in a thread would be lost
            errors.append(repr(exc))

    threads = [threading.Thread(target=stream, args=(seed,)) for seed in wanted]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and results == wanted
