"""Shared test set-up: make `tests/` importable, keep downloads local, seed torch."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests never touch the network: point the mirror at ../shared/data when it exists
# (CI sets this too) and keep the download cache inside pytest's temp area.
if "LLMFS_DATA_MIRROR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["LLMFS_DATA_MIRROR"] = str(SHARED_DATA)
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (the README's `-n auto`) the workers share the cores: each worker, and every notebook
# kernel and command it starts, runs torch on one thread (several threads per process on a shared CPU make
# a step many times slower). Set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Scripts and notebooks write to `outputs/<chapter>/` (llmfs.runtime.outputs_dir): during the tests
# (and the notebooks and subprocesses they start) that is a temporary folder, never the checkout.
_OUTPUTS = None
if "LLMFS_OUTPUT_DIR" not in os.environ:
    _OUTPUTS = tempfile.mkdtemp(prefix="llmfs-test-outputs-")
    os.environ["LLMFS_OUTPUT_DIR"] = _OUTPUTS


def pytest_sessionfinish(session, exitstatus):
    if _OUTPUTS is not None:
        shutil.rmtree(_OUTPUTS, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed every test; run it single-threaded.

    The tests use tiny models that gain nothing from threads, and on a busy CPU several
    threads per process can make a step tens of times slower.
    """
    try:
        import torch
    except ImportError:  # the tests that need no PyTorch, on another Python (.ci/run)
        yield
        return

    torch.manual_seed(123)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_environment_notice(monkeypatch):
    """Commands name the settings taken from the environment on their first stderr line
    (`llmfs.cli.run`); the tests' own settings (LLMFS_DATA_MIRROR, LLMFS_OUTPUT_DIR above) would put
    that line before every in-process command's output. The tests of the line turn it back on."""
    try:
        import llmfs.cli
    except ImportError:  # the tests that need no PyTorch, on another Python (.ci/run)
        return
    monkeypatch.setattr(llmfs.cli, "environment_notice", lambda environ=None: None)


@pytest.fixture
def verdict_text() -> str:
    from llmfs.download import get_data_file

    return get_data_file("the-verdict.txt", download=False).read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tokenizer():
    """The project's GPT-2 tokenizer (offline, from ch02/gpt2.tiktoken)."""
    from ch02.tokenizer import get_gpt2_tokenizer

    return get_gpt2_tokenizer()


@pytest.fixture
def short_text(verdict_text) -> str:
    """The first 1,200 characters of the-verdict: 17 training batches of 2 x 8 tokens, 2 validation batches."""
    return verdict_text[:1200]


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict:
    """Chapter 6's train/validation/test CSV files, written once per test module into a temporary folder."""
    from ch06.gpt_class_finetune import prepare_spam_splits

    return prepare_spam_splits(tmp_path_factory.mktemp("ch06"))


@pytest.fixture
def onednn_products(monkeypatch) -> list:
    """A list that gains one entry per product computed through oneDNN (`llmfs.onednn_linear`).

    Skips the test where this CPU/PyTorch has no usable oneDNN linear op.
    """
    import llmfs.onednn_linear as ol

    if not ol.onednn_linear_supported():
        pytest.skip("no usable oneDNN linear op on this CPU/PyTorch")
    calls: list = []
    product = ol._product
    monkeypatch.setattr(ol, "_product", lambda *args: calls.append(1) or product(*args))
    return calls
