"""Tests for tests/cli_cases.py: every bad invocation of a chapter command exits 2 with one
`error: ...` line and no traceback. All cases run in-process (each in well under a second); a
sample of them, one per command, also runs as a real subprocess."""

import importlib
import os
import time

import pytest

import cli_cases
from cli_cases import CASES, case_env, fill, make_fixtures, problems, run_subprocess

MAINS = {
    cli_cases.TRAIN: ("ch05.cli", "train_main"),
    cli_cases.GENERATE: ("ch05.cli", "generate_main"),
    cli_cases.DOWNLOAD: ("ch05.cli", "download_main"),
    cli_cases.CLASSIFY: ("ch06.cli", "main"),
    cli_cases.INSTRUCT: ("ch07.cli", "main"),
    cli_cases.JUDGE: ("ch07.ollama_evaluate", "main"),
    cli_cases.DPO: ("ch07.dpo.dpo", "cli"),
    cli_cases.PAIRS: ("ch07.dpo.preference_data", "main"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_fixtures(tmp_path_factory.mktemp("cli-cases"))


def test_there_are_many_cases_for_every_command():
    assert len(CASES) >= 60
    assert {module for module, _, _ in CASES} == set(MAINS)
    assert len({name for _, name, _ in CASES}) == len(CASES)  # ids are unique


@pytest.mark.parametrize("module, name, args", CASES, ids=[name for _, name, _ in CASES])
def test_bad_invocation_gives_one_error_line(module, name, args, files, capsys, monkeypatch, tmp_path):
    for key, value in case_env(tmp_path).items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    main = getattr(importlib.import_module(MAINS[module][0]), MAINS[module][1])
    start = time.perf_counter()
    try:
        rc = main(fill(args, files))
    except SystemExit as exc:  # argparse
        rc = exc.code
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert problems(rc, err) == [], err
    assert seconds < 30, f"{name} took {seconds:.1f} s: the check must come before the work"


SUBPROCESS_SAMPLE = [f"{cli_cases.TRAIN} --lr nan", f"{cli_cases.TRAIN} --resume text",
                     f"{cli_cases.GENERATE} --model bad_st", f"{cli_cases.DOWNLOAD} gpt5",
                     f"{cli_cases.CLASSIFY} --output-dir {{finished6}}", f"{cli_cases.INSTRUCT} --init-checkpoint empty",
                     f"{cli_cases.JUDGE} --file {{json_trailing_comma}}", f"{cli_cases.DPO} --output-dir {{finished_dpo}}",
                     f"{cli_cases.PAIRS} --output {{text}}"]


@pytest.mark.parametrize("name", SUBPROCESS_SAMPLE)
def test_bad_invocation_as_a_subprocess(name, files, tmp_path):
    module, _, args = next(c for c in CASES if c[1] == name)
    rc, stderr, seconds = run_subprocess(module, fill(args, files), case_env(tmp_path))
    assert problems(rc, stderr) == [], stderr
