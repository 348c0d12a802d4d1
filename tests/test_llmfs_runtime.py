"""llmfs/runtime.py (device choice, quick mode, seeding) and llmfs/atomic.py (atomic writes)."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llmfs import runtime
from llmfs.atomic import atomic_path, atomic_write
from llmfs.runtime import get_device, is_quick, set_seed


@pytest.fixture
def no_gpu(monkeypatch):
    """Pretend neither CUDA nor MPS is available, whatever this machine has."""
    monkeypatch.delenv("LLMFS_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


# --- get_device --------------------------------------------------------------------------------

def test_cpu_when_nothing_else(no_gpu):
    assert get_device() == torch.device("cpu")


def test_cuda_first_then_mps(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert get_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device() == torch.device("cuda")


def test_env_var_forces_cpu(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LLMFS_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    monkeypatch.setenv("LLMFS_DEVICE", " CPU ")
    assert get_device() == torch.device("cpu")


def test_prefer_wins_over_env(no_gpu, monkeypatch):
    monkeypatch.setenv("LLMFS_DEVICE", "cuda")
    assert get_device(prefer="cpu") == torch.device("cpu")


def test_unavailable_cuda_is_an_error(no_gpu, monkeypatch):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        get_device("cuda")
    monkeypatch.setenv("LLMFS_DEVICE", "cuda:0")
    with pytest.raises(RuntimeError, match="LLMFS_DEVICE"):
        get_device()


def test_unavailable_mps_is_an_error(no_gpu):
    with pytest.raises(RuntimeError, match="MPS is not available"):
        get_device("mps")


def test_cuda_index_out_of_range(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert get_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match="only 1 CUDA device"):
        get_device("cuda:3")


def test_unknown_device_name(no_gpu):
    with pytest.raises(RuntimeError, match="'gpu' is not a device"):
        get_device("gpu")


def test_real_machine_device_works():
    # Whatever this machine picks (honouring LLMFS_DEVICE) can hold a tensor.
    device = get_device()
    assert torch.ones(2, device=device).sum().item() == 2.0


# --- is_quick / set_seed -----------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("YES", True), (" on ", True),
                                            ("0", False), ("", False), ("no", False)])
def test_is_quick(monkeypatch, value, expected):
    monkeypatch.setenv(runtime.QUICK_ENV, value)
    assert is_quick() is expected


def test_is_quick_default_off(monkeypatch):
    monkeypatch.delenv("LLMFS_QUICK", raising=False)
    assert is_quick() is False


def test_set_seed_is_reproducible():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3)

    set_seed(7)
    a = draw()
    set_seed(7)
    b = draw()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# --- atomic writes ------------------------------------------------------------------------------

def test_atomic_write_replaces_file(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_write(target) as f:
        f.write("new content")
    assert target.read_text() == "new content"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_write_keeps_old_file_when_body_raises(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old content")
    with pytest.raises(ZeroDivisionError):
        with atomic_write(target) as f:
            f.write("half written")
            1 / 0
    assert target.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # temporary file removed


def test_atomic_write_binary(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_write(target, "wb") as f:
        f.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_atomic_path_for_torch_save(tmp_path):
    target = tmp_path / "model.pth"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".pth" and tmp.parent == tmp_path
        torch.save({"w": torch.arange(3)}, tmp)
    assert torch.equal(torch.load(target)["w"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "model.pth"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-save")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_reuse_freed_memory_on_glibc_keeps_allocations_working():
    import platform
    import sys

    import torch

    from llmfs.runtime import reuse_freed_memory

    result = reuse_freed_memory()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert result is True
    else:
        assert result is False
    # Large blocks now come from the heap; allocating and freeing them still works.
    for _ in range(3):
        t = torch.ones(64, 1024, 1024)  # 256 MiB
        assert float(t[-1, -1, -1]) == 1.0
        del t


def test_outputs_dir_is_one_folder_for_scripts_and_notebooks(monkeypatch, tmp_path):
    from llmfs.runtime import outputs_dir

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.delenv("LLMFS_OUTPUT_DIR", raising=False)
    monkeypatch.chdir(repo)  # `python -m ch05.gpt_train` from the repository root
    assert outputs_dir("ch05") == Path("outputs/ch05")
    monkeypatch.chdir(repo / "ch06")  # a notebook runs in its chapter folder: the same place
    assert outputs_dir("ch06") == Path("../outputs/ch06")
    assert (Path.cwd() / outputs_dir("ch06")).resolve() == repo / "outputs" / "ch06"
    monkeypatch.chdir(tmp_path)  # elsewhere: the checkout's folder, spelled out
    assert outputs_dir("ch07") == repo / "outputs" / "ch07"
    monkeypatch.setenv("LLMFS_OUTPUT_DIR", str(tmp_path / "runs"))
    assert outputs_dir("ch07") == tmp_path / "runs" / "ch07"
