"""The README's command blocks run top to bottom as written: in quick mode, offline, as a reader would.

Every ```bash block of README.md runs in order, each command as its own `bash -c`, in one fresh folder
that stands for the repository root (its `outputs/` is `LLMFS_OUTPUT_DIR`, `setup/` is linked in), with
`LLMFS_QUICK=1` (every command's `--quick` is on), `HF_HUB_OFFLINE=1`, an empty Hugging Face cache and
no Ollama server:

* a command that sets up the environment or starts something a person uses (pip, venv, JupyterLab, a
  web page, this test suite) is skipped, with the reason (`SKIPPED`);
* a command that needs the network or an Ollama server (`NEEDS_NETWORK`) must end, offline, the way a
  reader without them sees it: one `error:` line, no traceback;
* a command ending in `&` runs in the background until the block's `kill %1` (the test waits until the
  server answers, and checks it stops cleanly);
* every other command must exit 0, without a traceback.

So a block that only works in another order, or a line refused because an earlier one left a model
in the way, fails here. README.zh-CN.md must hold the same commands (`test_both_readmes_run_the_same_commands`).
Marked `notebook` (slow: it trains the quick models of chapters 5 to 7); the fast suite skips it.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (pattern in the command, why it is not run here)
SKIPPED = [
    (r"^pip install|^python -m pip", "installs packages (CI installs from the same files before the tests)"),
    (r"^python3? -m venv|^source ", "creates or activates a virtual environment"),
    (r"^jupyter lab", "starts JupyterLab (tests/test_notebooks.py runs every notebook)"),
    (r"^python -m pytest", "this test suite"),
    (r"^python -m ch0[567]\.ui\b", "a web page that runs until Ctrl-C (tests/test_ch0N_ui_app.py drives it in a browser)"),
]
# (pattern, what it needs): offline, these must fail in one line
NEEDS_NETWORK = [
    (r"ch05\.gpt_download gpt2", "OpenAI's GPT-2 weights"),
    (r"--model (gpt2|Qwen/|path/to/)", "weights from the Hugging Face Hub (or a folder the reader has)"),
    (r"^python -m ch07\.ollama_evaluate", "an Ollama server (OLLAMA_HOST points at nothing here)"),
    (r"ch07\.dpo\.preference_data", "an Ollama-API server"),
]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments dropped, `a && b` split."""
    joined = re.sub(r"\\\n", " ", block)
    result = []
    for line in joined.splitlines():
        tokens = shlex.split(line, comments=True)
        while "&&" in tokens:
            i = tokens.index("&&")
            result.append(tokens[:i])
            tokens = tokens[i + 1:]
        if tokens:
            result.append(tokens)
    return result


def program(tokens: list[str]) -> str:
    """The command without the environment assignments in front of it."""
    words = [t for t in tokens if not re.fullmatch(r"[A-Z_]+=\S*", t)]
    return " ".join(words)


def classify(tokens: list[str]) -> tuple[str, str]:
    text = program(tokens)
    for pattern, why in SKIPPED:
        if re.search(pattern, text):
            return "skip", why
    if text == "kill %1":
        return "stop", "the server started with &"
    if tokens[-1] == "&":
        return "background", "a server"
    if "OLLAMA_HOST=" not in " ".join(tokens):  # one talking to the block's own server needs no Ollama
        for pattern, why in NEEDS_NETWORK:
            if re.search(pattern, text):
                return "offline-error", why
    return "run", ""


README_BLOCKS = bash_blocks((REPO / "README.md").read_text(encoding="utf-8"))


def test_both_readmes_run_the_same_commands():
    zh = bash_blocks((REPO / "README.zh-CN.md").read_text(encoding="utf-8"))
    assert [commands(b) for b in zh] == [commands(b) for b in README_BLOCKS]


def test_every_command_is_run_or_skipped_for_a_stated_reason():
    kinds = [classify(c) for block in README_BLOCKS for c in commands(block)]
    assert sum(kind == "run" for kind, _ in kinds) >= 8  # the blocks are mostly run, not skipped
    assert all(why for kind, why in kinds if kind != "run")


# --- Running the blocks -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """A fresh 'repository root' for the blocks, and the environment they run under (state shared by
    the blocks in order: a later block uses what an earlier one trained)."""
    root = tmp_path_factory.mktemp("readme-root")
    for name in ("setup", "appendix-A"):
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    env = {**os.environ, "LLMFS_QUICK": "1", "LLMFS_OUTPUT_DIR": str(root / "outputs"), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(root / "hf-home"), "HF_HUB_CACHE": str(root / "hf-home" / "hub"), "LLMFS_DEVICE": "cpu",
           "OLLAMA_HOST": "127.0.0.1:9", "MPLBACKEND": "Agg", "PYTHONUTF8": "1", "OMP_NUM_THREADS": "2"}
    env.pop("HF_ENDPOINT", None)
    return {"root": root, "env": env, "background": []}


def _error_lines(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return [line for line in lines if not line.startswith("settings from the environment:")]


def _wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server stopped: {proc.communicate()[1][-2000:]}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing answered on port {port} within {seconds} s")


def _server_port(tokens: list[str]) -> int:
    if "--port" in tokens:
        return int(tokens[tokens.index("--port") + 1])
    from llmfs.serve import DEFAULT_PORT

    return DEFAULT_PORT


@pytest.mark.notebook
@pytest.mark.parametrize("index", range(len(README_BLOCKS)), ids=[f"block{i + 1}" for i in range(len(README_BLOCKS))])
def test_readme_block_runs_top_to_bottom(index, reader):
    root, env = reader["root"], reader["env"]
    for tokens in commands(README_BLOCKS[index]):
        kind, why = classify(tokens)
        shown = shlex.join(tokens)
        if kind == "skip":
            continue
        if kind == "background":
            proc = subprocess.Popen(["bash", "-c", shlex.join(tokens[:-1])], cwd=root, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            reader["background"].append(proc)
            _wait_for_port(_server_port(tokens), proc)
            continue
        if kind == "stop":
            proc = reader["background"].pop(0)
            os.killpg(proc.pid, signal.SIGTERM)  # what `kill %1` sends
            out, err = proc.communicate(timeout=60)
            assert "Traceback" not in err, f"{shown}: the server's stderr:\n{err[-3000:]}"
            continue
        started = time.perf_counter()
        proc = subprocess.run(["bash", "-c", shown], cwd=root, env=env, capture_output=True, text=True,
                              timeout=900)
        seconds = time.perf_counter() - started
        report = f"{shown}\n(exit {proc.returncode} after {seconds:.0f} s)\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, report
        if kind == "offline-error":
            lines = _error_lines(proc.stderr)
            assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), \
                f"needs {why}: offline it must end in one error line\n{report}"
        else:
            assert proc.returncode == 0, report
    assert not reader["background"], "a server started with & was not stopped by the block"
