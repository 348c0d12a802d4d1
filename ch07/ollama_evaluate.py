"""Chapter 7, section 7.8: scoring a fine-tuned model's answers with a larger judge model.

For every record of a responses file (written by `ch07.gpt_instruction_finetuning`:
instruction, input, reference output and `model_response`) we ask a judge model
served by Ollama (https://ollama.com) to rate the response from 0 to 100 against
the reference, then report the average.

    ollama serve &                # start the server (the desktop app starts it too)
    ollama pull llama3            # fetch the judge model once (about 4.7 GB)
    python -m ch07.ollama_evaluate --file outputs/ch07/instruction-data-with-response.json

Talks to Ollama's REST API with `requests`: GET /api/version and /api/tags to
check the server and the model, POST /api/chat (stream false) with fixed options
(seed 123, temperature 0, num_ctx 2048) so scores are repeatable. Every request has a
deadline for the whole reply, not per read (5 s for the checks, `--timeout` for a judge's
reply, default 300 s): a server that never answers, or stalls or trickles part-way, ends
in one line naming it. Judges sometimes answer with a sentence instead of a number:
`parse_score` reads a score only on a scale it knows ("85", "Score: 92/100", "I'd give it
85 out of 100", "85%", "8.5/10" -> 85, "4.5 out of 5" -> 90, "2 points out of 3" -> 67,
"4/5 stars" -> 80); a negative or out-of-range value, a decimal or stars without a scale
("8.5", "3 stars"), or two different scores leave the reply unparsed, which triggers one
retry with a stricter prompt and is otherwise counted as unparsed.
Each score is appended to a JSONL file as it arrives (`--scores`, by default beside
the responses file), so a run stopped part-way (server gone, Ctrl-C) continues where it
stopped. That file is opened only after the responses, the file itself and the server have
been checked, and only when it is a scores file of these responses and this judge (a
last line torn by a killed run is cut off); any other file there is refused and left as it
is. `--max-new-tokens` caps the judge's replies (sent as Ollama's `num_predict`).

New: `--api openai` asks the judge through OpenAI's API instead, with the official `openai` client
(as the book's llm-instruction-eval-openai.ipynb does): OpenAI's service or any compatible server,
at `--base-url` (default http://127.0.0.1:11435/v1, where `python -m ch07.serve` answers both APIs),
with the key the client reads from $OPENAI_API_KEY (a local server needs none). The same checks
come first (GET /models: the server answers and has the judge), with the same deadlines, seed and
temperature, and no retries by the client; each score line records the API, so a scores file of the
other API's judge is refused.

    python -m ch07.ollama_evaluate --api openai --base-url https://api.openai.com/v1 --model gpt-4-turbo
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import math
import os
import re
import sys
import threading
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import IO, NamedTuple
from urllib.parse import urlsplit

import requests

from ch07.gpt_instruction_finetuning import format_input, read_json_file, validate_instruction_data
from llmfs.cli import Parser, check_output_dir, path_argument, positive_float, positive_int, run
from llmfs.errors import InvalidInput
from llmfs.runtime import outputs_dir

DEFAULT_HOST = "http://localhost:11434"
DEFAULT_PORT = 11434
DEFAULT_MODEL = "llama3"
# Deterministic judging: fixed seed, greedy decoding, and a context that fits prompt + answer.
DEFAULT_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}
CHECK_TIMEOUT = 5.0  # seconds for each check of the server (/api/version, /api/tags), all of it
CONNECT_TIMEOUT = 5.0  # seconds to open the connection, within the deadline
# New: the judge can be asked through either API; `python -m ch07.serve` answers both on one port.
APIS = ("ollama", "openai")
DEFAULT_BASE_URL = "http://127.0.0.1:11435/v1"


class OllamaUnavailable(RuntimeError):
    """The Ollama server cannot be reached, or the judge model is not installed."""


class NoReplyInTime(requests.Timeout):
    """The server did not finish its reply within the deadline (silent, or stalled part-way)."""

    def __init__(self, url: str, seconds: float):
        self.url, self.seconds = url, seconds
        super().__init__(f"no complete reply from {url} within {seconds:g} s")


def request_with_deadline(method: str, url: str, deadline: float, **kwargs) -> requests.Response:
    """`requests.request` with `deadline` seconds for the whole exchange: connection, headers and body.

    requests' own timeout bounds each read, so a server that accepts and then sends a byte now and
    then could hold a caller forever. Here the request runs in a daemon thread and the caller waits
    at most `deadline` (Ctrl-C still stops the wait); after that it gets NoReplyInTime, and the
    thread is left to end at its own read timeout (or with the process).
    """
    def exchange() -> requests.Response:
        resp = requests.request(method, url, timeout=(min(CONNECT_TIMEOUT, deadline), deadline + 1),
                                stream=True, **kwargs)
        resp.content  # the whole body, read here, within the deadline
        return resp

    return call_with_deadline(exchange, url, deadline)


def call_with_deadline(call: Callable[[], object], url: str, deadline: float):
    """`call()`'s result within `deadline` seconds, else NoReplyInTime naming `url`: the call runs in a
    daemon thread (its exceptions reach the caller), so this works for any client (the `openai` one too)."""
    box: dict = {}
    finished = threading.Event()

    def exchange() -> None:
        try:
            box["result"] = call()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=exchange, name=url, daemon=True).start()
    if not finished.wait(deadline):
        raise NoReplyInTime(url, deadline)
    if "error" in box:
        raise box["error"]
    return box["result"]


def ollama_host(host: str | None = None) -> str:
    """Base URL of the server: `host`, else $OLLAMA_HOST, else http://localhost:11434.

    Follows the Ollama CLI's rules: without a scheme, http and port 11434 are
    assumed ("127.0.0.1:11434", "localhost" -> "http://localhost:11434"); with
    a scheme, the scheme's usual port. 0.0.0.0 (the address a server *listens*
    on) is reached through 127.0.0.1.
    """
    raw = (host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST).strip()
    has_scheme = "://" in raw
    parts = urlsplit(raw if has_scheme else "http://" + raw)
    hostname = parts.hostname or "localhost"
    if hostname == "0.0.0.0":
        hostname = "127.0.0.1"
    if ":" in hostname:  # IPv6 literal
        hostname = f"[{hostname}]"
    try:
        port = parts.port
    except ValueError:
        raise InvalidInput(f"invalid Ollama host {raw!r}: the port is not a number from 0 to 65535") from None
    if port is None and not has_scheme:
        port = DEFAULT_PORT
    netloc = f"{hostname}:{port}" if port is not None else hostname
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def _start_advice(model: str) -> str:
    return (f"Start Ollama with `ollama serve` (or open the Ollama app), pull the judge model with "
            f"`ollama pull {model}`, and point OLLAMA_HOST (or --host) at the server if it is not on "
            f"{DEFAULT_HOST}. See https://ollama.com/download.")


def short_reason(exc: BaseException) -> str:
    """A short reason for a failed request, on one line (requests' messages run to several lines)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, NoReplyInTime):
        return f"no complete reply within {exc.seconds:g} s"
    if isinstance(exc, requests.ConnectionError) and "refused" in text.lower():
        return "connection refused"
    if isinstance(exc, requests.Timeout):
        return "no reply in time"
    return f"{type(exc).__name__}: {text[:200]}"


def describe_reply(resp: requests.Response) -> str:
    """What a server sent back, on one short line, for error messages: "HTTP 404: <body>".

    Trailing punctuation of the body is dropped, so the message around it can go on with its own.
    """
    text = " ".join(resp.text.split())[:120].rstrip(" .,;:")
    return f"HTTP {resp.status_code}" + (f": {text}" if text else " with an empty body")


def _get_json(url: str, timeout: float, model: str, what: str) -> dict:
    """GET `url` and return its JSON object; OllamaUnavailable saying what was answered otherwise."""
    try:
        resp = request_with_deadline("GET", url, timeout)
    except requests.RequestException as exc:
        raise OllamaUnavailable(f"No Ollama server answers at {url} ({short_reason(exc)}).\n"
                                + _start_advice(model)) from None
    if resp.status_code != 200:
        raise OllamaUnavailable(f"{url} answered {describe_reply(resp)}. Is an Ollama server running there? "
                                + _start_advice(model))
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise OllamaUnavailable(f"{url} answered {describe_reply(resp)}, not Ollama's JSON object with {what}. "
                                "Is --host / OLLAMA_HOST an Ollama server?")
    return body


def check_server(host: str | None = None, timeout: float = CHECK_TIMEOUT, model: str = DEFAULT_MODEL) -> str:
    """The server's version string; raises OllamaUnavailable when nothing answers or the answer is not Ollama's."""
    body = _get_json(f"{ollama_host(host)}/api/version", timeout, model, "a 'version'")
    return str(body.get("version", "unknown"))


def list_models(host: str | None = None, timeout: float = CHECK_TIMEOUT) -> list[str]:
    """Names of the locally installed models (GET /api/tags), e.g. ["llama3:latest"]."""
    url = f"{ollama_host(host)}/api/tags"
    models = _get_json(url, timeout, DEFAULT_MODEL, "a 'models' list").get("models", [])
    if not isinstance(models, list):
        raise OllamaUnavailable(f"{url} answered 'models': {str(models)[:80]}, not a list of models")
    return [str(m.get("name") or m.get("model", "")) for m in models if isinstance(m, dict)]


def model_available(model: str, installed: list[str]) -> bool:
    """True when `model` is installed; a name without a tag means ":latest" (as in Ollama)."""
    wanted = model if ":" in model else f"{model}:latest"
    return any(name in (model, wanted) for name in installed)


def check_ollama(model: str = DEFAULT_MODEL, host: str | None = None, timeout: float = CHECK_TIMEOUT) -> str:
    """Make sure the server answers and has `model`; return the server version.

    Each of the two requests has `timeout` seconds in all. Raises OllamaUnavailable with
    instructions otherwise.
    """
    version = check_server(host, timeout, model)
    installed = list_models(host, timeout)
    if not model_available(model, installed):
        raise OllamaUnavailable(
            f"The Ollama server at {ollama_host(host)} (version {version}) does not have the model {model!r} "
            f"(installed: {', '.join(installed) or 'none'}).\nPull it with `ollama pull {model}`, "
            "or choose an installed model with --model.")
    return version


def query_model(prompt: str, model: str = DEFAULT_MODEL, url: str | None = None, *, host: str | None = None,
                options: dict | None = None, timeout: float = 300.0) -> str:
    """One chat turn with the judge (POST /api/chat, no streaming); returns its reply text.

    Called as in the book, `query_model(prompt, model, url)`, with `url` the chat endpoint
    (default http://localhost:11434/api/chat, or $OLLAMA_HOST's); or with `host=` a server
    address as `ollama_host` reads it. `timeout` is the most seconds the whole reply may take
    (a judge generating needs minutes; a server that stalls or trickles is given up on at the
    deadline: NoReplyInTime). Raises requests' errors when the connection fails and
    OllamaUnavailable when the server answers with an error (e.g. HTTP 404 for a model it
    does not have).
    """
    if url is not None and host is not None:
        raise ValueError("give either url (the chat endpoint) or host (the server), not both")
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": False,
        "options": {**DEFAULT_OPTIONS, **(options or {})},
    }
    if url is None:
        url = f"{ollama_host(host)}/api/chat"
    elif urlsplit(url).path in ("", "/"):  # a bare server address: the chat endpoint is meant
        url = url.rstrip("/") + "/api/chat"
    resp = request_with_deadline("POST", url, timeout, json=payload)
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200 or not isinstance(body, dict) or not isinstance(body.get("message"), dict):
        detail = body.get("error") if isinstance(body, dict) and body.get("error") else describe_reply(resp)
        raise OllamaUnavailable(f"{url} answered HTTP {resp.status_code} without a chat message: "
                                f"{' '.join(str(detail).split())[:200]}")
    return str(body["message"].get("content") or "")


# --- New: the judge through OpenAI's API (the book's llm-instruction-eval-openai.ipynb) ----------------

def openai_base_url(base_url: str | None = None) -> str:
    """The OpenAI API's base URL: `base_url`, else http://127.0.0.1:11435/v1 (`python -m ch07.serve`);
    InvalidInput for one that is not http(s)://host[:port][/path]."""
    raw = (base_url or DEFAULT_BASE_URL).strip()
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"invalid OpenAI base URL {raw!r}: give http(s)://host:port/v1, "
                           f"e.g. {DEFAULT_BASE_URL} or https://api.openai.com/v1")
    try:
        parts.port
    except ValueError:
        raise InvalidInput(f"invalid OpenAI base URL {raw!r}: the port is not a number from 0 to 65535") from None
    return raw.rstrip("/")


NO_KEY = "unused"  # the key a local server gets when there is none: ours never checks it


def openai_client(base_url: str, timeout: float):
    """The official client for `base_url`, without retries. The key is the client's own (it reads
    $OPENAI_API_KEY); without one it gets a placeholder, which a local server such as ours never checks."""
    import openai  # only this path needs it: pip install openai

    try:
        return openai.OpenAI(base_url=base_url, max_retries=0, timeout=timeout)
    except openai.OpenAIError:  # no key anywhere
        return openai.OpenAI(base_url=base_url, api_key=NO_KEY, max_retries=0, timeout=timeout)


def check_openai(model: str = DEFAULT_MODEL, base_url: str | None = None, timeout: float = CHECK_TIMEOUT) -> list[str]:
    """Make sure an OpenAI-compatible server answers at `base_url` and lists `model` (GET /models, with
    the client's key, $OPENAI_API_KEY, when there is one); return the ids it lists. Raises
    OllamaUnavailable saying what is wrong."""
    base = openai_base_url(base_url)
    url = f"{base}/models"
    with openai_client(base, timeout) as client:
        key = None if client.api_key == NO_KEY else client.api_key
    try:
        resp = request_with_deadline("GET", url, timeout, headers={"Authorization": f"Bearer {key}"} if key else {})
    except requests.RequestException as exc:
        raise OllamaUnavailable(f"No OpenAI-compatible server answers at {url} ({short_reason(exc)}). Start one with "
                                f"`python -m ch07.serve --model ...` (it answers at {DEFAULT_BASE_URL}), or point "
                                "--base-url at one") from None
    if resp.status_code in (401, 403):
        raise OllamaUnavailable(f"{url} answered {describe_reply(resp)}: set OPENAI_API_KEY to a key this server "
                                "accepts")
    try:
        body = resp.json()
    except ValueError:
        body = None
    listed = body.get("data") if isinstance(body, dict) else None
    if resp.status_code != 200 or not isinstance(listed, list):
        raise OllamaUnavailable(f"{url} answered {describe_reply(resp)}, not OpenAI's list of models. Is --base-url "
                                "an OpenAI-compatible API (its base URL usually ends in /v1)?")
    ids = [str(m["id"]) for m in listed if isinstance(m, dict) and m.get("id")]
    if not model_available(model, ids):
        shown = ", ".join(ids[:8]) + (", ..." if len(ids) > 8 else "")
        raise OllamaUnavailable(f"The server at {base} does not list the model {model!r} (models: {shown or 'none'}); "
                                "choose one of its models with --model")
    return ids


def query_judge(prompt: str, model: str = DEFAULT_MODEL, *, api: str = "ollama", host: str | None = None,
                base_url: str | None = None, options: dict | None = None, timeout: float = 300.0) -> str:
    """One chat turn with the judge through Ollama's API (`query_model`) or OpenAI's (the official client).

    Both send the prompt as one user message with seed 123 and temperature 0 (`DEFAULT_OPTIONS`;
    num_ctx has no OpenAI name, num_predict travels as max_tokens), and both fail alike:
    requests' errors when the connection fails or no whole reply comes within `timeout` seconds
    (NoReplyInTime), OllamaUnavailable when the server answers with an error or without a message.
    """
    if api == "ollama":
        return query_model(prompt, model, host=host, options=options, timeout=timeout)
    if api != "openai":
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    import openai  # only this path needs it: pip install openai

    opts = {**DEFAULT_OPTIONS, **(options or {})}
    base = openai_base_url(base_url)
    url = f"{base}/chat/completions"
    limit = {"max_tokens": opts["num_predict"]} if opts.get("num_predict") is not None else {}
    with openai_client(base, timeout + 1) as client:
        try:
            reply = call_with_deadline(lambda: client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}],
                temperature=opts["temperature"], seed=opts["seed"], **limit), url, timeout)
        except openai.APITimeoutError:
            raise NoReplyInTime(url, timeout) from None
        except openai.APIConnectionError as exc:  # the same error as query_model's for a server gone away
            raise requests.ConnectionError(f"{url}: {exc.__cause__ or exc}") from None
        except openai.APIError as exc:  # an error reply, or a body that is not a chat completion
            body = exc.body if isinstance(exc.body, dict) else {}
            detail = body.get("message") or exc.message
            raise OllamaUnavailable(f"{url} answered HTTP {getattr(exc, 'status_code', 200)} without a chat message: "
                                    f"{' '.join(str(detail).split())[:200]}") from None
        except ValueError:  # the client's json.JSONDecodeError: a body that is not JSON at all
            raise OllamaUnavailable(f"{url} answered without a chat message: the reply is not JSON") from None
    try:
        content = reply.choices[0].message.content
        readable = content is None or isinstance(content, str)  # None: no text (a refusal, say)
    except (AttributeError, IndexError, KeyError, TypeError):  # a reply without choices or a message
        readable = False
    if not readable:
        raise OllamaUnavailable(f"{url} answered HTTP 200 without a chat message: "
                                f"{' '.join(str(reply).split())[:200]}")
    return content or ""


def check_if_running(process_name: str) -> bool:
    """The book's check before querying: is a process whose name contains `process_name` running?

    Uses `psutil` as the book does. `check_server` is the sturdier test (a server may run
    under another name, in a container or on another machine).
    """
    try:
        import psutil
    except ImportError:
        raise ImportError("check_if_running needs psutil (pip install psutil); "
                          "check_server() asks the server itself and needs nothing extra") from None
    return any(process_name in (proc.info["name"] or "") for proc in psutil.process_iter(["name"]))


# --- Reading a score out of the judge's reply -----------------------------------------------------
#
# A score is read only where its scale is known: a fraction ("8/10", "2 points out of 3", "4/5 stars"),
# a percentage ("85%"), or a whole number on the 0-100 scale the prompt asks for ("85", "Score: 85"),
# or on a scale the reply states ("on a scale of 1 to 10, I'd give it 8"). Anything else is unparsed
# rather than guessed: a value out of its range, a negative one, a decimal without a scale ("8.5",
# "0.85"), stars without a scale ("3 stars"), a range ("60-70"), or two different scores in one reply.

_DASH = "-\u2212\u2013\u2014"  # hyphen-minus, minus sign, en dash, em dash
_X = rf"(?P<sign>[{_DASH}])?(?<![\w./])(?P<x>\d+(?:\.\d+)?)(?!\w|\.\d)"  # a number, maybe signed
_UNIT = r"(?:points?|pts|stars?)"
# "8/10", "8.5 / 10", "4.5 out of 5", "85 (out of 100)", "2 points out of 3", "4 out of 5 stars" (not 3/4/2024)
_FRACTION = re.compile(_X + rf"(?:\s*(?P<unit>{_UNIT}))?\s*(?:/|\(?\s*\bout\s+of\b)\s*"
                       rf"(?P<scale_sign>[{_DASH}])?(?P<scale>\d+(?:\.\d+)?)(?!\w|\.\d)(?!\s*/\s*\d)"
                       rf"(?:\s*{_UNIT}\b)?", re.IGNORECASE)
_PERCENT = re.compile(_X + r"\s*%")
_STARS = re.compile(_X + r"\s*stars?\b", re.IGNORECASE)  # stars with no scale: unreadable
# "on a scale of 1 to 10", "on a scale from 0 to 100", "scale of 10", "a 10-point scale"
_STATED_SCALE = re.compile(rf"\bscale\s+(?:of|from)\s+(?:(?P<low>\d+)\s*(?:[{_DASH}]|to)\s*)?(?P<high>\d+)\b"
                           r"|\b(?P<points>\d+)[- ]point\s+scale\b", re.IGNORECASE)
# "Score: 92", "score is 92", "scored 70", "rating of 80", "I'd rate it a 75", "I would give this response 85"
_LABELLED = re.compile(
    r"\b(?:score[ds]?|rating|rate[ds]?|give|gave|giving)(?:\s+(?:it|this|that|the))?"
    r"(?:\s+(?:model response|response|answer))?(?:\s+(?:an?|as))?(?:\s+(?:score|rating))?"
    r"\s*(?:is|of|:|=|would be)?\s*\**\s*" + _X + r"(?!\s*/)", re.IGNORECASE)
_BARE = re.compile(_X + r"(?!\s*/)")  # a number alone (not half of a fraction or a date such as 3/4/2024)
_RANGE_BEFORE = re.compile(rf"\d\s*(?:[{_DASH}]|to)\s*$", re.IGNORECASE)  # "60-" or "60 to " before a number
_RANGE_AFTER = re.compile(rf"\s*(?:[{_DASH}]|to\b)\s*\d", re.IGNORECASE)  # "-70" or " to 70" after one
_HYPHENATED = re.compile(rf"[^\W\d_][{_DASH}]$")  # "GPT-4", "Llama-3": part of a name, not a number


def _kind(text: str, m: re.Match) -> str:
    """What the number in match `m` is: "negative", "range" (60-70, 60 to 70), "name" (GPT-4) or ""."""
    before, after = text[max(0, m.start("x") - 16):m.start("x")], text[m.end("x"):m.end("x") + 16]
    if _RANGE_BEFORE.search(before):
        return "range"
    if m.group("sign"):
        return "name" if _HYPHENATED.search(before) else "negative"
    return "range" if _RANGE_AFTER.match(after) else ""


def _on_scale(value: str, scale: Fraction | str) -> int | None:
    """`value` out of `scale` as a whole number of the 0-100 scale (rounded half up), None when out of range."""
    x, s = Fraction(value), Fraction(scale)
    if s <= 0 or not 0 <= x <= s:
        return None
    return math.floor(x * 100 / s + Fraction(1, 2))


def _mask(text: str, m: re.Match) -> str:
    """`text` with the match blanked out (same length, so positions stay valid)."""
    return text[:m.start()] + " " * (m.end() - m.start()) + text[m.end():]


def _decide(found: list[int | None]) -> int | None:
    """The one score all readings agree on; None when one was unreadable or two differ."""
    return found[0] if found and None not in found and len(set(found)) == 1 else None


def parse_score(text: str) -> int | None:
    """A score on the 0-100 scale read from a judge's reply, or None when there is no clear one.

    "85" -> 85; "Score: 92/100" -> 92; "I'd give it 85 out of 100." -> 85; "85%" -> 85;
    other scales are converted: "Score: 8.5/10" -> 85, "4.5 out of 5" -> 90,
    "2 points out of 3" -> 67, "4/5 stars" -> 80, "On a scale of 1 to 10, I'd give it 8" -> 80.
    Unparsed (None): "great answer!", "120", "-5", "Score: -10/10", "11/10", "8/0", "3 stars",
    "0.85" and "Score: 8.5" (decimals without a scale), "60-70", "somewhere between 60 and 70",
    "8/10, or maybe 9/10". The same score written twice ("Score: 85. Final score: 85") counts once.
    """
    if not isinstance(text, str):
        return None
    raw = text
    scales: set[Fraction | None] = set()
    for m in list(_STATED_SCALE.finditer(raw)):
        low, high = m.group("low"), m.group("high") or m.group("points")
        scales.add(Fraction(high) if low in (None, "0", "1") and int(high) > 0 else None)
        text = _mask(text, m)
    explicit: list[int | None] = []
    for pattern in (_FRACTION, _PERCENT, _STARS):
        for m in list(pattern.finditer(text)):
            kind = _kind(raw, m)
            text = _mask(text, m)
            if kind == "name":
                continue
            if kind or pattern is _STARS or (pattern is _FRACTION and m.group("scale_sign")):
                explicit.append(None)  # negative, a range, or no scale: not a score we can read
            else:
                explicit.append(_on_scale(m.group("x"), m.group("scale") if pattern is _FRACTION else 100))

    def plain(m: re.Match) -> int | None | str:
        """A number with no scale of its own: on the stated scale, else a whole number 0-100."""
        kind = _kind(raw, m)
        if kind in ("name", "range"):
            return "skip"
        if kind == "negative" or len(scales) > 1 or None in scales:
            return None
        if scales:
            return _on_scale(m.group("x"), next(iter(scales)))
        return _on_scale(m.group("x"), 100) if m.group("x").isdigit() else None

    labelled = [v for m in _LABELLED.finditer(text) if (v := plain(m)) != "skip"]
    if explicit or labelled:
        return _decide(explicit + labelled)
    return _decide([v for m in _BARE.finditer(text) if (v := plain(m)) != "skip"])


# --- Scoring a responses file ----------------------------------------------------------------------

def make_score_prompt(entry: dict, json_key: str = "model_response") -> str:
    """The judge's task for one record: the prompt, the reference answer and the model's answer."""
    return (
        f"Given the input `{format_input(entry)}` and the correct output `{entry['output']}`, "
        f"score the model response `{entry[json_key]}` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


STRICT_SUFFIX = ("\n\nYour previous reply could not be read as a score. Respond with the integer only: "
                 "one whole number from 0 to 100, with no words, symbols or explanation.")


def score_entry(entry: dict, json_key: str = "model_response", model: str = DEFAULT_MODEL,
                host: str | None = None, options: dict | None = None, timeout: float = 300.0, *,
                api: str = "ollama", base_url: str | None = None) -> int | None:
    """The judge's score for one record, asking a second time, more strictly, if the first reply has none.

    New: `api` ("ollama" or "openai", with `base_url`) picks the API the judge is asked through."""
    prompt = make_score_prompt(entry, json_key)
    judge = dict(api=api, host=host, base_url=base_url, options=options, timeout=timeout)
    score = parse_score(query_judge(prompt, model, **judge))
    if score is None:
        score = parse_score(query_judge(prompt + STRICT_SUFFIX, model, **judge))
    return score


def generate_model_scores(json_data: list[dict], json_key: str = "model_response", model: str = DEFAULT_MODEL,
                          host: str | None = None, options: dict | None = None, timeout: float = 300.0,
                          progress: bool = True, scores_path: str | os.PathLike | None = None, *,
                          api: str = "ollama", base_url: str | None = None) -> list[int | None]:
    """One score per record, None where the judge's replies held no readable score.

    With `scores_path`, each score is appended to that JSONL file as it arrives (one line per
    record), and records already scored there are not asked again: a run stopped part-way
    (server gone, Ctrl-C) continues where it stopped. A file there that is not a scores file
    of these responses and this judge (model and API) is refused (InvalidInput) and left as it is.
    """
    from tqdm.auto import tqdm

    done, log = {}, None
    if scores_path is not None:
        done = read_scores(scores_path, json_data, json_key, model, api)
        log = open_jsonl_output(scores_path, "--scores", "scores", score_row_problem)[1]
    scores = []
    try:
        for i, entry in enumerate(tqdm(json_data, desc="Scoring entries", unit="entry", disable=not progress,
                                       initial=0)):
            if i in done:
                scores.append(done[i])
                continue
            score = score_entry(entry, json_key, model, host, options, timeout, api=api, base_url=base_url)
            scores.append(score)
            if log is not None:
                append_jsonl(log, score_row(i, entry, json_key, model, score, api))
    finally:
        if log is not None:
            log.close()
    return scores


def record_id(entry: dict, json_key: str) -> str:
    """A short fingerprint of what the judge is asked about one record."""
    text = json.dumps([entry.get("instruction"), entry.get("input"), entry.get("output"), entry.get(json_key)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def default_scores_path(responses: str | os.PathLike, model: str = DEFAULT_MODEL, api: str = "ollama") -> Path:
    """Where the scores of `responses` by judge `model` are kept: beside it, e.g. `x.scores-llama3.jsonl`
    (New: `x.scores-openai-gpt-4-turbo.jsonl` for a judge asked through OpenAI's API)."""
    path = Path(responses)
    judge = model if api == "ollama" else f"{api}-{model}"
    return path.with_name(f"{path.stem}.scores-{re.sub(r'[^A-Za-z0-9_.-]+', '_', judge)}.jsonl")


def score_row(index: int, entry: dict, json_key: str, model: str, score: int | None, api: str = "ollama") -> dict:
    """The line `generate_model_scores` writes for one record; New: "api" is written for a judge asked through
    OpenAI's API (a line without it is Ollama's, as in files written before there was a choice)."""
    row = {"index": index, "record": record_id(entry, json_key), "model": model, "score": score}
    return row if api == "ollama" else {**row, "api": api}


SCORE_KEYS = ("index", "record", "model", "score")


def score_row_problem(row: dict) -> str | None:
    """Why `row` is not a line `generate_model_scores` writes (None: it is one)."""
    missing = [key for key in SCORE_KEYS if key not in row]
    if missing:
        return f"a JSON object without {', '.join(map(repr, missing))}"
    index, score = row["index"], row["score"]
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        return f"'index' is {index!r}, not a record number"
    if not isinstance(row["record"], str) or not isinstance(row["model"], str):
        return "'record' and 'model' are not strings"
    if score is not None and (not isinstance(score, int) or isinstance(score, bool) or not 0 <= score <= 100):
        return f"'score' is {score!r}, not a whole number from 0 to 100 or null"
    if row.get("api", "ollama") not in APIS:
        return f"'api' is {row['api']!r}, not one of {', '.join(APIS)}"
    return None


def read_scores(path: str | os.PathLike, json_data: list[dict], json_key: str, model: str,
                api: str = "ollama") -> dict[int, int | None]:
    """The scores already in a JSONL file written by `generate_model_scores`: {record index: score}.

    Reads without changing the file (a last line cut short by a crash is skipped here, and cut off
    when the file is next opened to append). A file that is not a scores file raises InvalidInput;
    so do scores of other responses or another judge (New: the same model asked through the other
    API counts as another judge): the file belongs to another run.
    """
    done = {}
    for n, row in read_jsonl_output(path, "--scores", "scores", score_row_problem).records:
        i = row["index"]
        if row.get("api", "ollama") != api:
            raise InvalidInput(f"{path} holds scores of another judge ({row['model']} through the "
                               f"{row.get('api', 'ollama')} API, line {n}; this run asks {model} through the {api} "
                               "API); delete it or choose another --scores file")
        if row["model"] != model or not i < len(json_data) or row["record"] != record_id(json_data[i], json_key):
            raise InvalidInput(f"{path} holds scores of other responses or another judge (line {n}); delete it "
                               "or choose another --scores file")
        done[i] = row["score"]
    return done


# --- Output files a rerun continues (the scores here, ch07.dpo.preference_data's pairs) ------------------

class JsonlOutput(NamedTuple):
    """What `read_jsonl_output` found: the records (with their line numbers) and how to continue the file."""

    records: list[tuple[int, dict]]
    keep: int  # bytes of whole lines; a torn last line after them is cut off before appending
    size: int
    add_newline: bool  # the last record is whole but its newline is missing


def _json_kind(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "true/false", type(None): "null"}.get(
        type(value), "number")


def is_torn_record(fragment: bytes, fragment_keys: tuple[str, ...], after_records: bool) -> bool:
    """Whether a last line without its newline is the start of a record json.dumps was writing.

    It must be UTF-8 (its last character may be cut), start with '{"' and hold no control
    characters. Alone in the file, it must also name one of `fragment_keys` as its first key:
    a one-line file of someone else's is not taken for a torn record.
    """
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(fragment, final=False)
    except UnicodeDecodeError:
        return False
    if not text.startswith('{"') or any(ord(c) < 0x20 for c in text):
        return False
    first_key = re.match(r'\{"([^"\\]*)"', text)
    return after_records or (first_key is not None and first_key.group(1) in fragment_keys)


def read_jsonl_output(path: str | os.PathLike, option: str, kind: str, problem: Callable[[dict], str | None],
                      fragment_keys: tuple[str, ...] = SCORE_KEYS) -> JsonlOutput:
    """The records of a JSONL file a command appends to, read without changing the file.

    The file must be one the command writes: UTF-8 lines, each a JSON object that `problem`
    accepts (it returns why not, or None); blank lines are skipped. A last line without its
    newline is what a killed write leaves: a whole record there is kept, the start of one
    (see `is_torn_record`) is to be cut off. Anything else, a folder or a file that is not a
    regular file raises a one-line error naming `option` and the file, which stays as it is.
    A missing file has no records.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return JsonlOutput([], 0, 0, False)
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder; give the .jsonl file to append the {kind} to")
    if not path.is_file():
        raise InvalidInput(f"{option} {path} is not a regular file; give the .jsonl file to append the {kind} to")
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{option} {path} cannot be written; choose another {option} file")
    raw = path.read_bytes()

    def refuse(lineno: int, why: str) -> InvalidInput:
        return InvalidInput(f"{option} {path} is not a {kind} file of this command (line {lineno}: {why}); it was "
                            f"left as it is: choose another {option} file")

    def parse(lineno: int, line: bytes) -> dict:
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise refuse(lineno, "not UTF-8 text") from None
        except ValueError:
            raise refuse(lineno, "not JSON") from None
        if not isinstance(record, dict):
            raise refuse(lineno, f"a JSON {_json_kind(record)}, not an object")
        why = problem(record)
        if why:
            raise refuse(lineno, why)
        return record

    *lines, tail = raw.split(b"\n")
    records, keep = [], 0
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            records.append((lineno, parse(lineno, line)))
        keep += len(line) + 1
    if not tail.strip():
        return JsonlOutput(records, len(raw), len(raw), False)
    lineno = len(lines) + 1
    try:
        whole = json.loads(tail.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        whole = None
    if isinstance(whole, dict):
        records.append((lineno, parse(lineno, tail)))
        return JsonlOutput(records, len(raw), len(raw), True)
    if whole is not None or not is_torn_record(tail, fragment_keys, bool(records)):
        raise refuse(lineno, "neither a whole record nor the start of one")
    return JsonlOutput(records, keep, len(raw), False)


def open_jsonl_output(path: str | os.PathLike, option: str, kind: str, problem: Callable[[dict], str | None],
                      fragment_keys: tuple[str, ...] = SCORE_KEYS) -> tuple[JsonlOutput, IO[str]]:
    """Open a file `read_jsonl_output` accepts for appending, after cutting off a torn last line
    (or finishing a whole last record's line). Call it only once the inputs and the server have been
    checked: it is the first change to the file."""
    found = read_jsonl_output(path, option, kind, problem, fragment_keys)
    if found.keep < found.size:
        with open(path, "r+b") as f:
            f.truncate(found.keep)
            os.fsync(f.fileno())
    log = open(path, "a", encoding="utf-8")
    if found.add_newline:
        log.write("\n")
        log.flush()
    return found, log


def append_jsonl(f: IO[str], record: dict) -> None:
    """One record as one line, on disk before the next request goes out."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (through links too); paths that do not exist are compared as paths."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def summarize_scores(scores: list[int | None]) -> dict:
    """Average over the readable scores, plus how many were and were not readable."""
    valid = [s for s in scores if s is not None]
    return {"average": sum(valid) / len(valid) if valid else None, "num_scored": len(valid),
            "num_unparsed": len(scores) - len(valid), "num_entries": len(scores)}


def load_responses(path: str | os.PathLike, json_key: str = "model_response") -> list[dict]:
    """Read and validate a responses file: records with instruction, output and `json_key` strings."""
    return validate_instruction_data(read_json_file(path), source=str(path),
                                     required=("instruction", "output", json_key))


# --- Command line ------------------------------------------------------------------------------------

def add_server_arguments(p: argparse.ArgumentParser, model_help: str) -> None:
    """The options of a command that asks a model behind the Ollama API (this one and
    `ch07.dpo.preference_data`): the same names for the same things."""
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--host", default=None,
                   help=f"Ollama server (default $OLLAMA_HOST or {DEFAULT_HOST}); '127.0.0.1:11434' works too")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="cap on each reply's length in tokens (default: the server's)")
    p.add_argument("--timeout", type=positive_float, default=300.0,
                   help="the most seconds one reply may take, all of it (default 300; the server checks before "
                        f"the work take at most {CHECK_TIMEOUT:g} s each)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_server_arguments(p: Parser, args: argparse.Namespace) -> None:
    """One-line parser errors for an empty --model and a malformed --host, before anything is read."""
    if not args.model.strip():
        p.error("argument --model: must name a model on the server, e.g. llama3")
    try:
        ollama_host(args.host)
    except ValueError as exc:
        p.error(f"argument --host: {exc}")


def server_options(args: argparse.Namespace) -> dict | None:
    """The request options the command line sets (--max-new-tokens travels as Ollama's num_predict)."""
    return {"num_predict": args.max_new_tokens} if args.max_new_tokens is not None else None


def parser() -> Parser:
    p = Parser(prog="python -m ch07.ollama_evaluate",
               description="Score a fine-tuned model's responses 0-100 with a judge model behind Ollama's API "
                           "(or OpenAI's: --api openai).")
    p.add_argument("--file", default=str(outputs_dir("ch07") / "instruction-data-with-response.json"),
                   help="JSON list of records with instruction, input, output and model_response")
    p.add_argument("--key", default="model_response", help="which field holds the answer to score")
    p.add_argument("--scores", type=path_argument, default=None,
                   help="JSONL file the scores are appended to as they arrive; a rerun continues from it "
                        "(default: beside --file, e.g. instruction-data-with-response.scores-llama3.jsonl)")
    add_server_arguments(p, "judge model on the server (default llama3)")
    # New: the book's second notebook asks GPT-4 through OpenAI's API; any OpenAI-compatible server works.
    p.add_argument("--api", choices=APIS, default="ollama",
                   help="the API the judge is asked through: ollama (--host) or openai (--base-url, key in "
                        "$OPENAI_API_KEY; default ollama)")
    p.add_argument("--base-url", default=None,
                   help=f"with --api openai: the API's base URL (default {DEFAULT_BASE_URL}, "
                        "where `python -m ch07.serve` answers; OpenAI's: https://api.openai.com/v1)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    check_server_arguments(p, args)
    if not args.key.strip():
        p.error("argument --key: must name the field that holds the answers")
    if args.api == "ollama" and args.base_url is not None:
        p.error("argument --base-url: is for --api openai; Ollama's server is --host")
    if args.api == "openai":
        if args.host is not None:
            p.error("argument --host: is Ollama's server; with --api openai give --base-url")
        if args.base_url is not None and not args.base_url.strip():
            p.error(f"argument --base-url: must be the API's base URL, e.g. {DEFAULT_BASE_URL}")
        try:
            openai_base_url(args.base_url)
        except InvalidInput as exc:
            p.error(f"argument --base-url: {exc}")
        try:
            import openai  # noqa: F401
        except ImportError:
            p.error("argument --api: openai needs the official client: pip install openai")
    return args


def main(argv=None) -> int:
    """`python -m ch07.ollama_evaluate [options]`; returns the exit code (2: bad input, 1: server trouble).

    Checks come first, in this order, and the scores file is changed only after all of them: the
    responses file, the scores file (a scores file of these responses and this judge, or none yet;
    anything else is refused and left as it is), then the server and the judge model.
    """
    args = parse_args(argv)

    def evaluate():
        path = Path(args.file)
        if path.is_dir():
            raise IsADirectoryError(f"--file {path} is a folder; give the responses file (a JSON list)")
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; create it with `python -m ch07.gpt_instruction_finetuning` "
                                    "(or --quick)")
        data = load_responses(path, args.key)
        default = default_scores_path(path, args.model, args.api)
        scores_path = Path(args.scores) if args.scores else default
        if same_file(scores_path, path):
            raise InvalidInput(f"--scores {scores_path} is the responses file (--file); the scores go to a file of "
                               f"their own, e.g. {default}")
        done = read_scores(scores_path, data, args.key, args.model, args.api)
        check_output_dir(scores_path.parent, option="--scores")
        check_timeout = min(CHECK_TIMEOUT, args.timeout)
        host = openai_base_url(args.base_url) if args.api == "openai" else ollama_host(args.host)
        try:
            if args.api == "openai":  # New: the judge behind OpenAI's API
                check_openai(args.model, args.base_url, timeout=check_timeout)
                server = f"OpenAI API at {host}"
            else:
                server = f"Ollama {check_ollama(args.model, args.host, timeout=check_timeout)} at {host}"
            print(f"{server}; judge: {args.model}; {len(data)} entries"
                  + (f"; {len(done)} already scored in {scores_path}" if done else ""))
            try:
                scores = generate_model_scores(data, args.key, args.model, args.host, options=server_options(args),
                                               timeout=args.timeout, progress=not args.no_progress,
                                               scores_path=scores_path, api=args.api, base_url=args.base_url)
            except (requests.RequestException, OllamaUnavailable) as exc:
                kept = len(read_scores(scores_path, data, args.key, args.model, args.api))
                name = "Ollama server" if args.api == "ollama" else "OpenAI-compatible server"
                reason = (f"The {name} at {host} stopped answering ({short_reason(exc)})"
                          if isinstance(exc, requests.RequestException) else one_line_reason(exc))
                raise OllamaUnavailable(f"{reason}; {kept} of {len(data)} scores are kept in {scores_path}: rerun "
                                        "the same command to continue") from None
        except KeyboardInterrupt:  # Ctrl-C: one line saying what is kept (llmfs.cli.run prints it)
            kept = len(read_scores(scores_path, data, args.key, args.model, args.api))
            raise KeyboardInterrupt(f"{kept} of {len(data)} scores are saved in {scores_path}; run the same command "
                                    "again to continue" if scores_path.exists() else "no scores were written") from None
        summary = summarize_scores(scores)
        print(f"Number of scores: {summary['num_scored']} of {summary['num_entries']}")
        if summary["average"] is not None:
            print(f"Average score: {summary['average']:.2f}")
        print(f"Replies that could not be parsed: {summary['num_unparsed']}")
        print(f"scores: {scores_path}")

    return run(evaluate, argv, other_errors={OllamaUnavailable: 1})


def one_line_reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
