"""Chapter 7 bonus: generating instruction data with a local chat model over the Ollama API (the Magpie trick).

The book's bonus notebook ("Generating Instruction-Response Pair via Llama 3 and Ollama") follows
Magpie (Xu et al., 2024, https://arxiv.org/abs/2406.08464): give an instruction-tuned chat model
nothing but the start of a user turn of its chat template, and it goes on writing what a user
would ask, an instruction nobody wrote. Asked that instruction as an ordinary chat, it writes the
response. Each pair becomes a record like chapter 7's: {"instruction", "input": "", "output"}.

    ollama serve &                  # or open the Ollama app
    ollama pull llama3
    python -m ch07.data_generation.generate_instruction_data --num-samples 5
    python -m ch07.serve --model outputs/ch07/quick-sft.pth &      # or chapter 7's own server:
    python -m ch07.data_generation.generate_instruction_data --host 127.0.0.1:11435 --model quick-sft \\
        --template alpaca

The instruction comes from POST /api/generate with "raw": true and the template prefix
(`TEMPLATES`, chosen with --template) as the whole prompt, so the server adds no template of its
own and the model sees exactly the prefix (the book sends the prefix as a chat message, which a
server wraps in its template first). The response comes from `ch07.ollama_evaluate.query_model`
(POST /api/chat), as in the book. Sampling is the book's (temperature 1, top_p 1, seed 123, sent
here as Ollama options); each sample gets the seed --seed + its number, so the samples are
repeatable and a rerun asks exactly what the first run asked.

What the model returns is checked before it is kept (`check_instruction`, `check_response`): the
instruction is the reply's first non-empty line (the book's `extract_instruction`) and must not be
empty, not longer than --max-instruction-chars, not echo a chat template's markers, have at least
three words and mostly letters, and look like a question or a request (it ends with "?", starts
with a question word or an imperative verb from `REQUEST_WORDS`, or holds a phrase such as "can
you" or "I need" from `REQUEST_PHRASES`); the response must not be empty, not echo a template, not
repeat the instruction and not be longer than --max-response-chars. A reply that is no Ollama JSON
at all (HTTP 200 with another body) is rejected the same way. Rejected samples are counted by
reason and not written; a rerun asks for them again (with the same --seed a deterministic server
gives the same reply: pass another --seed to draw new ones).

Records are appended to a JSONL file as they arrive (`ch07.ollama_evaluate.append_jsonl`): one line
each, with its sample number ("index"), the template, the model and the seed. An interrupted run
(Ctrl-C, server gone) keeps every finished line, and the same command continues with the samples
that are missing. The file is opened only after it and the server have been checked, and only when
it is a file of this command made with the same template; anything else is refused, left as it is.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import requests

from ch07.dpo.preference_data import numbered_record_problem
from ch07.gpt_instruction_finetuning import ALPACA_PREAMBLE
from ch07.ollama_evaluate import (
    CHECK_TIMEOUT,
    DEFAULT_MODEL,
    OllamaUnavailable,
    add_server_arguments,
    append_jsonl,
    check_ollama,
    check_server_arguments,
    describe_reply,
    ollama_host,
    open_jsonl_output,
    query_model,
    read_jsonl_output,
    request_with_deadline,
    server_options,
    short_reason,
)
from llmfs.cli import Parser, check_output_dir, non_negative_float, path_argument, positive_int, run
from llmfs.errors import InvalidInput
from llmfs.runtime import outputs_dir

# The start of a user turn in a chat template: the whole prompt the model continues.
TEMPLATES = {
    # the book's query: Llama 3's template up to the user's message
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>",
    # New: chapter 7's Alpaca format up to the instruction, for the models the chapter tunes (ch07.serve's)
    "alpaca": f"{ALPACA_PREAMBLE}\n\n### Instruction:\n",
    # New: exercise 7.1's Phi-3 format
    "phi3": "<|user|>\n",
}
# Pieces of these templates (and GPT-2's end of text): a reply that holds one echoes a template.
TEMPLATE_MARKERS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                    "### Instruction:", "### Input:", "### Response:", ALPACA_PREAMBLE[:40],
                    "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")
# The book's sampling (its query_model sends them as top-level fields, which Ollama ignores; here: options).
DEFAULT_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "seed": 123}
MAX_INSTRUCTION_CHARS = 500
MAX_RESPONSE_CHARS = 8000

# An instruction that starts with one of these words is a question or an imperative request.
REQUEST_WORDS = frozenset("""
    what who whom whose when where why which how is are am was were do does did can could would should will
    shall may might have has explain describe write list give name create generate summarize summarise translate
    compare provide suggest tell find identify classify calculate convert rewrite edit design develop help define
    make plan recommend analyze analyse outline draft imagine evaluate choose solve sort correct show brainstorm
    """.split())
REQUEST_PHRASES = ("please", "can you", "could you", "would you", "help me", "i need", "i want", "i'd like",
                   "i would like", "i'm looking for", "i am looking for", "i'm trying", "i am trying", "tell me",
                   "show me", "i've been wondering", "i wonder")


class MalformedReply(ValueError):
    """The server answered HTTP 200, but not with Ollama's JSON: counted as a bad reply, not kept."""


# --- Asking the model ---------------------------------------------------------------------------------

def generate_raw(prompt: str, model: str = DEFAULT_MODEL, host: str | None = None, options: dict | None = None,
                 timeout: float = 300.0) -> str:
    """The model's continuation of `prompt`, sent as is (POST /api/generate, "raw": true, no streaming).

    raw: the server adds no template, so a chat model sees only `prompt` (a template prefix here).
    Raises requests' errors when the connection fails (`timeout`: seconds for the whole reply),
    OllamaUnavailable when the server answers with an error, MalformedReply for HTTP 200 without
    Ollama's {"response": "..."}.
    """
    url = f"{ollama_host(host)}/api/generate"
    payload = {"model": model, "prompt": prompt, "raw": True, "stream": False, "options": dict(options or {})}
    resp = request_with_deadline("POST", url, timeout, json=payload)
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200:
        detail = body.get("error") if isinstance(body, dict) and body.get("error") else describe_reply(resp)
        raise OllamaUnavailable(f"{url} answered HTTP {resp.status_code}: {' '.join(str(detail).split())[:200]}")
    if not isinstance(body, dict) or not isinstance(body.get("response"), str):
        raise MalformedReply(f"{describe_reply(resp)}, not Ollama's JSON with a 'response' text")
    return body["response"]


def ask_chat(prompt: str, model: str = DEFAULT_MODEL, host: str | None = None, options: dict | None = None,
             timeout: float = 300.0) -> str:
    """`query_model` (one user message, POST /api/chat); HTTP 200 without a chat message is a MalformedReply."""
    try:
        return query_model(prompt, model, host=host, options=options, timeout=timeout)
    except OllamaUnavailable as exc:
        if " answered HTTP 200 without a chat message" in str(exc):  # query_model's words for a bad body
            raise MalformedReply(" ".join(str(exc).split())) from None
        raise


# --- Checking what the model wrote ------------------------------------------------------------------

def extract_instruction(text: str) -> str | None:
    """The book's rule: the instruction is the first non-empty line of the reply."""
    for content in text.split("\n"):
        if content.strip():  # New: a line of spaces is empty too
            return content.strip()
    return None


def echoes_template(text: str) -> bool:
    return any(marker in text for marker in TEMPLATE_MARKERS)


def looks_like_request(text: str) -> bool:
    """A question or a request: ends with "?", starts with a REQUEST_WORDS word, or holds a REQUEST_PHRASES phrase."""
    lowered = text.lower()
    first = re.sub(r"[^a-z']", "", lowered.split()[0]) if lowered.split() else ""
    return text.rstrip().endswith("?") or first in REQUEST_WORDS or any(p in lowered for p in REQUEST_PHRASES)


def check_instruction(reply: str, max_chars: int = MAX_INSTRUCTION_CHARS) -> tuple[str | None, str]:
    """(the instruction, "") or (None, why not) for a reply to a template prefix (rules: module docstring)."""
    instruction = extract_instruction(reply or "")
    if not instruction:
        return None, "empty"
    if echoes_template(instruction):
        return None, "echoes the template"
    if len(instruction) > max_chars:
        return None, "too long"
    non_space = [c for c in instruction if not c.isspace()]
    if len(instruction.split()) < 3 or sum(c.isalpha() for c in non_space) < 0.6 * len(non_space):
        return None, "not text (under 3 words or mostly not letters)"
    if not looks_like_request(instruction):
        return None, "not a question or request"
    return instruction, ""


def check_response(reply: str, instruction: str, max_chars: int = MAX_RESPONSE_CHARS) -> tuple[str | None, str]:
    """(the response, "") or (None, why not): not empty, no template echo, not the instruction, not runaway long."""
    response = (reply or "").strip()
    if not response:
        return None, "empty"
    if echoes_template(response):
        return None, "echoes the template"
    if response == instruction.strip():
        return None, "repeats the instruction"
    if len(response) > max_chars:
        return None, "too long"
    return response, ""


def generate_sample(template: str = "llama3", model: str = DEFAULT_MODEL, host: str | None = None,
                    options: dict | None = None, timeout: float = 300.0, max_instruction_chars: int = MAX_INSTRUCTION_CHARS,
                    max_response_chars: int = MAX_RESPONSE_CHARS) -> tuple[dict | None, str]:
    """One record {"instruction", "input": "", "output"} and "", or None and why (e.g. "instruction: empty")."""
    try:
        reply = generate_raw(TEMPLATES[template], model, host, options, timeout)
    except MalformedReply:
        return None, "instruction: not Ollama's JSON"
    instruction, why = check_instruction(reply, max_instruction_chars)
    if instruction is None:
        return None, f"instruction: {why}"
    try:
        reply = ask_chat(instruction, model, host, options, timeout)
    except MalformedReply:
        return None, "response: not Ollama's JSON"
    response, why = check_response(reply, instruction, max_response_chars)
    if response is None:
        return None, f"response: {why}"
    return {"instruction": instruction, "input": "", "output": response}, ""


# --- The JSONL file ------------------------------------------------------------------------------------

RECORD_KEYS = ("index", "instruction", "input", "output", "template", "model", "seed")


def record_problem(record: dict) -> str | None:
    """Why `record` is not a line `generate_instruction_data` writes (None: it is one)."""
    problem = numbered_record_problem(record, RECORD_KEYS, "sample number")
    if problem:
        return problem
    if not all(isinstance(record[key], str) for key in ("instruction", "input", "output", "template", "model")):
        return "'instruction', 'input', 'output', 'template' and 'model' are not all strings"
    return None


def samples_done(path: str | os.PathLike, template: str) -> set[int]:
    """Sample numbers already in the file, read without changing it; a file of another kind, or made with
    another template, raises a one-line error (InvalidInput) and is left as it is."""
    done = set()
    for lineno, record in read_jsonl_output(path, "--output", "generated-instructions", record_problem,
                                            RECORD_KEYS).records:
        if record["template"] != template:
            raise InvalidInput(f"--output {path} holds records made with --template {record['template']} (line "
                               f"{lineno}), not {template}; choose another --output file")
        done.add(record["index"])
    return done


def reasons_text(reasons: collections.Counter) -> str:
    return ", ".join(f"{why}: {n}" for why, n in sorted(reasons.items())) or "none"


def generate_instruction_data(num_samples: int, output_path: str | os.PathLike, model: str = DEFAULT_MODEL,
                              host: str | None = None, template: str = "llama3", temperature: float = 1.0,
                              top_p: float = 1.0, seed: int = 123, options: dict | None = None,
                              timeout: float = 300.0, max_instruction_chars: int = MAX_INSTRUCTION_CHARS,
                              max_response_chars: int = MAX_RESPONSE_CHARS, progress: bool = True) -> dict:
    """Append a record to `output_path` for every sample number below `num_samples` not there yet.

    Returns counts: {"total", "done_before", "written", "invalid", "reasons" (a Counter of why samples
    were rejected)}. Connection errors propagate (what was written stays written).
    """
    from tqdm.auto import tqdm

    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {tuple(TEMPLATES)}, got {template!r}")
    output_path = Path(output_path)
    done = samples_done(output_path, template)
    todo = [i for i in range(num_samples) if i not in done]
    summary = {"total": num_samples, "done_before": num_samples - len(todo), "written": 0, "invalid": 0,
               "reasons": collections.Counter()}
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open_jsonl_output(output_path, "--output", "generated-instructions", record_problem, RECORD_KEYS)[1] as f:
        for i in tqdm(todo, desc="Generating", unit="sample", disable=not progress):
            sampling = {"temperature": temperature, "top_p": top_p, "seed": seed + i}
            entry, why = generate_sample(template, model, host, {**sampling, **(options or {})}, timeout,
                                         max_instruction_chars, max_response_chars)
            if entry is None:
                summary["invalid"] += 1
                summary["reasons"][why] += 1
                continue
            append_jsonl(f, {"index": i, **entry, "template": template, "model": model, "seed": seed + i})
            summary["written"] += 1
    return summary


# --- Command line (shared with ch07.data_generation.reflection) -------------------------------------

def run_against_server(args: argparse.Namespace, output: Path, done: Callable[[], int], total: int,
                       work: Callable[[], dict], what: str = "records") -> dict | None:
    """Check the server and the model, then `work()`; a lost server or Ctrl-C becomes one line that says
    how many records are kept in `output` (`done()` counts them) and how to continue."""
    before = done()
    if before >= total:
        print(f"{output} already holds all {total} {what}; nothing to do")
        return None
    host = ollama_host(args.host)
    try:
        check_ollama(args.model, args.host, timeout=min(CHECK_TIMEOUT, args.timeout))
        print(f"{host}, model {args.model}: {total - before} of {total} {what} to do -> {output}")
        try:
            return work()
        except (requests.RequestException, OllamaUnavailable) as exc:
            written = done() - before
            reason = short_reason(exc) if isinstance(exc, requests.RequestException) else " ".join(str(exc).split())
            raise OllamaUnavailable(f"the server at {host} stopped answering ({reason}) after {written} new {what}; "
                                    f"they are saved in {output}: run the same command again to continue.") from None
    except KeyboardInterrupt:  # Ctrl-C: one line saying what is kept (llmfs.cli.run prints it)
        kept = done()
        raise KeyboardInterrupt(f"{kept - before} new {what} ({kept} of {total} in all) are saved in {output}; run "
                                "the same command again to continue" if output.exists()
                                else f"no {what} were written") from None


def check_output_file(output: Path) -> None:
    """One-line errors for an --output that is a folder or sits in a folder that cannot be written."""
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a folder; give the .jsonl file to append to")
    check_output_dir(output.parent, option="--output")


def probability(text: str) -> float:
    value = non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number with 0 < p <= 1, got {text}")
    return value


def parser() -> Parser:
    p = Parser(prog="python -m ch07.data_generation.generate_instruction_data",
               description="Generate instruction-response records with a chat model served over the Ollama API "
                           "(the Magpie trick; chapter 7 bonus).")
    p.add_argument("--num-samples", type=positive_int, default=5,
                   help="how many records the file should hold (sample numbers 0 .. N-1; default 5, the book's)")
    p.add_argument("--output", type=path_argument,
                   default=str(outputs_dir("ch07") / "instruction-data-generated.jsonl"),
                   help="JSONL file the records are appended to; rerun with the same file to continue "
                        "(default outputs/ch07/instruction-data-generated.jsonl)")
    p.add_argument("--template", choices=tuple(TEMPLATES), default="llama3",
                   help="whose chat template's user-turn prefix is the prompt (default llama3, the book's; "
                        "alpaca: chapter 7's format, for models tuned on it; phi3: exercise 7.1's)")
    p.add_argument("--temperature", type=non_negative_float, default=DEFAULT_SAMPLING["temperature"],
                   help="sampling temperature (default 1, the book's: varied instructions)")
    p.add_argument("--top-p", type=probability, default=DEFAULT_SAMPLING["top_p"],
                   help="nucleus sampling mass, 0 < p <= 1 (default 1)")
    p.add_argument("--seed", type=int, default=DEFAULT_SAMPLING["seed"],
                   help="sample i is drawn with seed SEED + i (default 123)")
    p.add_argument("--max-instruction-chars", type=positive_int, default=MAX_INSTRUCTION_CHARS,
                   help=f"longer instructions are rejected (default {MAX_INSTRUCTION_CHARS})")
    p.add_argument("--max-response-chars", type=positive_int, default=MAX_RESPONSE_CHARS,
                   help=f"longer responses are rejected (default {MAX_RESPONSE_CHARS})")
    add_server_arguments(p, "chat model on the server (default llama3)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ch07.data_generation.generate_instruction_data [options]`; returns the exit code (2: bad
    input, 1: server trouble). --output is checked first (a file of this command with this template, or
    none yet), then the server and the model; the file is changed only after all of them."""
    p = parser()
    args = p.parse_args(argv)
    check_server_arguments(p, args)

    def generate() -> None:
        output = Path(args.output)
        check_output_file(output)

        def done() -> int:
            return len({i for i in samples_done(output, args.template) if i < args.num_samples})

        summary = run_against_server(args, output, done, args.num_samples, lambda: generate_instruction_data(
            args.num_samples, output, args.model, args.host, args.template, args.temperature, args.top_p, args.seed,
            server_options(args), args.timeout, args.max_instruction_chars, args.max_response_chars,
            progress=not args.no_progress))
        if summary is not None:
            print(f"{summary['written']} records written, {summary['done_before']} were there before, "
                  f"{summary['invalid']} rejected ({reasons_text(summary['reasons'])}; a rerun asks again): {output}")

    return run(generate, argv, other_errors={OllamaUnavailable: 1})


if __name__ == "__main__":
    sys.exit(main())
