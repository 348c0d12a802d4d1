"""Stored notebook outputs are never stale (fast: nothing executes).

`python tests/nbexec.py --save` records a digest of a notebook's code cells and of the project
modules they import. When a commit changes either without re-running the notebook, the digest no
longer matches and this test names the notebook and the command that re-runs it.
"""

from __future__ import annotations

import json
import re

import pytest

from nbexec import REPO, discover, imported_project_files, notebook_digest

NOTEBOOKS = discover()


def rerun_command(rel: str, mode: str) -> str:
    return f"python tests/nbexec.py --save {'--full ' if mode == 'full' else ''}{rel}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(REPO)) for p in NOTEBOOKS])
def test_stored_outputs_come_from_the_current_code(path):
    rel = path.relative_to(REPO).as_posix()
    nb = json.loads(path.read_text(encoding="utf-8"))
    stored = nb["metadata"].get("llmfs")
    assert stored and stored.get("mode") in ("quick", "full"), \
        f"{rel} has no record of the run that stored its outputs; run: {rerun_command(rel, 'quick or --full')}"
    now = notebook_digest(nb, path.parent)
    changed = []
    if stored.get("code") != now["code"]:
        changed.append("its code cells")
    old_modules = stored.get("modules", {})
    changed += [f"{m} (changed)" for m in sorted(now["modules"]) if m in old_modules and old_modules[m] != now["modules"][m]]
    changed += [f"{m} (newly imported)" for m in sorted(set(now["modules"]) - set(old_modules))]
    changed += [f"{m} (no longer imported)" for m in sorted(set(old_modules) - set(now["modules"]))]
    assert not changed, (f"{rel}: the stored outputs predate changes to {', '.join(changed)}; "
                         f"re-run it: {rerun_command(rel, stored['mode'])}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(REPO)) for p in NOTEBOOKS])
def test_recorded_mode_is_the_mode_the_outputs_print(path):
    """The first code cell prints `quick mode: True/False`; the record must agree with it."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    mode = nb["metadata"].get("llmfs", {}).get("mode")
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                      for o in c.get("outputs", []))
    m = re.search(r"quick mode: (True|False)", printed)
    assert m, f"{path.relative_to(REPO)} does not print its mode"
    assert mode == ("quick" if m.group(1) == "True" else "full"), path.relative_to(REPO)


def test_the_digest_sees_cells_and_imported_modules():
    """A changed cell changes the digest; an imported module is covered, a third-party one is not."""
    nb = {"cells": [{"cell_type": "markdown", "source": "# Title"},
                    {"cell_type": "code", "source": "import torch\nfrom ch04.gpt import GPTModel\n%time 1"},
                    {"cell_type": "code", "source": ["from ch05 import gpt_train\n", "x = 1\n"]}]}
    digest = notebook_digest(nb)
    assert set(digest["modules"]) == {"ch04/gpt.py", "ch05/__init__.py", "ch05/gpt_train.py"}
    nb["cells"][2]["source"] = ["from ch05 import gpt_train\n", "x = 2\n"]
    assert notebook_digest(nb)["code"] != digest["code"]
    nb["cells"][0]["source"] = "# Another title"  # markdown is not code: no re-run needed
    assert notebook_digest(nb)["code"] == notebook_digest({"cells": nb["cells"][1:]})["code"]
    assert [p.relative_to(REPO).as_posix() for p in imported_project_files(["import appendix_a"])] \
        == ["appendix-A/__init__.py"]
    run_script = {"cells": [{"cell_type": "code", "source": 'script = Path("DDP-script.py")\nx = "no-such.py"'}]}
    assert list(notebook_digest(run_script, REPO / "appendix-A")["modules"]) == ["appendix-A/DDP-script.py"]
