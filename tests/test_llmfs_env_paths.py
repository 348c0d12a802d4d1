"""llmfs/env_paths.py: a folder named in LLMFS_OUTPUT_DIR, LLMFS_DATA_MIRROR or LLMFS_CACHE_DIR is absolute.

A relative one would be another folder in a notebook (started in its chapter's folder) than in a
command (started in the repository root); it is refused in one line that shows the absolute path.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmfs.env_paths import PATH_VARIABLES, check_path_variables, env_path
from llmfs.errors import InvalidInput

REPO = Path(__file__).resolve().parents[1]


def test_unset_blank_absolute_and_home_relative_values():
    assert env_path("LLMFS_CACHE_DIR", {}) is None
    assert env_path("LLMFS_CACHE_DIR", {"LLMFS_CACHE_DIR": "  "}) is None
    assert env_path("LLMFS_CACHE_DIR", {"LLMFS_CACHE_DIR": "/data/cache "}) == Path("/data/cache")
    assert env_path("LLMFS_CACHE_DIR", {"LLMFS_CACHE_DIR": "~/llm"}) == Path.home() / "llm"


@pytest.mark.parametrize("name", PATH_VARIABLES)
def test_a_relative_path_is_refused_with_the_absolute_path_it_would_be_here(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInput) as info:
        env_path(name, {name: "data/files"})
    message = str(info.value)
    assert message.startswith(f"{name}=data/files is a relative path") and "\n" not in message
    assert f"give an absolute path, e.g. {name}={tmp_path / 'data' / 'files'}" in message
    with pytest.raises(InvalidInput, match=name):
        check_path_variables({name: "data/files"})


def test_the_list_is_every_folder_variable_the_project_reads():
    from llmfs.runtime import environment_variables

    folders = {v.name for v in environment_variables() if "(an absolute path)" in v.meaning}
    assert folders == set(PATH_VARIABLES)


def test_outputs_dir_refuses_a_relative_output_folder(monkeypatch):
    from llmfs.runtime import outputs_dir

    monkeypatch.setenv("LLMFS_OUTPUT_DIR", "runs")
    with pytest.raises(InvalidInput, match="LLMFS_OUTPUT_DIR=runs is a relative path"):
        outputs_dir("ch05")


def test_every_command_refuses_it_in_one_line_before_computing_its_defaults(monkeypatch, capsys):
    """llmfs.cli.Parser checks first: the commands compute `--output-dir`'s default from LLMFS_OUTPUT_DIR."""
    from llmfs.cli import Parser

    monkeypatch.setenv("LLMFS_DATA_MIRROR", "shared/data")
    with pytest.raises(SystemExit) as exc:
        Parser(prog="python -m anything")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: LLMFS_DATA_MIRROR=shared/data is a relative path")


def test_a_command_with_a_relative_output_folder_says_so_in_one_line(tmp_path):
    """Started in another folder (as a notebook is), with the relative path the repository root would take."""
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "-m", "ch05.gpt_generate", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "LLMFS_OUTPUT_DIR": "outputs", "PYTHONPATH": path})
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert re.fullmatch(rf"error: LLMFS_OUTPUT_DIR=outputs is a relative path.*"
                        rf"LLMFS_OUTPUT_DIR={re.escape(str(tmp_path / 'outputs'))}\n", result.stderr)
