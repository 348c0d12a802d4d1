"""Tests for llmfs/atomic.py: data reaches the disk before the rename, and temporary files of a killed
writer are removed at the next start (only ours). (A failed write keeping the old file: test_ch02_runtime.py.)"""

import os
import signal
import subprocess
import sys
import time

from llmfs import atomic
from llmfs.atomic import atomic_path, atomic_write, remove_stale_temporary_files


def test_fsync_comes_before_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: events.append("rename") or replace(a, b))
    with atomic_write(tmp_path / "a.json") as f:
        f.write("{}")
    assert events[:2] == ["fsync", "rename"]
    events.clear()
    with atomic_path(tmp_path / "b.pth") as tmp:
        tmp.write_bytes(b"data")
    assert events[:2] == ["fsync", "rename"]
    assert (tmp_path / "a.json").read_text() == "{}" and (tmp_path / "b.pth").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.pth"]


def test_temporary_file_of_a_killed_writer_is_removed_at_the_next_write(tmp_path):
    target = tmp_path / "checkpoint.pth"
    code = ("import sys, time; from llmfs.atomic import atomic_path\n"
            "cm = atomic_path(sys.argv[1]); tmp = cm.__enter__(); tmp.write_bytes(b'x' * 1000)\n"
            "print(tmp, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    left = proc.stdout.readline().strip()
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 mid-write: no cleanup runs in the writer
    proc.wait(timeout=30)
    proc.stdout.close()
    assert os.path.exists(left) and not target.exists()
    # Not ours, or not a temporary file: never touched.
    others = [tmp_path / ".checkpoint.pth.tmp", tmp_path / "notes.partial", tmp_path / ".x.12.ab.partial.pth"]
    for p in others:
        p.write_text("keep")
    # A temporary file of a writer that is still alive (this process) is kept too.
    alive = tmp_path / f".checkpoint.pth.{os.getpid()}.abcd1234.partial.pth"
    alive.write_text("in progress")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert not os.path.exists(left)
    assert target.read_bytes() == b"new" and alive.exists() and all(p.exists() for p in others)


def test_remove_stale_temporary_files_of_a_folder(tmp_path):
    dead_pid = 2 ** 22 + 12345  # above the default pid_max of 4194304: no such process
    stale = [tmp_path / f".model.pth.{dead_pid}.k2j3h4.partial.pth", tmp_path / f".a.json.{dead_pid}.zz.partial"]
    for p in stale:
        p.write_text("stale")
    (tmp_path / "model.pth").write_text("a model")
    start = time.perf_counter()
    removed = remove_stale_temporary_files(tmp_path)
    assert sorted(removed) == sorted(stale) and time.perf_counter() - start < 5
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_files_get_the_permissions_open_would_give_without_touching_the_umask(tmp_path, monkeypatch):
    """The umask is read, not set and reset (that would change it for every thread for an instant)."""
    import os
    import sys

    import pytest

    from llmfs import atomic

    old = os.umask(0o027)
    try:
        if sys.platform.startswith("linux"):
            monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("os.umask called"))
        assert atomic._default_mode() == 0o640
        with atomic.atomic_write(tmp_path / "a.txt") as f:
            f.write("x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)
