"""Atomic file writes: write to a temporary file in the same folder, then rename.

A crash or Ctrl-C mid-write leaves either the old file or the new one, never half
a file. Used for downloads, checkpoints, CSV splits and JSON results.

The data is flushed to disk (fsync) before the rename, and the folder after it, so a
power cut cannot leave a renamed but empty file. Temporary files are named
`.<name>.<pid>.<random>.partial<suffix>`: a process killed mid-write (kill -9) leaves one
behind, and the next atomic write to the same file, or `remove_stale_temporary_files(folder)`,
deletes those whose process is gone (only files of this pattern, never anything else).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Iterator

_TEMP_MARK = ".partial"
# .<name>.<pid>.<random>.partial[<suffix>]
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.partial(?:\.[A-Za-z0-9]+)?$")


def _default_mode() -> int:
    """Permissions a normal `open()` would give (mkstemp makes files private, 0600).

    Linux tells the umask in /proc/self/status; elsewhere the only way to read it is to set it and
    set it back, which for that instant changes it for every thread of the process.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or we cannot tell: keep its file
    return True


def remove_stale_temporary_files(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete our temporary files in `folder` (of the file `name`, or of any file) whose writer has died.

    Returns the removed paths. Files that do not match our naming pattern are never touched.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    pattern = f".{name}.*{_TEMP_MARK}*" if name else f".*{_TEMP_MARK}*"
    for path in folder.glob(pattern):
        m = _TEMP_NAME.match(path.name)
        if not m or (name is not None and m.group("name") != name) or _pid_alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            path.unlink()
            removed.append(path)
    return removed


def _temp_file(path: Path, suffix: str = "") -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporary_files(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=_TEMP_MARK + suffix)
    os.chmod(tmp, _default_mode())
    return fd, tmp


def _fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: str, path: Path) -> None:
    """Rename into place, then fsync the folder so the rename itself is on disk."""
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # some file systems (and Windows) cannot fsync a folder
        _fsync_path(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file for writing that replaces `path` only on success."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for libraries that insist on writing by file name
    (e.g. `torch.save`, `safetensors.torch.save_file`, `plt.savefig`); fsynced and renamed
    into place on success. The temporary name ends in `path`'s suffix, for libraries that
    choose the format by it."""
    path = Path(path)
    fd, tmp = _temp_file(path, path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_path(tmp)
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
