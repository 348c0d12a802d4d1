"""Chapter 7 bonus: new entries for an instruction data set, rewritten by a model behind the Ollama API.

The book's bonus notebook (`create-passive-voice-entries.ipynb`) asks GPT-4 to convert each
record's `output` into passive voice and stores the answer as a new field, `output_2`:

    {"instruction": "Identify the verb in the following sentence",
     "input": "The cat sleeps on the couch.",
     "output": "The verb in the sentence is \"sleeps.\"",
     "output_2": "The sentence is \"sleeps.\""}          <- the newly created entry

Here the model is any served over the Ollama API (Ollama itself with e.g. llama3, or this book's
own `python -m ch07.serve`), asked with `ch07.ollama_evaluate.query_model` (fixed seed,
temperature 0), so nothing leaves the machine. `--prompt` changes the rewrite (a template with
`{text}`), `--key` the field rewritten and `--new-key` the field written.

    ollama serve &  &&  ollama pull llama3
    python -m ch07.dataset_utils.create_passive_voice_entries --limit 5     # try a few first
    python -m ch07.dataset_utils.create_passive_voice_entries               # all 1,100 records

Records are appended to a JSONL file as they arrive (`ch07.ollama_evaluate.append_jsonl`, as
`ch07.dpo.preference_data` does), so Ctrl-C or a server that goes away loses at most the record in
flight, and the same command continues after the last complete line. The file is opened only after
the data, the file itself and the server have been checked, and only when it is a file of these
rewrites of this data. A reply is checked before it is kept (`check_rewrite`: not empty, not the
prompt echoed back, not the text unchanged, not runaway long); a bad one is asked for once more
with a stricter prompt, and a record whose replies stay bad is left out and counted (a rerun asks
again).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import requests

from ch07.dpo.preference_data import check_data_and_output, clean_reply, numbered_record_problem
from ch07.ollama_evaluate import (
    CHECK_TIMEOUT,
    DEFAULT_MODEL,
    OllamaUnavailable,
    add_server_arguments,
    append_jsonl,
    check_ollama,
    check_server_arguments,
    ollama_host,
    open_jsonl_output,
    query_model,
    read_jsonl_output,
    server_options,
    short_reason,
)
from llmfs.cli import Parser, path_argument, positive_int, run
from llmfs.errors import InvalidInput
from llmfs.instruction_data import read_json_file, validate_instruction_data
from llmfs.runtime import outputs_dir

# The book's prompt (its notebook, "Create JSON Entries")
PROMPT_TEMPLATE = "Without adding any response or explanation, convert the following text to passive voice: {text}"
STRICT_SUFFIX = ("\n\nYour previous reply could not be used. Reply with the converted text only: no "
                 "introduction, no explanation, no quotes.")


def make_prompt(text: str, template: str = PROMPT_TEMPLATE) -> str:
    """The request for one text: the template with `{text}` replaced (no other braces are read)."""
    return template.replace("{text}", text)


def check_rewrite(reply: str, original: str, template: str = PROMPT_TEMPLATE,
                  max_chars: int | None = None) -> tuple[str | None, str]:
    """(the usable rewrite, "") or (None, why not) for a model's reply.

    `ch07.dpo.preference_data.clean_reply` strips whitespace and one pair of quotes and refuses an
    empty reply, the original text unchanged and a runaway one (`max_chars`, default 4x the
    original + 200 characters). Here also: a reply that repeats the request (the template's words
    before `{text}`), what a model that echoes its prompt, or a tiny one, sends back.
    """
    text, why = clean_reply(reply, original, max_chars)
    if text is None:
        return None, why
    request = " ".join(template.split("{text}")[0].split()).rstrip(" :")
    if request and request.lower() in " ".join(text.split()).lower():
        return None, "the reply repeats the prompt"
    return text, ""


def ask_rewrite(text: str, model: str = DEFAULT_MODEL, host: str | None = None, template: str = PROMPT_TEMPLATE,
                options: dict | None = None, timeout: float = 300.0) -> tuple[str | None, str]:
    """A checked rewrite of `text` (or None and why), asking a second time, more strictly, after a bad reply."""
    prompt = make_prompt(text, template)
    result, why = check_rewrite(query_model(prompt, model, host=host, options=options, timeout=timeout), text, template)
    if result is None:
        result, why = check_rewrite(query_model(prompt + STRICT_SUFFIX, model, host=host, options=options,
                                                timeout=timeout), text, template)
    return result, why


# --- The JSONL file -----------------------------------------------------------------------------------------

def entry_problem(new_key: str):
    """A check for one line of the output file: why it is not a record this command writes (None: it is)."""

    def problem(record: dict) -> str | None:
        problem = numbered_record_problem(record, ("index", new_key))
        if problem:
            return problem
        if not isinstance(record[new_key], str):
            return f"{new_key!r} is not a string"
        return None

    return problem


def first_keys(new_key: str) -> tuple[str, ...]:
    """The keys a torn last line alone in the file may start with to be taken for one of ours."""
    return ("instruction", "input", "output", "index", new_key)


def records_done(path: str | Path, data: list[dict], key: str, new_key: str) -> set[int]:
    """Indices already in the output file, read without changing it; refuses a file of another kind,
    and one made from other data (a record whose `key` text is not that of the record at its index)."""
    done = set()
    for lineno, record in read_jsonl_output(path, "--output", "rewrites", entry_problem(new_key),
                                            first_keys(new_key)).records:
        index = record["index"]
        if not index < len(data) or record.get(key) != data[index][key]:
            raise InvalidInput(f"--output {path}, line {lineno}: a rewrite of other data (its index {index!r} and "
                               f"{key!r} do not match --data); choose another --output")
        done.add(index)
    return done


def create_entries(data: list[dict], output_path: str | Path, model: str = DEFAULT_MODEL, host: str | None = None,
                   key: str = "output", new_key: str = "output_2", template: str = PROMPT_TEMPLATE,
                   options: dict | None = None, timeout: float = 300.0, progress: bool = True,
                   limit: int | None = None) -> dict:
    """Append `{**record, new_key: rewrite, "index": i}` to `output_path` for every record (of the first
    `limit`) not there yet. The file may hold records beyond `limit` (from an earlier, longer run).

    A record whose text is empty is written with the empty text, without asking. Returns counts:
    {"total", "done_before", "written", "empty" (of those written), "invalid", "reasons"} ("reasons":
    why each left-out record's replies were refused, by record index). Connection errors propagate (what was
    written stays written).
    """
    from tqdm.auto import tqdm

    output_path = Path(output_path)
    total = min(limit or len(data), len(data))
    done = records_done(output_path, data, key, new_key) & set(range(total))
    todo = [i for i in range(total) if i not in done]
    summary = {"total": total, "done_before": len(done), "written": 0, "empty": 0, "invalid": 0, "reasons": {}}
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open_jsonl_output(output_path, "--output", "rewrites", entry_problem(new_key), first_keys(new_key))[1] as f:
        for i in tqdm(todo, desc="Rewriting entries", unit="entry", disable=not progress):
            if not data[i][key].strip():  # New: nothing to rewrite (e.g. an empty input); a model would invent text
                append_jsonl(f, {**data[i], new_key: data[i][key], "index": i})
                summary["written"] += 1
                summary["empty"] += 1
                continue
            text, why = ask_rewrite(data[i][key], model, host, template, options, timeout)
            if text is None:
                summary["invalid"] += 1
                summary["reasons"][i] = why
                if progress:
                    tqdm.write(f"record {i}: no usable reply ({why}); a rerun asks again")
                continue
            append_jsonl(f, {**data[i], new_key: text, "index": i})
            summary["written"] += 1
    return summary


def load_data(path: str | Path, key: str) -> list[dict]:
    """The instruction records (a JSON list), each with a string `key` to rewrite."""
    data = validate_instruction_data(read_json_file(path), source=f"--data {path}",
                                     required=sorted({"instruction", key}), optional=("input",))
    if not data:
        raise InvalidInput(f"--data {path} holds no records")
    return data


# --- Command line ------------------------------------------------------------------------------------------

def template_argument(text: str) -> str:
    if "{text}" not in text:
        raise argparse.ArgumentTypeError("must contain {text}, where each record's text goes, e.g. "
                                         "'Rewrite in simpler words: {text}'")
    return text


def parser() -> Parser:
    p = Parser(prog="python -m ch07.dataset_utils.create_passive_voice_entries",
               description="Add a rewritten field (by default: the output in passive voice, as output_2) to every "
                           "record of instruction data, with a model served over the Ollama API (chapter 7 bonus).")
    p.add_argument("--data", type=path_argument, default=None,
                   help="instruction records (JSON list; default: the chapter's instruction-data.json)")
    p.add_argument("--output", type=path_argument,
                   default=str(outputs_dir("ch07") / "instruction-data-passive-voice.jsonl"),
                   help="JSONL file the records are appended to; rerun with the same file to continue "
                        "(default outputs/ch07/instruction-data-passive-voice.jsonl)")
    p.add_argument("--key", default="output", help="the field to rewrite (default output)")
    p.add_argument("--new-key", default="output_2", help="the field the rewrite goes to (default output_2)")
    p.add_argument("--prompt", type=template_argument, default=PROMPT_TEMPLATE,
                   help="the request, with {text} where the field's text goes (default: the book's passive-voice "
                        "request)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N records")
    add_server_arguments(p, "model on the server that rewrites the texts (default llama3)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ch07.dataset_utils.create_passive_voice_entries [options]`; returns the exit code
    (2: bad input, 1: server trouble).

    Checks come first, in this order, and --output is changed only after all of them: the options,
    --data, --output (a file of these rewrites of this data, or none yet; anything else is refused
    and left as it is), then the server and the model.
    """
    p = parser()
    args = p.parse_args(argv)
    check_server_arguments(p, args)
    for option, value in (("--key", args.key), ("--new-key", args.new_key)):
        if not value.strip() or value in ("index",):
            p.error(f"argument {option}: must name a field of the records, got {value!r}")
    if args.key == args.new_key:
        p.error(f"argument --new-key: must differ from --key ({args.key!r}); the original text is kept")

    def generate() -> None:
        output = Path(args.output)
        data_path = check_data_and_output(args.data, output, "the new entries",
                                          "instruction-data-passive-voice.jsonl")
        data = load_data(data_path, args.key)
        total = min(args.limit or len(data), len(data))

        def kept() -> set[int]:  # the records of the first `total` in the file
            return records_done(output, data, args.key, args.new_key) & set(range(total))

        done = kept()
        if len(done) == total:
            print(f"{output} already holds all {total} records; nothing to do")
            return
        host = ollama_host(args.host)
        try:
            check_ollama(args.model, args.host, timeout=min(CHECK_TIMEOUT, args.timeout))
            print(f"{host}, model {args.model}: {total - len(done)} of {total} records to do -> {output}")
            try:
                summary = create_entries(data, output, args.model, args.host, args.key, args.new_key, args.prompt,
                                         options=server_options(args), timeout=args.timeout,
                                         progress=not args.no_progress, limit=total)
            except (requests.RequestException, OllamaUnavailable) as exc:
                written = len(kept()) - len(done)
                reason = short_reason(exc) if isinstance(exc, requests.RequestException) else " ".join(str(exc).split())
                raise OllamaUnavailable(f"the server at {host} stopped answering ({reason}) after {written} new "
                                        f"records; they are saved in {output}: run the same command again to "
                                        "continue.") from None
        except KeyboardInterrupt:  # Ctrl-C: one line saying what is kept (llmfs.cli.run prints it)
            saved = len(kept()) if output.exists() else 0
            raise KeyboardInterrupt(f"{saved - len(done)} new records ({saved} of {total} in all) are saved "
                                    f"in {output}; run the same command again to continue" if output.exists()
                                    else "no records were written") from None
        empty = f" ({summary['empty']} with an empty {args.key}, copied)" if summary["empty"] else ""
        print(f"{summary['written']} records written{empty}, {summary['done_before']} were there before, "
              f"{summary['invalid']} without a usable reply (rerun to ask again): {output}")

    return run(generate, argv, other_errors={OllamaUnavailable: 1})


if __name__ == "__main__":
    sys.exit(main())
