"""Tests for llmfs/cli.py's one error path and llmfs/runtime.py's list of environment variables.

`run` turns the project's `UserError` (and OS errors about a path the user named) into one line,
exit code 2; anything else is a bug and keeps its traceback, including a `ValueError` raised inside a
training step. Before anything, it names the settings that come from the environment.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llmfs.cli as cli
from llmfs.checkpoint import CheckpointFileError, CheckpointMismatchError
from llmfs.download import ChecksumError, DataUnavailableError
from llmfs.errors import InvalidInput, PretrainedWeightsUnavailable, UserError
from llmfs.runtime import DeviceUnavailableError, environment_notice, environment_variables

REPO = Path(__file__).resolve().parents[1]


def raising(exc: BaseException):
    def main():
        raise exc
    return main


# --- run: one line for a user's mistake, a traceback for a bug ---------------------------------------

@pytest.mark.parametrize("exc", [
    InvalidInput("--lr must be > 0"), CheckpointFileError("x.pth is empty"), CheckpointMismatchError("no fit"),
    DataUnavailableError("offline"), ChecksumError("bad sha256"), DeviceUnavailableError("no CUDA"),
    PretrainedWeightsUnavailable("no weights\nWays to get them:\n  - download"),
    FileNotFoundError("--model x does not exist"), FileExistsError("already holds a model"),
    PermissionError("cannot be written"), IsADirectoryError("is a folder"), NotADirectoryError("not a folder"),
])
def test_a_users_mistake_is_one_line_and_exit_2(exc, capsys):
    assert cli.run(raising(exc)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(exc).splitlines()[0] in err


def test_every_kind_of_user_error_is_a_user_error():
    for kind in (InvalidInput, CheckpointFileError, CheckpointMismatchError, DataUnavailableError, ChecksumError,
                 DeviceUnavailableError, PretrainedWeightsUnavailable):
        assert issubclass(kind, UserError)
    assert issubclass(InvalidInput, ValueError)  # code that catches ValueError still catches a bad value


@pytest.mark.parametrize("exc", [ValueError("too many values to unpack"), KeyError("n_heads"),
                                 TypeError("unsupported operand"), RuntimeError("shape mismatch"),
                                 OSError(28, "No space left on device")])
def test_a_bug_keeps_its_traceback(exc, capsys):
    with pytest.raises(type(exc)) as info:
        cli.run(raising(exc))
    assert info.value is exc
    assert "error:" not in capsys.readouterr().err


def test_pickle_errors_are_not_user_errors_any_more():
    import pickle

    assert not issubclass(pickle.UnpicklingError, cli.USER_ERRORS)
    assert not issubclass(ValueError, cli.USER_ERRORS)


def test_ctrl_c_outside_training_is_exit_130(capsys):
    assert cli.run(raising(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    # a command that catches Ctrl-C and raises it again with what it kept: that, on the same line
    assert cli.run(raising(KeyboardInterrupt("3 of 9 scores are saved in s.jsonl\nrerun to continue"))) == 130
    assert capsys.readouterr().err == "\ninterrupted: 3 of 9 scores are saved in s.jsonl; rerun to continue\n"


def test_other_errors_map_to_their_exit_code(capsys):
    class ServerGone(Exception):
        pass

    assert cli.run(raising(ServerGone("the server stopped answering")), other_errors={ServerGone: 1}) == 1
    assert capsys.readouterr().err == "error: the server stopped answering\n"
    assert cli.run(lambda: None, other_errors={ServerGone: 1}) == 0


def test_a_clean_run_is_exit_0_and_prints_nothing(capsys):
    assert cli.run(lambda: None) == 0
    assert capsys.readouterr().err == ""


# --- settings from the environment: named first, never silent ----------------------------------------

@pytest.fixture
def real_notice(monkeypatch):
    """conftest.py silences the line for the other tests; these test it."""
    monkeypatch.setattr(cli, "environment_notice", environment_notice)
    for var in environment_variables():
        monkeypatch.delenv(var.name, raising=False)
    return monkeypatch


def test_nothing_is_printed_when_every_setting_is_the_default(real_notice, capsys):
    real_notice.setenv("LLMFS_QUICK", "0")  # the default, spelled out
    real_notice.setenv("LLMFS_DECODING_LAYOUT", "1")
    real_notice.setenv("LLMFS_DEVICE", "")
    assert environment_notice() is None
    assert cli.run(lambda: None) == 0
    assert capsys.readouterr().err == ""


def test_non_default_settings_come_first_on_stderr(real_notice, capsys):
    real_notice.setenv("LLMFS_QUICK", "1")
    real_notice.setenv("LLMFS_DEVICE", "cpu")
    real_notice.setenv("LLMFS_DECODING_LAYOUT", "0")
    real_notice.setenv("HF_HUB_OFFLINE", "1")  # another tool's: its own messages name it
    assert cli.run(raising(InvalidInput("bad value"))) == 2
    first, second = capsys.readouterr().err.splitlines()
    assert first == ("settings from the environment: LLMFS_QUICK=1 (quick mode: notebooks and every command that "
                     "takes --quick), LLMFS_DEVICE=cpu, LLMFS_DECODING_LAYOUT=0 (decoding layout off)")
    assert second == "error: bad value"


def test_folders_from_the_environment_are_named(real_notice, tmp_path):
    real_notice.setenv("LLMFS_OUTPUT_DIR", str(tmp_path / "out"))
    real_notice.setenv("LLMFS_DATA_MIRROR", str(tmp_path / "mirror"))
    real_notice.setenv("LLMFS_CACHE_DIR", str(tmp_path / "cache"))
    notice = environment_notice()
    for name in ("out", "mirror", "cache"):
        assert str(tmp_path / name) in notice
    assert notice.index("LLMFS_OUTPUT_DIR") < notice.index("LLMFS_DATA_MIRROR") < notice.index("LLMFS_CACHE_DIR")


def test_only_the_first_torchrun_process_names_them(real_notice, capsys):
    real_notice.setenv("LLMFS_DEVICE", "cpu")
    real_notice.setenv("RANK", "1")
    cli.run(lambda: None)
    assert capsys.readouterr().err == ""
    real_notice.setenv("RANK", "0")
    cli.run(lambda: None)
    assert capsys.readouterr().err.startswith("settings from the environment: LLMFS_DEVICE=cpu")


def test_a_command_names_its_settings_first(tmp_path):
    """A real `python -m` command, as a user runs it (no conftest): the line, then the error."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMFS_")}
    env.update(LLMFS_DEVICE="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "ch05.gpt_generate", "--model", str(tmp_path / "none.pth")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines[0] == "settings from the environment: LLMFS_DEVICE=cpu"
    assert lines[1].startswith("error: ") and len(lines) == 2


def _names_read(path: Path) -> set[str]:
    """Environment variable names a file reads: os.environ.get / os.getenv / os.environ[...] / `in os.environ`,
    with the name a string, a module constant, or a loop variable over a tuple of strings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    constants: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    constants.setdefault(target.id, set()).add(node.value.value)
        if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name) \
                and isinstance(node.iter, (ast.Tuple, ast.List)):
            constants.setdefault(node.target.id, set()).update(
                e.value for e in node.iter.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))

    def names(arg: ast.AST) -> set[str]:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return {arg.value}
        return constants.get(arg.id, set()) if isinstance(arg, ast.Name) else set()

    def is_environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
            if (node.func.attr == "get" and is_environ(node.func.value)) or node.func.attr == "getenv":
                found |= names(node.args[0])
        elif isinstance(node, ast.Subscript) and is_environ(node.value) and isinstance(node.ctx, ast.Load):
            found |= names(node.slice)
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            found |= names(node.left)
    return found


def test_every_environment_variable_the_code_reads_is_listed():
    files = [p for pattern in ("llmfs/*.py", "ch0*/**/*.py", "appendix-*/*.py", "benchmarks/*.py", "setup/*.py")
             for p in REPO.glob(pattern)]
    read: dict[str, list[str]] = {}
    for p in sorted(files):  # each file parsed once
        for name in _names_read(p):
            read.setdefault(name, []).append(str(p.relative_to(REPO)))
    listed = {name for var in environment_variables() for name in (var.name, *var.also)}
    # The scan itself works: it finds reads through a constant (QUICK_ENV), a string and a loop variable.
    assert {"LLMFS_QUICK", "LLMFS_DECODING_LAYOUT", "HF_ENDPOINT", "HTTPS_PROXY", "OLLAMA_HOST"} <= set(read)
    assert not {name: where for name, where in read.items() if name not in listed}


def test_each_listed_variable_has_a_default_and_a_meaning():
    variables = environment_variables()
    assert len({v.name for v in variables}) == len(variables)
    assert {v.name for v in variables if v.announced} == {
        "LLMFS_QUICK", "LLMFS_DEVICE", "LLMFS_OUTPUT_DIR", "LLMFS_DATA_MIRROR", "LLMFS_CACHE_DIR",
        "LLMFS_DECODING_LAYOUT"}
    for v in variables:
        assert v.default and len(v.meaning) > 20
        assert v.effect("") is None  # empty means unset


# --- a bug inside a training step keeps its traceback ------------------------------------------------

def _loss_with_a_bug(*args, **kwargs):
    raise ValueError("too many values to unpack (expected 2)")


def test_a_bug_in_the_chapter5_training_step_propagates(monkeypatch, tmp_path, capsys):
    import ch05.gpt_train
    from ch05.cli import train_main

    monkeypatch.setattr(ch05.gpt_train, "calc_loss_batch", _loss_with_a_bug)
    with pytest.raises(ValueError, match="too many values to unpack"):
        train_main(["--quick", "--output-dir", str(tmp_path), "--max-steps", "2", "--no-progress"])
    assert "error:" not in capsys.readouterr().err


def test_a_bug_in_the_chapter6_training_step_propagates(monkeypatch, tmp_path, capsys):
    import ch06.cli

    monkeypatch.setattr(ch06.cli.book, "calc_loss_batch", _loss_with_a_bug)
    with pytest.raises(ValueError, match="too many values to unpack"):
        ch06.cli.main(["--quick", "--output-dir", str(tmp_path), "--epochs", "1", "--no-progress"])
    assert "error:" not in capsys.readouterr().err
    assert not (tmp_path / "review_classifier.pth").exists()


def test_a_bug_in_a_training_step_shows_a_traceback_from_the_command(tmp_path):
    """The same bug in a real process: a traceback on stderr and Python's exit code 1, not `error:` and 2."""
    driver = ("import sys, ch05.gpt_train\n"
              "def loss(*a, **k):\n"
              "    raise ValueError('too many values to unpack (expected 2)')\n"
              "ch05.gpt_train.calc_loss_batch = loss\n"
              "from ch05.cli import train_main\n"
              f"sys.exit(train_main(['--quick', '--output-dir', {str(tmp_path)!r}, '--max-steps', '2', "
              "'--no-progress']))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMFS_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith("ValueError: too many values to unpack (expected 2)")
    assert "\nerror:" not in proc.stderr


# --- Ctrl-C while a command is still starting ------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc to interrupt during the import")
@pytest.mark.parametrize("module", ["ch05.gpt_train", "ch07.dpo", "benchmarks.run"])
def test_ctrl_c_while_pytorch_loads_is_one_line(module, tmp_path):
    """SIGINT once the process is loading PyTorch's library (seconds before the command's own error
    path exists): one line, no traceback, the exit status of Ctrl-C, nothing written."""
    import signal
    import time

    env = {**os.environ, "LLMFS_OUTPUT_DIR": str(tmp_path / "outputs"), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    maps = Path(f"/proc/{proc.pid}/maps")
    while time.monotonic() < deadline and proc.poll() is None and "libtorch" not in maps.read_text():
        time.sleep(0.005)
    assert proc.poll() is None, "the command finished before PyTorch loaded"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.strip()] == ["interrupted while starting: nothing was done"]
    assert proc.returncode in (-signal.SIGINT, 130) and out == ""
    assert list(tmp_path.iterdir()) == []
