"""Tests for llmfs/instruction_data.py: a data file that is not what it should be is named in one
line (InvalidInput, a UserError), whatever is wrong with it: not UTF-8, not JSON, not records."""

import json

import pytest

from llmfs.errors import InvalidInput, UserError
from llmfs.instruction_data import load_instruction_data, read_json_file, validate_instruction_data


def test_the_chapters_file_loads():
    data = load_instruction_data()
    assert len(data) == 1100 and set(data[0]) == {"instruction", "input", "output"}


@pytest.mark.parametrize("content, match", [
    # Python 3.13 reports the trailing comma one column earlier than 3.10-3.12.
    (b'[{"instruction": "a", "output": "b",}]', r"is not valid JSON: .* at line 1, column 3[67] \(char 3[56]\)"),
    ('[{"instruction": "caf\u00e9"}]'.encode("latin-1"), "is not UTF-8 text"),
    (b'{"instruction": "a"}', "expected a JSON list of records, got dict"),
    (b'[["a", "b"]]', "record 0 is a list"),
    (b'[{"instruction": "a"}]', "record 0 is missing the key 'output'"),
    (b'[{"instruction": "a", "output": 3}]', "record 0 has 'output' of type int"),
    (b'[{"instruction": "a", "output": "b", "input": null}]', "record 0 has 'input' of type NoneType"),
])
def test_bad_files_are_one_users_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(InvalidInput, match=match) as info:
        load_instruction_data(path)
    assert str(path) in str(info.value) and isinstance(info.value, UserError)


def test_read_json_file_returns_the_data(tmp_path):
    (tmp_path / "ok.json").write_text(json.dumps([{"instruction": "a", "output": "b"}]), encoding="utf-8")
    assert read_json_file(tmp_path / "ok.json") == [{"instruction": "a", "output": "b"}]
    with pytest.raises(FileNotFoundError):  # an OS error about the named path: one line from a command too
        read_json_file(tmp_path / "missing.json")
    assert validate_instruction_data([], "x") == []
