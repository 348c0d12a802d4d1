"""The Ollama-API server: serve a model of this book over HTTP, so any Ollama client can talk to it.

    python -m ch07.serve --model outputs/ch07/gpt2-medium-sft.pth     # on 127.0.0.1:11435
    OLLAMA_HOST=127.0.0.1:11435 python -m ch07.ollama_evaluate --model gpt2-medium-sft \
        --file outputs/ch07/instruction-data-with-response.json

The model is a chapter-7 instruction-tuned model, a chapter-5 checkpoint or GPT-2 weights
(anything the chapter's loader reads: `ch07.cli.load_chat_model`). The subset of Ollama's HTTP API that clients use:
GET /api/version, GET /api/tags, POST /api/show, POST /api/generate and POST /api/chat, streamed
as newline-delimited JSON (the default, as in Ollama) or in one reply with "stream": false; the
last chunk has done: true, done_reason and Ollama's token counts and durations (nanoseconds).
Options: temperature, top_k, top_p, seed, num_predict, stop (and truncate, see below); a request
that does not set num_predict gets the server's `--max-new-tokens` (default 128).

Built on FastAPI + uvicorn. One model per server, and the model is not re-entrant: requests
wait their turn on an asyncio lock, and every model step runs on one worker thread. A client
that disconnects mid-stream stops its generation. Errors are Ollama's {"error": "..."} with a
4xx code: malformed JSON (400), an unknown model (404), a prompt longer than the context (400,
unless the request sends "truncate": true -- top-level or in options -- to keep its last
tokens), a negative num_predict or another bad option (400).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmfs.chat import ChatModel, GenerationOptions, parse_options
from llmfs.cli import Parser, device_name, non_negative_int, run, whole_number
from llmfs.errors import InvalidInput, UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11435  # next to Ollama's 11434, so both can run side by side
VERSION = "0.5.0"     # an Ollama API level the clients accept; /api/version reports it
# Request fields of Ollama's API that would change the answer in ways this server cannot honour.
UNSUPPORTED_FIELDS = ("images", "format", "suffix", "template", "context", "tools")


class OllamaError(Exception):
    """A bad request: answered as {"error": message} with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class ModelWorker:
    """Runs one request at a time on the model, every step on one thread, and counts what it did."""

    def __init__(self, chat: ChatModel, defaults: GenerationOptions | None = None):
        self.chat, self.defaults = chat, defaults or GenerationOptions()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.lock = asyncio.Lock()  # FIFO: requests are served in arrival order
        self.stats = {"requests": 0, "tokens": 0, "stopped_early": 0}

    async def events(self, prompt_ids: list[int], options: GenerationOptions,
                     received: float) -> AsyncIterator[str | dict]:
        """The answer's text pieces as they come, then a dict of Ollama's final fields."""
        loop = asyncio.get_running_loop()
        async with self.lock:
            loaded = first = time.perf_counter()
            gen = self.chat.generation(prompt_ids, options)
            finished, steps = False, 0
            try:
                while (piece := await loop.run_in_executor(self.executor, next, gen, None)) is not None:
                    steps += 1
                    if steps == 1:
                        first = time.perf_counter()  # the prompt's forward pass and the first token
                    if piece:
                        yield piece
                finished = True
            finally:
                # Queued behind a step still running, if any; then the next request's steps.
                self.executor.submit(gen.close)
                self.stats["requests"] += 1
                self.stats["tokens"] += gen.eval_count
                self.stats["stopped_early"] += not finished
            end = time.perf_counter()
        ns = 1_000_000_000
        yield {"done_reason": gen.done_reason, "total_duration": int((end - received) * ns),
               "load_duration": int((loaded - received) * ns),  # waiting for the model, as in Ollama
               "prompt_eval_count": len(prompt_ids), "prompt_eval_duration": int((first - loaded) * ns),
               "eval_count": gen.eval_count, "eval_duration": int((end - first) * ns)}


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator, also when the client went away while
    the generator waited at a `yield` (Starlette then just stops iterating): that frees the model."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _read_json(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise OllamaError(400, f"invalid JSON in the request body: {exc}") from None
    if not isinstance(body, dict):
        raise OllamaError(400, "the request body must be a JSON object")
    return body


def _check_model(worker: ModelWorker, body: dict) -> str:
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise OllamaError(400, "model is required")
    if not worker.chat.matches(name):
        raise OllamaError(404, f"model '{name}' not found; this server has '{worker.chat.name}'")
    return name


def _prepare(worker: ModelWorker, body: dict, prompt: str) -> tuple[list[int], GenerationOptions]:
    """Validated prompt ids and options of a generate/chat request (raises OllamaError)."""
    for key in UNSUPPORTED_FIELDS:
        if body.get(key):
            raise OllamaError(400, f"'{key}' is not supported by this server")
    if body.get("think"):
        raise OllamaError(400, f"'{worker.chat.name}' does not support thinking")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise OllamaError(400, "options must be a JSON object")
    if "truncate" in body:
        options = {"truncate": body["truncate"], **options}
    try:
        opts = parse_options(options, worker.defaults)
        ids = worker.chat.encode(prompt, opts.truncate)
    except InvalidInput as exc:  # a bad option, or a prompt longer than the context (PromptTooLong)
        raise OllamaError(400, str(exc)) from None
    if not ids:
        raise OllamaError(400, "the prompt is empty")
    return ids, opts


async def _reply(worker: ModelWorker, body: dict, ids: list[int], opts: GenerationOptions, received: float,
                 chunk) -> JSONResponse | StreamingResponse:
    """Stream NDJSON chunks (`chunk(text)` shapes one) or collect them into one JSON reply."""
    stream = body.get("stream", True)
    events = worker.events(ids, opts, received)
    if stream is False:
        pieces, final = [], {}
        async for event in events:
            if isinstance(event, dict):
                final = event
            else:
                pieces.append(event)
        return JSONResponse({**chunk("".join(pieces)), "done": True, **final})

    async def ndjson() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                done = isinstance(event, dict)
                line = {**chunk(""), "done": True, **event} if done else {**chunk(event), "done": False}
                yield (json.dumps(line) + "\n").encode()
        except Exception as exc:  # the headers are sent: report the failure in the stream, as Ollama does
            yield (json.dumps({"error": f"generation failed: {type(exc).__name__}: {exc}"}) + "\n").encode()
        finally:
            await events.aclose()

    return ClosingStreamingResponse(ndjson(), media_type="application/x-ndjson")


def create_app(chat: ChatModel, defaults: GenerationOptions | None = None) -> FastAPI:
    """The FastAPI app serving `chat`; `defaults`: what a request gets for the options it does not set."""
    app = FastAPI(title="llms-from-scratch Ollama-compatible server", docs_url=None, redoc_url=None,
                  openapi_url=None)
    worker = app.state.worker = ModelWorker(chat, defaults)

    @app.exception_handler(OllamaError)
    async def ollama_error(request: Request, exc: OllamaError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail).lower()}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root() -> PlainTextResponse:
        return PlainTextResponse("Ollama is running")

    @app.get("/api/version")
    async def version() -> dict:
        return {"version": VERSION}

    @app.get("/api/tags")
    async def tags() -> dict:
        size, digest = chat.file_size_and_digest()
        return {"models": [{"name": chat.name, "model": chat.name, "modified_at": _now(), "size": size,
                            "digest": digest, "details": chat.details()}]}

    @app.post("/api/show")
    async def show(request: Request) -> dict:
        _check_model(worker, await _read_json(request))
        params = worker.defaults.as_ollama()
        modelfile = f'# served by ch07.serve\nFROM {chat.source}\nTEMPLATE """{chat.template()}"""\n'
        return {"modelfile": modelfile, "parameters": "\n".join(f"{k} {v}" for k, v in params.items()),
                "template": chat.template(), "details": chat.details(), "model_info": chat.model_info(),
                "capabilities": ["completion"], "modified_at": _now()}

    @app.post("/api/generate")
    async def generate(request: Request):
        received = time.perf_counter()
        body = await _read_json(request)
        name = _check_model(worker, body)
        prompt, system = body.get("prompt") or "", body.get("system")
        if not isinstance(prompt, str) or not isinstance(system, (str, type(None))):
            raise OllamaError(400, "prompt and system must be strings")
        if not prompt:  # Ollama's way to load a model: nothing to generate
            return JSONResponse({"model": name, "created_at": _now(), "response": "", "done": True,
                                 "done_reason": "load"})
        ids, opts = _prepare(worker, body, chat.generate_prompt(prompt, system, raw=bool(body.get("raw"))))
        return await _reply(worker, body, ids, opts, received,
                            lambda text: {"model": name, "created_at": _now(), "response": text})

    @app.post("/api/chat")
    async def chat_route(request: Request):
        received = time.perf_counter()
        body = await _read_json(request)
        name = _check_model(worker, body)
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            raise OllamaError(400, "messages must be a list")
        if not messages:
            empty = {"role": "assistant", "content": ""}
            return JSONResponse({"model": name, "created_at": _now(), "message": empty, "done": True,
                                 "done_reason": "load"})
        try:
            prompt = chat.chat_prompt(messages)
        except InvalidInput as exc:
            raise OllamaError(400, str(exc)) from None
        ids, opts = _prepare(worker, body, prompt)
        return await _reply(worker, body, ids, opts, received, lambda text: {
            "model": name, "created_at": _now(), "message": {"role": "assistant", "content": text}})

    return app


# --- Command line ------------------------------------------------------------------------------

def parser(prog: str | None = None) -> Parser:
    p = Parser(prog=prog, description="Serve a GPT model of this book over the Ollama API.")
    p.add_argument("--model", required=True,
                   help="a chapter-7 fine-tuned model (.pth with its .json), a chapter-5 checkpoint.pth / "
                        "model.pth / model.safetensors or their folder, a Hugging Face GPT-2 folder, "
                        "or a GPT-2 name")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this "
                                                       "machine only; the server has no authentication)")
    p.add_argument("--port", type=whole_number(0, 65535), default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--name", default=None, help="the model's name for clients (default: from the file name)")
    p.add_argument("--prompt-style", choices=("auto", "alpaca", "phi3", "none"), default="auto",
                   help="chat prompt format (default: the one saved with a fine-tuned model, none otherwise)")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=GenerationOptions.max_new_tokens,
                   help="answer length cap in tokens when a request does not set Ollama's num_predict "
                        f"(default {GenerationOptions.max_new_tokens})")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, mps (default: best available)")
    return p


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the (slow) model load so that a busy port fails at once. Clients
    that connect before uvicorn runs wait in the backlog instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say they are
    # TCP, and without it Nagle's algorithm holds each reply's body back ~40 ms behind its headers.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:  # taken, or an address this machine does not have: the user's choice
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another server using it? "
                        "Choose another --port (or --host)") from None
    sock.listen(128)
    return sock


def main(load_chat_model: Callable[..., ChatModel], argv: list[str] | None = None, prog: str | None = None) -> int:
    """Load the model with `load_chat_model(spec, device=, name=, style=)` (the chapter's loader) and
    serve until Ctrl-C. Bad arguments, a busy port or a model that cannot be loaded: a one-line
    `error:` and exit code 2 (`llmfs.cli.run`), before anything slow when it can be known then."""
    args = parser(prog).parse_args(argv)
    # What a request gets for the options it does not set: built once, from options checked when parsed.
    defaults = GenerationOptions(max_new_tokens=args.max_new_tokens)

    def serve() -> None:
        import uvicorn

        sock = bind_socket(args.host, args.port)  # a busy port fails before the model loads
        try:
            chat = load_chat_model(args.model, device=args.device, name=args.name,
                                   style=None if args.prompt_style == "none" else args.prompt_style)
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(f"model: {chat.name} = {chat.description}; prompt style: {chat.style or 'none'}; "
                  f"device: {chat.device}; answers of at most {defaults.max_new_tokens} tokens unless a "
                  f"request sets num_predict\n"
                  f"Ollama API at http://{shown}:{port} -- point clients at it with OLLAMA_HOST={shown}:{port}",
                  file=sys.stderr, flush=True)
            if host not in ("127.0.0.1", "::1", "localhost"):
                print("warning: listening beyond this machine; the server has no authentication", file=sys.stderr)
            # On Ctrl-C, streams still running get 5 seconds, then their connections are closed.
            config = uvicorn.Config(create_app(chat, defaults), log_level="info", lifespan="off",
                                    timeout_graceful_shutdown=5)
            try:
                uvicorn.Server(config).run(sockets=[sock])
            except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down: no traceback for that
                pass
        finally:
            sock.close()

    return run(serve, argv)
