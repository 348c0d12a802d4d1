"""OpenAI's API on the Ollama-API server (`llmfs.serve`): the same model, queue and limits, OpenAI's wire format.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:11435/v1", api_key="unused")
    client.chat.completions.create(model="gpt2-medium-sft", messages=[{"role": "user", "content": "Hi"}])

GET /v1/models, GET /v1/models/{model}, POST /v1/chat/completions and POST /v1/completions, in one
JSON reply or streamed as server-sent events (`data: {json}` chunks, then `data: [DONE]`). Each
request goes through the server's own path (`llmfs.serve`): its option checks and defaults, its
tokenisation and prompt format, its worker (batching or one request at a time, the time limit, a client that
disconnects frees the model). Only the names change on the wire:

* model -> the served model (a 404 `model_not_found` for another name); messages (roles system or
  developer, user, assistant; text content, as a string or a list of text parts) -> the chat's
  prompt format, as /api/chat; prompt (a string, or a list holding one) -> the text continued as
  written, as /api/generate with "raw": true;
* max_tokens or max_completion_tokens -> num_predict (at most the server's ceiling); temperature,
  top_p, seed, stop; plus two extensions clients can send in `extra_body`: top_k and truncate.
  What a request does not set is the server's default, as on the Ollama side;
* usage (prompt_tokens, completion_tokens, total_tokens) in every whole reply, and in a last chunk
  with no choices when a stream asks for it (`stream_options: {"include_usage": true}`);
  finish_reason is "stop" (end of text or a stop string) or "length".

Errors are OpenAI's {"error": {"message", "type", "param", "code"}}, so the `openai` client raises
BadRequestError (400, invalid_request_error: malformed JSON, a field of the wrong type or out of
range, n other than 1, a list of several prompts, tools, logprobs, a prompt longer than the
context) or NotFoundError (404). A request over the time limit is a 503 (type server_error, code
"timeout"), or in a stream that has begun an error event, `data: {"error": {...}}`, with no [DONE]
after it: the client raises APIError instead of returning an answer that looks finished.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmfs.chat import GenerationOptions, parse_options, shown
from llmfs.errors import InvalidInput
from llmfs.serve import (
    CLIENT_GONE,
    ClosingStreamingResponse,
    ModelWorker,
    OllamaError,
    _check_model,
    _encode,
    _field,
    _read_json,
    log,
    whole_answer,
)

# Fields that would change the answer in ways this server cannot honour: refused unless null or neutral.
NEUTRAL = {"frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False,), "top_logprobs": (0,),
           "logit_bias": ({},), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
           "function_call": ("none", "auto"), "response_format": ({"type": "text"},), "echo": (False,),
           "suffix": ("",), "best_of": (1,), "modalities": (["text"],), "audio": (), "prediction": (),
           "reasoning_effort": (), "web_search_options": ()}
# Fields that only matter to OpenAI's platform (billing, storage, routing): accepted and ignored.
IGNORED = ("user", "store", "metadata", "parallel_tool_calls", "service_tier", "prompt_cache_key",
           "safety_identifier")
SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop")  # the same name on both sides
COMMON = ("model", "stream", "stream_options", "n", "max_tokens", "max_completion_tokens", "truncate", *SAMPLING)
KNOWN = {"chat.completion": {"messages", *COMMON}, "text_completion": {"prompt", *COMMON}}


class OpenAIError(OllamaError):
    """A bad request on the OpenAI side: OllamaError's status and message, and OpenAI's param and code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(status, message)
        self.param, self.code = param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- Reading a request: OpenAI's fields onto the server's checks -----------------------------------

def _check_fields(body: dict, kind: str) -> None:
    for key, neutral in NEUTRAL.items():
        if body.get(key) is not None and body[key] not in neutral:
            raise OpenAIError(400, f"'{key}' is not supported by this server (got {shown(body[key])})", key)
    unknown = sorted(set(body) - KNOWN[kind] - set(NEUTRAL) - set(IGNORED))
    if unknown:
        raise OpenAIError(400, f"unrecognized request argument(s): {', '.join(shown(k) for k in unknown[:5])}",
                          unknown[0])


def _checked(body: dict, key: str, kind, what: str, default=None):
    try:
        return _field(body, key, kind, what, default)
    except OllamaError as exc:
        raise OpenAIError(400, exc.message, key) from None


def _options(worker: ModelWorker, body: dict) -> tuple[bool, bool, GenerationOptions]:
    """Whether the request streams, whether it wants usage in the stream, and its options."""
    stream = _checked(body, "stream", bool, "true or false", False)
    stream_options = _checked(body, "stream_options", dict, "a JSON object", {})
    include_usage = _checked(stream_options, "include_usage", bool, "true or false", False)
    n = _checked(body, "n", int, "an integer", 1)
    if n != 1:
        raise OpenAIError(400, f"'n' must be 1: this server generates one answer per request, got {n}", "n")
    options = {key: body[key] for key in SAMPLING if key in body}
    if "truncate" in body:
        options["truncate"] = body["truncate"]
    for key in ("max_completion_tokens", "max_tokens"):  # the newer name first
        limit = _checked(body, key, int, "an integer")
        if limit is None:
            continue
        if not 1 <= limit <= worker.ceiling:
            raise OpenAIError(400, f"'{key}' must be from 1 to this server's ceiling of {worker.ceiling} tokens "
                                   f"per answer, got {shown(limit)}", key)
        options["num_predict"] = limit
        break
    try:
        return stream, include_usage, parse_options(options, worker.defaults, worker.ceiling)
    except InvalidInput as exc:
        param = re.match(r"option '(\w+)'", str(exc))  # OpenAI's fields are top-level, not options
        raise OpenAIError(400, str(exc).removeprefix("option "), param and param.group(1)) from None


def _model(worker: ModelWorker, body: dict) -> str:
    try:
        return _check_model(worker, body)
    except OllamaError as exc:
        raise OpenAIError(exc.status, exc.message, "model", "model_not_found" if exc.status == 404 else None) from None


def _content(i: int, content) -> str:
    """A message's text: a string, or a list of text parts (OpenAI's newer form); no images or audio."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "\n".join(p["text"] for p in content)
        raise OpenAIError(400, f"message {i}: only text content is supported by this server", "messages")
    raise OpenAIError(400, f"message {i}: 'content' must be a string or a list of text parts, got "
                           f"{shown(content)}", "messages")


def _messages(body: dict) -> list[dict]:
    """OpenAI's messages as the chat layer's: roles system (developer too), user, assistant; text only."""
    messages = _checked(body, "messages", list, "a list of messages")
    if not messages:
        raise OpenAIError(400, "'messages' must be a non-empty list of messages", "messages")
    converted = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise OpenAIError(400, f"message {i} must be a JSON object, got {shown(m)}", "messages")
        if m.get("tool_calls") or m.get("function_call"):
            raise OpenAIError(400, f"message {i}: tool calls are not supported by this server", "messages")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise OpenAIError(400, f"message {i}: the role must be system, developer, user or assistant, got "
                                   f"{shown(m.get('role'))}", "messages")
        converted.append({"role": role, "content": _content(i, m.get("content"))})
    return converted


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise OpenAIError(400, f"'prompt' holds {len(prompt)} prompts; this server answers one per request "
                               "(send them one at a time)", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise OpenAIError(400, f"'prompt' must be a non-empty string, got {shown(prompt)}", "prompt")
    return prompt


# --- Answering ------------------------------------------------------------------------------------

def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _reply(worker: ModelWorker, request: Request, stream: bool, include_usage: bool, ids: list[int],
                 opts: GenerationOptions, received: float, head: dict, choice: Callable[[str, str | None], dict],
                 whole: Callable[[str, str], dict]) -> Response:
    """One JSON reply (`whole(text, finish_reason)` is its choice) or a stream of chunks (`choice(text,
    finish_reason)`), with `head` (id, object, created, model) on each."""
    events = worker.events(ids, opts, received)

    def usage(final: dict) -> dict:
        return {"prompt_tokens": len(ids), "completion_tokens": final["eval_count"],
                "total_tokens": len(ids) + final["eval_count"]}

    if not stream:
        answer = await whole_answer(request, events)
        if answer is None:
            return Response(status_code=CLIENT_GONE)
        text, final = answer
        return JSONResponse({**head, "choices": [whole(text, final["done_reason"])], "usage": usage(final)})

    extra = {"usage": None} if include_usage else {}  # OpenAI: null on every chunk but the last

    async def chunks() -> AsyncIterator[bytes]:
        # The headers are sent: a failure is an error event, and no [DONE] follows it.
        try:
            async for event in events:
                if isinstance(event, dict):
                    yield _sse({**head, "choices": [choice("", event["done_reason"])], **extra})
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": usage(event)})
                else:
                    yield _sse({**head, "choices": [choice(event, None)], **extra})
            yield _sse("[DONE]")
        except OpenAIError as exc:
            yield _sse(error_body(exc.status, exc.message, exc.param, exc.code))
        except OllamaError as exc:  # the time limit
            yield _sse(error_body(exc.status, exc.message, code="timeout" if exc.status == 503 else None))
        except Exception as exc:  # a bug: the client hears of it, the log keeps its traceback
            log.exception("generation failed")
            yield _sse(error_body(500, f"generation failed: {type(exc).__name__}: {exc}"))
        finally:
            await events.aclose()

    return ClosingStreamingResponse(chunks(), media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache"})


def add_openai_routes(app: FastAPI) -> None:
    """Add OpenAI's routes to the server's app (`llmfs.serve.create_app`), and OpenAI's error shape under /v1/."""
    worker: ModelWorker = app.state.worker
    chat = worker.chat

    for exc_class in (OllamaError, StarletteHTTPException, Exception):
        ollama_handler = app.exception_handlers[exc_class]

        async def handler(request: Request, exc: Exception, ollama_handler=ollama_handler) -> Response:
            reply = await ollama_handler(request, exc)
            if not request.url.path.startswith("/v1/") or reply.status_code == CLIENT_GONE:
                return reply
            message = json.loads(reply.body)["error"]
            code = getattr(exc, "code", None) if isinstance(exc, OpenAIError) else None
            headers = getattr(exc, "headers", None)
            if isinstance(exc, OllamaError) and exc.status == 503:  # the time limit: the same request would hit
                code, headers = "timeout", {"x-should-retry": "false"}  # it again, so the client must not retry
            return JSONResponse(error_body(reply.status_code, message, getattr(exc, "param", None), code),
                                status_code=reply.status_code, headers=headers)

        app.add_exception_handler(exc_class, handler)

    def model_card() -> dict:
        return {"id": chat.name, "object": "model", "created": int(time.time()), "owned_by": "llms-from-scratch"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        _model(worker, {"model": model})
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        received = time.perf_counter()
        body = await _read_json(request)
        _check_fields(body, "chat.completion")
        name = _model(worker, body)
        messages = _messages(body)
        stream, include_usage, opts = _options(worker, body)
        ids = _encode(worker, chat.chat_prompt(messages), opts)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk" if stream else
                "chat.completion", "created": int(time.time()), "model": name, "system_fingerprint": None}
        started = False

        def choice(text: str, finish_reason: str | None) -> dict:
            nonlocal started
            delta = {"content": text} if text or finish_reason is None else {}
            if not started:  # the first chunk names the role, as OpenAI's do
                delta, started = {"role": "assistant", **delta}, True
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

        def whole(text: str, finish_reason: str) -> dict:
            return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None, "finish_reason": finish_reason}

        return await _reply(worker, request, stream, include_usage, ids, opts, received, head, choice, whole)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        received = time.perf_counter()
        body = await _read_json(request)
        _check_fields(body, "text_completion")
        name = _model(worker, body)
        prompt = _prompt(body)
        stream, include_usage, opts = _options(worker, body)
        ids = _encode(worker, chat.generate_prompt(prompt, raw=True), opts)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name, "system_fingerprint": None}

        def choice(text: str, finish_reason: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

        return await _reply(worker, request, stream, include_usage, ids, opts, received, head, choice, choice)
