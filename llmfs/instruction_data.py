"""Reading chapter 7's JSON data files with clear errors: which file, which record, which key.

Not a listing of the book (its `download_and_load_file` in `ch07.gpt_instruction_finetuning` just
calls `json.load`); the chapter module, the DPO data and the judge read their files through these,
so a broken record in a file of thousands is reported as one line that names it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from llmfs.download import get_data_file
from llmfs.errors import InvalidInput

INSTRUCTION_DATA_FILE = "instruction-data.json"


def validate_instruction_data(data, source: str = "instruction data",
                              required: Sequence[str] = ("instruction", "output"),
                              optional: Sequence[str] = ("input",)) -> list[dict]:
    """Check that `data` is a list of records with string fields; return it unchanged.

    Every key in `required` must be present and a string; keys in `optional` may be
    missing but must be strings when present. The error names the record's index
    and the key, so a broken record in a file of thousands is easy to find.
    """
    if not isinstance(data, list):
        raise InvalidInput(f"{source}: expected a JSON list of records, got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise InvalidInput(f"{source}: record {i} is a {type(entry).__name__}, expected an object with "
                             f"keys {list(required)}")
        for key in required:
            if key not in entry:
                raise InvalidInput(f"{source}: record {i} is missing the key {key!r}")
            if not isinstance(entry[key], str):
                raise InvalidInput(f"{source}: record {i} has {key!r} of type {type(entry[key]).__name__}, "
                                 "expected a string")
        for key in optional:
            if key in entry and not isinstance(entry[key], str):
                raise InvalidInput(f"{source}: record {i} has {key!r} of type {type(entry[key]).__name__}, "
                                 "expected a string")
    return data


def read_json_file(path: str | os.PathLike):
    """Parse a JSON file; a syntax error names the file, line, column and character offset."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path} is not UTF-8 text, so not a JSON file ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno} "
                         f"(char {exc.pos})") from None


def load_instruction_data(path: str | os.PathLike | None = None) -> list[dict]:
    """Read and validate an instruction file (default: the chapter's `instruction-data.json`).

    Each record is `{"instruction": str, "input": str (optional, may be ""), "output": str}`.
    """
    if path is None:
        path = get_data_file(INSTRUCTION_DATA_FILE)
    return validate_instruction_data(read_json_file(path), source=str(path))
