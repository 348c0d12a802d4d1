"""Execute notebooks top to bottom with nbclient (used by the tests and by maintainers).

    python tests/nbexec.py --save ch02/ch02.ipynb   # run in quick mode, store outputs
    python tests/nbexec.py --full --save ch02/ch02.ipynb

A failing cell raises NotebookFailed with the cell's source and traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIRS = ("ch0*", "appendix-*")


class NotebookFailed(AssertionError):
    pass


def discover() -> list[Path]:
    """Every notebook in the chapter and appendix folders (new ones are picked up automatically)."""
    found = []
    for pattern in NOTEBOOK_DIRS:
        for folder in sorted(REPO.glob(pattern)):
            found += sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    return found


def execute(path: Path, quick: bool = True, save: bool = False, timeout: int = 900) -> nbformat.NotebookNode:
    path = Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    env_backup = os.environ.get("LLMFS_QUICK")
    os.environ["LLMFS_QUICK"] = "1" if quick else "0"
    # Headless plotting; the kernel inherits this process's environment.
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except CellExecutionError as exc:
        raise NotebookFailed(f"{path.relative_to(REPO)} failed:\n{exc}") from None
    finally:
        if env_backup is None:
            os.environ.pop("LLMFS_QUICK", None)
        else:
            os.environ["LLMFS_QUICK"] = env_backup
    if save:
        nbformat.write(nb, path)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: all notebooks")
    parser.add_argument("--save", action="store_true", help="write the outputs back into the notebook")
    parser.add_argument("--full", action="store_true", help="full settings instead of quick mode")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell (default 900)")
    args = parser.parse_args(argv)
    for nb in args.notebooks or discover():
        print(f"executing {nb} ({'full' if args.full else 'quick'} mode)", flush=True)
        execute(nb, quick=not args.full, save=args.save, timeout=args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
