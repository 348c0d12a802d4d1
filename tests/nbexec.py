"""Execute notebooks top to bottom with nbclient (used by the tests and by maintainers).

    python tests/nbexec.py --save ch02/ch02.ipynb   # run in quick mode, store outputs
    python tests/nbexec.py --full --save ch02/ch02.ipynb

A failing cell raises NotebookFailed with the cell's source and traceback.

`--save` also records, in the notebook's metadata (`llmfs`), the mode of the run and a digest of
what produced the stored outputs: the code cells, every project module the code cells import
(a file under this repository, found from the import statements without importing anything) and
every project script they name in a string (`DDP-script.py`, which appendix A runs).
`tests/test_notebook_digests.py` recomputes it, so a commit that changes a cell or an imported
module without re-running the notebook fails a fast test that names the notebook to re-run.
It then rewrites the notebook's Chinese twin, whose outputs are the English notebook's
(tests/translate_notebooks.py).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIRS = ("ch0*", "appendix-*")


# Import names whose folder differs from the package name (see pyproject's package-dir).
PACKAGE_DIRS = {"appendix_a": "appendix-A", "appendix_d": "appendix-D", "appendix_e": "appendix-E"}


class NotebookFailed(AssertionError):
    pass


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cell_source(cell: dict) -> str:
    """A cell's text (notebook JSON stores it as one string or as a list of lines)."""
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def code_sources(nb: dict) -> list[str]:
    """The source of every code cell, in order (what the digest covers of the notebook itself)."""
    cells = nb["cells"] if isinstance(nb, dict) else nb.cells
    return [cell_source(c) for c in cells if c["cell_type"] == "code"]


def python_only(src: str) -> str:
    """A code cell with its IPython magics and shell escapes blanked (they are not Python)."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in src.split("\n"))


def module_file(dotted: str) -> Path | None:
    """The repository file of a project module (`ch05.gpt_train` -> ch05/gpt_train.py), else None."""
    parts = dotted.split(".")
    parts[0] = PACKAGE_DIRS.get(parts[0], parts[0])
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file() and ".venv" not in candidate.relative_to(REPO).parts:
            return candidate
    return None


def cell_nodes(sources: list[str]):
    """Every syntax node of the code cells (IPython magics and shell escapes are not Python: skipped)."""
    for src in sources:
        yield from ast.walk(ast.parse(python_only(src)))


def imported_project_files(sources: list[str]) -> list[Path]:
    """Project files named by the import statements of the code cells."""
    found: set[Path] = set()
    for node in cell_nodes(sources):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from ch05 import gpt_train` imports the package and, when it names one, a submodule.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            path = module_file(name)
            if path is not None:
                found.add(path)
    return sorted(found)


def named_project_scripts(sources: list[str], folder: Path) -> list[Path]:
    """Python files of the project a code cell names in a string (e.g. `Path("DDP-script.py")`, run or
    printed by the notebook), relative to the notebook's folder."""
    found: set[Path] = set()
    for node in cell_nodes(sources):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py") \
                and "\n" not in node.value:
            path = (folder / node.value).resolve()
            if path.is_file() and REPO in path.parents:
                found.add(path)
    return sorted(found)


def notebook_digest(nb: dict, folder: Path | None = None) -> dict:
    """What the stored outputs depend on: the code cells, the project modules they import and the
    project scripts they name (`folder`: the notebook's folder, where such names are looked up)."""
    sources = code_sources(nb)
    code = _sha("\n\0\n".join(sources).encode("utf-8"))
    files = set(imported_project_files(sources))
    if folder is not None:
        files |= set(named_project_scripts(sources, Path(folder)))
    modules = {p.relative_to(REPO).as_posix(): _sha(p.read_bytes().replace(b"\r\n", b"\n")) for p in sorted(files)}
    return {"code": code, "modules": modules}


def discover() -> list[Path]:
    """Every notebook in the chapter and appendix folders (new ones are picked up automatically).

    The Chinese twins (`*.zh-CN.ipynb`) are left out: their code and outputs are the English
    notebook's (tests/translate_notebooks.py writes them, tests/test_translations.py proves it)."""
    found = []
    for pattern in NOTEBOOK_DIRS:
        for folder in sorted(REPO.glob(pattern)):
            found += sorted(p for p in folder.rglob("*.ipynb")
                            if ".ipynb_checkpoints" not in p.parts and not p.name.endswith(".zh-CN.ipynb"))
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
        nb.metadata["llmfs"] = {"mode": "quick" if quick else "full", **notebook_digest(nb, path.parent)}
        nbformat.write(nb, path)
        refresh_translation(path)
    return nb


def refresh_translation(path: Path) -> None:
    """New outputs go into the Chinese twin too (its outputs are the English notebook's)."""
    import translate_notebooks  # imports this module: imported here, not at the top

    try:
        text = translate_notebooks.translate(path)
    except ValueError as exc:  # a changed cell waits for its translation: the tests say which
        print(f"the Chinese twin was not rewritten: {exc}", file=sys.stderr)
        return
    translate_notebooks.twin_path(path).write_text(text, encoding="utf-8")


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
