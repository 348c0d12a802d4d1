"""Chapter 7 bonus: making preference data for DPO with a local model served over the Ollama API.

The book's bonus material builds `instruction-data-with-preference.json` from the
chapter's instruction data: for every record it asks a larger model (Llama 3 through
Ollama) to rewrite the reference answer slightly more *polite* or more *impolite*
(drawn at random per record). A polite rewrite becomes the chosen answer and the
original the rejected one; an impolite rewrite becomes the rejected answer and the
original the chosen one. With `both=True` (`--both`) both rewrites are requested
and the original answer is not used.

    ollama serve &                 # or the Ollama app; or `python -m ch07.serve --model ...`
    ollama pull llama3
    python -m ch07.dpo.preference_data        # appends to outputs/ch07/instruction-data-with-preference.jsonl
    python -m ch07.dpo --model outputs/ch07/gpt2-medium-sft.pth --data outputs/ch07/instruction-data-with-preference.jsonl

The requests are plain Ollama API calls (GET /api/version and /api/tags to check the server
and the model, POST /api/chat with a fixed seed and temperature 0) made by
`ch07.ollama_evaluate.query_model`, so any Ollama-compatible server works; `--max-new-tokens`
caps each reply (sent as Ollama's `num_predict`) and `--timeout` bounds the time a whole reply
may take. Records are appended to a JSONL file as they arrive (one line each, flushed to disk),
so an interrupted run (server gone, Ctrl-C) loses at most the record in flight; running the
same command again continues after the last complete line. The file is opened only after the
data, the file itself and the server have been checked, and only when it is a preference-pairs
file of this data (a last line torn by a killed run is cut off); any other file is refused and
left as it is. A reply is checked before it is kept (not empty, not the prompt echoed back, not
the original answer unchanged, not runaway long); a bad one is asked for once more with a
stricter prompt, and a record whose replies stay bad is left out (a rerun tries it again).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import requests

from ch07.gpt_instruction_finetuning import format_input, load_instruction_data
from ch07.ollama_evaluate import (
    CHECK_TIMEOUT,
    DEFAULT_MODEL,
    OllamaUnavailable,
    add_server_arguments,
    append_jsonl,
    check_ollama,
    check_server_arguments,
    is_torn_record,
    ollama_host,
    open_jsonl_output,
    query_model,
    read_jsonl_output,
    same_file,
    server_options,
    short_reason,
)
from llmfs.cli import Parser, check_output_dir, path_argument, positive_int, run
from llmfs.download import get_data_file
from llmfs.errors import InvalidInput
from llmfs.instruction_data import INSTRUCTION_DATA_FILE
from llmfs.runtime import outputs_dir

POLITENESS = ("polite", "impolite")


def make_rewrite_prompt(entry: dict, politeness: str) -> str:
    """The bonus notebook's request: rewrite the reference answer to be slightly more (im)polite."""
    if politeness not in POLITENESS:
        raise ValueError(f"politeness must be one of {POLITENESS}, got {politeness!r}")
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"slightly rewrite the output to be more {politeness}. "
        "Keep the modification minimal. "
        "Only return the generated response and nothing else."
    )


STRICT_SUFFIX = ("\n\nYour previous reply could not be used. Reply with the rewritten output only: "
                 "no quotes, no explanation, and not the same text as the correct output.")

_QUOTES = ('"', "'", "`", "\u201c\u201d", "\u2018\u2019")


def clean_reply(reply: str, original: str, max_chars: int | None = None) -> tuple[str | None, str]:
    """(the usable rewrite, "") or (None, why not) for a model's reply.

    Strips whitespace and one pair of quotes or backticks around the whole reply (the
    prompt puts the answer in backticks, and models like to echo that). Refuses an empty
    reply, one that repeats the prompt, one identical to the original answer (no
    preference signal), and one far longer than the original (`max_chars`, default
    4x the original + 200 characters: the model rambled or ignored the task).
    """
    text = (reply or "").strip()
    for quote in _QUOTES:
        opening, closing = (quote[0], quote[-1])
        if len(text) >= 2 and text[0] == opening and text[-1] == closing and text.count(opening) <= 2:
            text = text[1:-1].strip()
            break
    if not text:
        return None, "empty reply"
    if "Given the input" in text or "slightly rewrite the output" in text:
        return None, "the reply repeats the prompt"
    if text == original.strip():
        return None, "the reply is the original answer unchanged"
    limit = max_chars if max_chars is not None else 4 * len(original) + 200
    if len(text) > limit:
        return None, f"the reply is {len(text)} characters long (limit {limit})"
    return text, ""


def politeness_plan(num_records: int, seed: int = 123) -> list[str]:
    """The politeness asked for each record, drawn up front so that a rerun asks the same."""
    rng = random.Random(seed)
    return [rng.choice(POLITENESS) for _ in range(num_records)]


# --- The JSONL file ------------------------------------------------------------------------------

def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The records of a JSONL file (one JSON object per line).

    A last line without its newline is what an interrupted write leaves: with `repair`
    it is cut off the file (and its record dropped) when it is the start of a JSON object
    after whole ones; otherwise, and for any other bad line, InvalidInput (a ValueError)
    names the file and the line, and the file is left as it is.
    """
    path = Path(path)
    raw = path.read_bytes()
    records, good_end, offset = [], 0, 0
    for lineno, line in enumerate(raw.splitlines(keepends=True), start=1):
        offset += len(line)
        complete = line.endswith(b"\n")
        if not line.strip():
            good_end = offset if complete else good_end
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not an object")
        except ValueError as exc:
            if repair and not complete and is_torn_record(line, (), after_records=bool(records)):
                break
            raise InvalidInput(f"{path}, line {lineno}: not a JSON object ({exc})") from None
        if not complete and repair:  # a whole object but no newline: keep it, finish the line
            with open(path, "ab") as f:
                f.write(b"\n")
        records.append(record)
        good_end = offset
    if repair and good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


PAIR_KEYS = ("index", "instruction", "chosen", "rejected", "politeness")
# A torn last line alone in the file is taken for one of ours when its first key is one of these
# (a record is the input record, usually starting with "instruction", plus PAIR_KEYS).
_FIRST_KEYS = ("instruction", "input", "output", *PAIR_KEYS)


def numbered_record_problem(record: dict, keys: tuple[str, ...], number: str = "record number") -> str | None:
    """The first check of a line that a resumable JSONL command of this chapter writes: every key of
    `keys` is there and "index" is a whole number >= 0 (None: so far it is one). The commands that
    make records from instruction data (here, ch07.dataset_utils, ch07.data_generation) share it."""
    missing = [key for key in keys if key not in record]
    if missing:
        return f"a JSON object without {', '.join(map(repr, missing))}"
    index = record["index"]
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        return f"'index' is {index!r}, not a {number}"
    return None


def check_data_and_output(data: str | os.PathLike | None, output: Path, what: str, example: str) -> Path:
    """The checks such a command runs before anything else: --data (a file; default the chapter's
    instruction-data.json) and --output (a .jsonl file of its own, in a folder that can be written).
    Returns the data file's path; the errors are one line ("`what` go to a .jsonl file of their own,
    e.g. `example`")."""
    if data is not None and Path(data).is_dir():
        raise IsADirectoryError(f"--data {data} is a folder; give the instruction file (a JSON list)")
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"--data {data} does not exist")
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a folder; give the .jsonl file to append to")
    check_output_dir(output.parent, option="--output")
    data_path = Path(data) if data is not None else get_data_file(INSTRUCTION_DATA_FILE)
    if same_file(output, data_path):
        raise InvalidInput(f"--output {output} is the instruction data (--data); {what} go to a .jsonl file of "
                           f"their own, e.g. {example}")
    return data_path


def _pair_problem(record: dict) -> str | None:
    """Why `record` is not a line `generate_preference_data` writes (None: it is one)."""
    problem = numbered_record_problem(record, PAIR_KEYS)
    if problem:
        return problem
    if not all(isinstance(record[key], str) for key in ("instruction", "chosen", "rejected")):
        return "'instruction', 'chosen' and 'rejected' are not all strings"
    if record["politeness"] not in (*POLITENESS, "both"):
        return f"'politeness' is {record['politeness']!r}, not polite, impolite or both"
    return None


def read_pairs(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """The records of a preference-pairs file this command wrote (with their line numbers), read
    without changing it; a file of another kind raises a one-line error and is left as it is."""
    return read_jsonl_output(path, "--output", "preference-pairs", _pair_problem, _FIRST_KEYS).records


def records_done(path: Path, data: list[dict]) -> set[int]:
    """Indices already in the output file, read without changing it; refuses a file that is not a
    preference-pairs file, and one made from other data."""
    done = set()
    for i, (_, record) in enumerate(read_pairs(path)):
        index = record["index"]
        if not index < len(data) or record["instruction"] != data[index]["instruction"]:
            raise InvalidInput(f"{path}: record {i} does not belong to this input data (its index "
                               f"{index!r} and instruction do not match); choose another --output")
        done.add(index)
    return done


# --- Asking the model ------------------------------------------------------------------------------

def ask_rewrite(entry: dict, politeness: str, model: str, host: str | None = None, options: dict | None = None,
                timeout: float = 300.0) -> tuple[str | None, str]:
    """A validated rewrite (or None and why), asking a second time, more strictly, after a bad reply."""
    prompt = make_rewrite_prompt(entry, politeness)
    text, why = clean_reply(query_model(prompt, model, host=host, options=options, timeout=timeout), entry["output"])
    if text is None:
        text, why = clean_reply(query_model(prompt + STRICT_SUFFIX, model, host=host, options=options, timeout=timeout),
                                entry["output"])
    return text, why


def generate_preference_data(data: list[dict], output_path: str | os.PathLike, model: str = DEFAULT_MODEL,
                             host: str | None = None, seed: int = 123, both: bool = False,
                             options: dict | None = None, timeout: float = 300.0,
                             progress: bool = True) -> dict:
    """Append a preference record to `output_path` for every record of `data` not there yet.

    Each line is the input record plus "chosen", "rejected", "politeness" and "index"
    (its position in `data`). Returns counts: {"total", "done_before", "written",
    "invalid"}. Connection errors propagate (what was written stays written).
    """
    from tqdm.auto import tqdm

    output_path = Path(output_path)
    done = records_done(output_path, data)
    plan = politeness_plan(len(data), seed)
    todo = [i for i in range(len(data)) if i not in done]
    summary = {"total": len(data), "done_before": len(done), "written": 0, "invalid": 0}
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open_jsonl_output(output_path, "--output", "preference-pairs", _pair_problem, _FIRST_KEYS)[1] as f:
        for i in tqdm(todo, desc="Writing entries", unit="entry", disable=not progress):
            entry = data[i]
            if both:
                chosen, why = ask_rewrite(entry, "polite", model, host, options, timeout)
                rejected, why_rejected = (ask_rewrite(entry, "impolite", model, host, options, timeout)
                                          if chosen is not None else (None, ""))
                why, politeness = why or why_rejected, "both"
            else:
                politeness = plan[i]
                response, why = ask_rewrite(entry, politeness, model, host, options, timeout)
                chosen, rejected = ((response, entry["output"]) if politeness == "polite"
                                    else (entry["output"], response))
            if chosen is None or rejected is None:
                summary["invalid"] += 1
                if progress:
                    tqdm.write(f"record {i}: no usable reply ({why}); a rerun asks again")
                continue
            append_jsonl(f, {**entry, "chosen": chosen, "rejected": rejected, "politeness": politeness,
                             "index": i})
            summary["written"] += 1
    return summary


# --- Command line ------------------------------------------------------------------------------------

def parser() -> Parser:
    p = Parser(prog="python -m ch07.dpo.preference_data",
               description="Make polite/impolite preference pairs from instruction data with a model served "
                           "over the Ollama API (chapter 7 bonus).")
    p.add_argument("--data", default=None,
                   help="instruction records (JSON list with instruction, input, output; default: the chapter's "
                        "instruction-data.json)")
    p.add_argument("--output", type=path_argument,
                   default=str(outputs_dir("ch07") / "instruction-data-with-preference.jsonl"),
                   help="JSONL file the records are appended to; rerun with the same file to continue "
                        "(default outputs/ch07/instruction-data-with-preference.jsonl)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N records")
    p.add_argument("--both", action="store_true",
                   help="ask for a polite and an impolite rewrite of every answer (twice the requests) instead "
                        "of one random rewrite against the original answer")
    p.add_argument("--seed", type=int, default=123, help="seed for the polite/impolite draw (default 123)")
    add_server_arguments(p, "model on the server that rewrites the answers (default llama3)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ch07.dpo.preference_data [options]`; returns the exit code (2: bad input, 1: server trouble).

    Checks come first, in this order, and --output is changed only after all of them: --data, --output
    (a preference-pairs file of this data, or none yet; anything else is refused and left as it is),
    then the server and the model.
    """
    p = parser()
    args = p.parse_args(argv)
    check_server_arguments(p, args)

    def generate() -> None:
        output = Path(args.output)
        data_path = check_data_and_output(args.data, output, "the pairs", "instruction-data-with-preference.jsonl")
        data = load_instruction_data(data_path)
        data = data[:args.limit] if args.limit else data
        done = records_done(output, data)
        if len(done) == len(data):
            print(f"{output} already holds all {len(data)} records; nothing to do")
            return
        host = ollama_host(args.host)
        try:
            check_ollama(args.model, args.host, timeout=min(CHECK_TIMEOUT, args.timeout))
            print(f"{host}, model {args.model}: {len(data) - len(done)} of {len(data)} records to do -> {output}")
            try:
                summary = generate_preference_data(data, output, args.model, args.host, seed=args.seed,
                                                   both=args.both, options=server_options(args),
                                                   timeout=args.timeout, progress=not args.no_progress)
            except (requests.RequestException, OllamaUnavailable) as exc:
                written = len(records_done(output, data)) - len(done)
                reason = short_reason(exc) if isinstance(exc, requests.RequestException) else " ".join(str(exc).split())
                raise OllamaUnavailable(f"the server at {host} stopped answering ({reason}) after {written} new "
                                        f"records; they are saved in {output}: run the same command again to "
                                        "continue.") from None
        except KeyboardInterrupt:  # Ctrl-C: one line saying what is kept (llmfs.cli.run prints it)
            total = len(records_done(output, data))
            raise KeyboardInterrupt(f"{total - len(done)} new records ({total} of {len(data)} in all) are saved in "
                                    f"{output}; run the same command again to continue" if output.exists()
                                    else "no records were written") from None
        print(f"{summary['written']} records written, {summary['done_before']} were there before, "
              f"{summary['invalid']} without a usable reply (rerun to ask again): {output}")

    return run(generate, argv, other_errors={OllamaUnavailable: 1})


if __name__ == "__main__":
    sys.exit(main())
