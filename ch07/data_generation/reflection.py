"""Chapter 7 bonus: improving instruction data by reflection, with a local model over the Ollama API.

The book's bonus notebook ("Improving Instruction-Data Via Reflection-Tuning Using GPT-4") follows
Reflection-Tuning (Li et al., 2023, https://arxiv.org/abs/2310.11716): a stronger model reads a
record, says what is weak about it, and writes a better version in marked sections that code can
cut out. Two ways, as in the book (--mode):

* instruction: a new, harder instruction and its answer, between "[New Instruction]" ... "[End]"
  and "[New Answer]" ... "[End]" (`instr_prompt_no_input`; records with an input are kept as they
  are, as in the book);
* response: a better answer to the same instruction, between "[Better Answer]" ... "[End]"
  (`res_gen_prompt_no_input`, `res_gen_prompt_input`).

    python -m ch07.data_generation.reflection --mode instruction --limit 3     # llama3 on Ollama
    python -m ch07.data_generation.reflection --mode response --host 127.0.0.1:11435 --model quick-sft

Adapted to a local model instead of GPT-4: the request is `ch07.ollama_evaluate.query_model` (one
user message, POST /api/chat, seed 123, temperature 0), so the system prompt opens the user message
(not every small model has a system role), and the prompt ends by showing the exact format of the
sections. The prompts follow the book's (from the Reflection-Tuning code) in our own words.

Every reply is parsed (`parse_instruction_reflection`, `parse_response_reflection`) and checked: the
sections must be there, not empty, not longer than --max-chars, hold no other section's marker, and
the new instruction must differ from the old one. The book keeps the original output when a reply
cannot be parsed; here such a record is asked once more with a stricter reminder of the format, and
if that fails too it is counted (by reason) and not written, so a rerun asks again. Records are
appended to a JSONL file as they arrive, as `generate_instruction_data` does (same checks, Ctrl-C and
lost-server handling): each is the improved record ({"instruction", "input", "output"}) plus "index"
(its number in --data), "reflection" (the mode), "reflected" (false for a record passed through) and
the original instruction and output.
"""

from __future__ import annotations

import collections
import os
import re
import sys
from pathlib import Path

from ch07.data_generation.generate_instruction_data import (
    MalformedReply,
    ask_chat,
    reasons_text,
    run_against_server,
)
from ch07.dpo.preference_data import check_data_and_output, numbered_record_problem
from ch07.gpt_instruction_finetuning import load_instruction_data
from ch07.ollama_evaluate import (
    DEFAULT_MODEL,
    OllamaUnavailable,
    add_server_arguments,
    append_jsonl,
    check_server_arguments,
    open_jsonl_output,
    read_jsonl_output,
    server_options,
)
from llmfs.cli import Parser, path_argument, positive_int, run
from llmfs.errors import InvalidInput
from llmfs.runtime import outputs_dir

MODES = ("instruction", "response")
MAX_CHARS = 8000
SECTION_MARKERS = ("[New Instruction]", "[New Answer]", "[Better Answer]", "[End]")

# --- The prompts -------------------------------------------------------------------------------------

_RECORD = "[Instruction]\n{ins}\n\n[The Start of Answer]\n{outp}\n\n[The End of Answer]\n\n[System]\n{criteria}\n\n"
_RECORD_WITH_INPUT = ("[Instruction]\n{ins}\n\n[The Start of Input]\n{inp}\n\n[The End of Input]\n\n"
                      "[The Start of Answer]\n{outp}\n\n[The End of Answer]\n\n[System]\n{criteria}\n\n")
INSTRUCTION_FORMAT = "[New Instruction] your instruction [End]\n[New Answer] your answer [End]"
RESPONSE_FORMAT = "[Better Answer] your answer [End]"


def instr_prompt_no_input(ins: str, outp: str) -> tuple[str, str]:
    """(system prompt, prompt) asking for a new, harder instruction and its answer."""
    sys_prompt = "You are a helpful, exact and demanding assistant who judges the quality of an instruction."
    criteria = (
        "Please answer these questions about the quality of the instruction above.\n"
        "1. Why is this instruction not good? Look at how complex the topic is, how much detail and knowledge it "
        "asks for, whether it is ambiguous, and how much reasoning or problem solving it involves. Then say why "
        "the answer is not good for it (helpfulness, relevance, accuracy, level of detail), and how the weak "
        "instruction led to the weak answer.\n"
        "2. Based on your reasons, write a new and complete instruction that is more complex and harder to answer "
        "directly. It must be related to the original instruction but make sense without it. Write it in the "
        "format [New Instruction] your instruction [End]\n"
        "3. Answer the new instruction in as much detail as you can, in the format [New Answer] your answer [End]\n"
    )
    return sys_prompt, _RECORD.format(ins=ins, outp=outp, criteria=criteria)


def res_gen_prompt_no_input(ins: str, outp: str) -> tuple[str, str]:
    """(system prompt, prompt) asking for a better answer to an instruction without an input."""
    sys_prompt = "You are a helpful, exact and demanding assistant who judges the answer to an instruction."
    criteria = (
        "Please answer these questions about the quality of the answer to the instruction above.\n"
        "1. Why is this answer not good for the instruction? Judge its helpfulness, relevance, accuracy and level "
        "of detail.\n"
        "2. Based on your reasons, write a better answer, new and complete and as detailed as needed, in the "
        "format [Better Answer] your answer [End]\n"
    )
    return sys_prompt, _RECORD.format(ins=ins, outp=outp, criteria=criteria)


def res_gen_prompt_input(ins: str, inp: str, outp: str) -> tuple[str, str]:
    """(system prompt, prompt) asking for a better answer to an instruction with its input."""
    sys_prompt = "You are a helpful and exact assistant who judges the answer to an instruction and its input."
    criteria = (
        "Please answer these questions about the quality of the answer to the instruction and its input above.\n"
        "1. Why is this answer not good for the instruction and its input? Judge its helpfulness, relevance, "
        "accuracy and level of detail.\n"
        "2. Based on your reasons, write a better answer, new and complete and as detailed as needed, in the "
        "format [Better Answer] your answer [End]\n"
    )
    return sys_prompt, _RECORD_WITH_INPUT.format(ins=ins, inp=inp, outp=outp, criteria=criteria)


def local_prompt(sys_prompt: str, prompt: str, answer_format: str) -> str:
    """New: one user message for a local model: the system prompt first, the exact section format last."""
    return f"{sys_prompt}\n\n{prompt}Use exactly this format for your final result:\n{answer_format}"


STRICT_SUFFIX = ("\n\nYour previous reply could not be used: its sections were missing or empty. Reply again, and "
                 "put the result between the markers shown, each section closed with [End].")


# --- Reading the sections out of a reply ----------------------------------------------------------------

def extract_ins(text: str) -> str:
    """The text of the new instruction ("" if none): after "[New Instruction]" (or "New Instruction:") up to
    "[End]", "[New Answer]" or "New Answer:"."""
    start = r"\[New Instruction\]" if "[New Instruction]" in text else r"New Instruction:"
    match = re.search(start + r"(.*?)(?:\[End\]|\[New Answer\]|New Answer:)", text, re.DOTALL)
    return match.group(1).strip() if match else ""


def extract_oup(text: str) -> str:
    """The text of the new answer ("" if none): after "[New Answer]" (or "New Answer:") up to "[End]" or the end."""
    start = r"\[New Answer\]" if "[New Answer]" in text else r"New Answer:"
    match = re.search(start + r"(.*?)(?:\[End\]|$)", text, re.DOTALL)
    return match.group(1).strip() if match else ""


def extract_instruction(text: str) -> list[str]:
    """[new instruction, new answer] from an instruction-reflection reply ([] for an empty reply)."""
    if text == "":
        return []
    return [extract_ins(text), extract_oup(text)]


def extract_response(text: str) -> list[str]:
    """Every "[Better Answer]" section of a reply, each up to "[End]", the next "[Better Answer]" or the end.

    New: a bare "End" does not end a section (the book's pattern also cut at it, e.g. in "Endangered")."""
    return [m.strip() for m in re.findall(r"\[Better Answer\](.*?)(?=\[End\]|\[Better Answer\]|$)", text, re.DOTALL)]


def _section_problem(name: str, text: str, max_chars: int) -> str | None:
    if not text:
        return f"empty {name}"
    if any(marker in text for marker in SECTION_MARKERS):
        return f"{name} holds a section marker"
    if len(text) > max_chars:
        return f"{name} too long"
    return None


def parse_instruction_reflection(reply: str, original_instruction: str,
                                 max_chars: int = MAX_CHARS) -> tuple[tuple[str, str] | None, str]:
    """((new instruction, new answer), "") or (None, why not) for a reply to `instr_prompt_no_input`."""
    if not reply.strip():
        return None, "empty reply"
    if "[New Instruction]" not in reply and "New Instruction:" not in reply:
        return None, "no [New Instruction] section"
    if "[New Answer]" not in reply and "New Answer:" not in reply:
        return None, "no [New Answer] section"
    new_instr, new_outp = extract_instruction(reply)
    why = _section_problem("instruction", new_instr, max_chars) or _section_problem("answer", new_outp, max_chars)
    if why:
        return None, why
    if new_instr == original_instruction.strip():
        return None, "instruction unchanged"
    return (new_instr, new_outp), ""


def parse_response_reflection(reply: str, max_chars: int = MAX_CHARS) -> tuple[str | None, str]:
    """(the better answer, "") or (None, why not) for a reply to `res_gen_prompt_*`; the first section counts."""
    if not reply.strip():
        return None, "empty reply"
    sections = extract_response(reply)
    if not sections:
        return None, "no [Better Answer] section"
    why = _section_problem("answer", sections[0], max_chars)
    return (None, why) if why else (sections[0], "")


# --- Reflecting one record -------------------------------------------------------------------------------

def reflect_entry(entry: dict, mode: str, model: str = DEFAULT_MODEL, host: str | None = None,
                  options: dict | None = None, timeout: float = 300.0,
                  max_chars: int = MAX_CHARS) -> tuple[dict | None, str]:
    """The improved record ({"instruction", "input", "output", "reflected"}) and "", or None and why not.

    Asks once more, with STRICT_SUFFIX, after a reply that cannot be parsed."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    inp = entry.get("input") or ""
    if mode == "instruction" and inp:  # as in the book: only records without an input get a new instruction
        return {"instruction": entry["instruction"], "input": inp, "output": entry["output"], "reflected": False}, ""
    if mode == "instruction":
        prompt = local_prompt(*instr_prompt_no_input(entry["instruction"], entry["output"]), INSTRUCTION_FORMAT)
    elif inp:
        prompt = local_prompt(*res_gen_prompt_input(entry["instruction"], inp, entry["output"]), RESPONSE_FORMAT)
    else:
        prompt = local_prompt(*res_gen_prompt_no_input(entry["instruction"], entry["output"]), RESPONSE_FORMAT)
    why = ""
    for attempt in (prompt, prompt + STRICT_SUFFIX):
        try:
            reply = ask_chat(attempt, model, host, options, timeout)
        except MalformedReply:
            why = "not Ollama's JSON"
            continue
        if mode == "instruction":
            parsed, why = parse_instruction_reflection(reply, entry["instruction"], max_chars)
            if parsed is not None:
                return {"instruction": parsed[0], "input": "", "output": parsed[1], "reflected": True}, ""
        else:
            better, why = parse_response_reflection(reply, max_chars)
            if better is not None:
                return {"instruction": entry["instruction"], "input": inp, "output": better, "reflected": True}, ""
    return None, why


# --- The JSONL file ------------------------------------------------------------------------------------

RECORD_KEYS = ("index", "reflection", "instruction", "input", "output", "reflected", "original_instruction",
               "original_output")


def record_problem(record: dict) -> str | None:
    """Why `record` is not a line `reflect_data` writes (None: it is one)."""
    problem = numbered_record_problem(record, RECORD_KEYS, "record number")
    if problem:
        return problem
    if record["reflection"] not in MODES:
        return f"'reflection' is {record['reflection']!r}, not instruction or response"
    if not all(isinstance(record[key], str) for key in RECORD_KEYS if key not in ("index", "reflection", "reflected")):
        return "the text fields are not all strings"
    return None


def records_done(path: str | os.PathLike, data: list[dict], mode: str) -> set[int]:
    """Record numbers already in the file, read without changing it; a file of another kind, of the other
    mode or of other data raises a one-line error (InvalidInput) and is left as it is."""
    done = set()
    for lineno, record in read_jsonl_output(path, "--output", "reflection", record_problem, RECORD_KEYS).records:
        index = record["index"]
        if record["reflection"] != mode:
            raise InvalidInput(f"--output {path} holds {record['reflection']} reflections (line {lineno}), not "
                               f"{mode}; choose another --output file")
        if index >= len(data) or record["original_instruction"] != data[index]["instruction"]:
            raise InvalidInput(f"--output {path}, line {lineno}: record {index} does not belong to this input data "
                               "(its index and instruction do not match); choose another --output file")
        done.add(index)
    return done


def reflect_data(data: list[dict], output_path: str | os.PathLike, mode: str = "instruction",
                 model: str = DEFAULT_MODEL, host: str | None = None, options: dict | None = None,
                 timeout: float = 300.0, max_chars: int = MAX_CHARS, progress: bool = True) -> dict:
    """The book's `reflect_instructions` / `reflect_responses`, resumable: append an improved record to
    `output_path` for every record of `data` not there yet.

    Returns counts: {"total", "done_before", "written", "invalid", "reasons" (a Counter)}. Connection
    errors propagate (what was written stays written).
    """
    from tqdm.auto import tqdm

    output_path = Path(output_path)
    done = records_done(output_path, data, mode)
    todo = [i for i in range(len(data)) if i not in done]
    summary = {"total": len(data), "done_before": len(done), "written": 0, "invalid": 0,
               "reasons": collections.Counter()}
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open_jsonl_output(output_path, "--output", "reflection", record_problem, RECORD_KEYS)[1] as f:
        for i in tqdm(todo, desc=f"Reflecting {mode}s", unit="record", disable=not progress):
            entry = data[i]
            new_entry, why = reflect_entry(entry, mode, model, host, options, timeout, max_chars)
            if new_entry is None:
                summary["invalid"] += 1
                summary["reasons"][why] += 1
                continue
            append_jsonl(f, {"index": i, "reflection": mode, **new_entry, "original_instruction": entry["instruction"],
                             "original_output": entry["output"]})
            summary["written"] += 1
    return summary


# --- Command line ------------------------------------------------------------------------------------

def parser() -> Parser:
    p = Parser(prog="python -m ch07.data_generation.reflection",
               description="Improve instructions or responses of instruction data by reflection, with a model "
                           "served over the Ollama API (chapter 7 bonus).")
    p.add_argument("--mode", choices=MODES, default="instruction",
                   help="instruction: a new, harder instruction and its answer; response: a better answer "
                        "(default instruction)")
    p.add_argument("--data", default=None,
                   help="instruction records (JSON list with instruction, input, output; default: the chapter's "
                        "instruction-data.json)")
    p.add_argument("--output", type=path_argument, default=None,
                   help="JSONL file the records are appended to; rerun with the same file to continue "
                        "(default outputs/ch07/instruction-reflected.jsonl or response-reflected.jsonl)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N records")
    p.add_argument("--max-chars", type=positive_int, default=MAX_CHARS,
                   help=f"a longer new instruction or answer is rejected (default {MAX_CHARS})")
    add_server_arguments(p, "model on the server that reflects (default llama3)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ch07.data_generation.reflection [options]`; returns the exit code (2: bad input, 1: server
    trouble). Checks --data, then --output (a reflection file of this data and mode, or none yet), then the
    server and the model; --output is changed only after all of them."""
    p = parser()
    args = p.parse_args(argv)
    check_server_arguments(p, args)

    def reflect() -> None:
        output = Path(args.output or outputs_dir("ch07") / f"{args.mode}-reflected.jsonl")
        data_path = check_data_and_output(args.data, output, "the reflections", f"{args.mode}-reflected.jsonl")
        data = load_instruction_data(data_path)
        data = data[:args.limit] if args.limit else data

        def done() -> int:
            return len(records_done(output, data, args.mode))

        summary = run_against_server(args, output, done, len(data), lambda: reflect_data(
            data, output, args.mode, args.model, args.host, server_options(args), args.timeout, args.max_chars,
            progress=not args.no_progress))
        if summary is not None:
            print(f"{summary['written']} records written, {summary['done_before']} were there before, "
                  f"{summary['invalid']} without a usable reply ({reasons_text(summary['reasons'])}; a rerun asks "
                  f"again): {output}")

    return run(reflect, argv, other_errors={OllamaUnavailable: 1})


if __name__ == "__main__":
    sys.exit(main())
