"""The house: chapter folders hold the book, `llmfs` holds the machinery, and the arrows point one way.

* `llmfs` imports no chapter (what a run needs from one is passed in), checked on the source and by
  importing every `llmfs` module in a fresh interpreter;
* a chapter folder holds its notebooks, the book's modules, at most one command module (`cli.py`) and
  bonus subfolders: nothing else, so machinery cannot creep back into a chapter;
* no command executes its module twice (as `__main__` and again under its name).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from nbexec import REPO

CHAPTER = r"(ch0[2-7]|appendix_[ade])"
LLMFS_MODULES = sorted(p.stem for p in (REPO / "llmfs").glob("*.py") if p.stem != "__init__")

# Each chapter folder: the book's modules (the book's file names, and the appendices' listing modules),
# the one command module, and the bonus subfolders with their modules.
CHAPTER_FILES = {
    "ch02": {"tokenizer.py", "dataloader.py"},
    "ch03": {"attention.py"},
    "ch04": {"gpt.py"},
    "ch05": {"gpt_train.py", "gpt_generate.py", "gpt_download.py", "cli.py"},
    "ch06": {"gpt_class_finetune.py", "cli.py"},
    "ch07": {"gpt_instruction_finetuning.py", "ollama_evaluate.py", "cli.py"},
    "appendix-A": {"toy.py", "DDP-script.py"},
    "appendix-D": {"training.py"},
    "appendix-E": {"lora.py"},
}
BONUS_FOLDERS = {
    "ch02": {"bpe": {"bpe.py"}},
    "ch03": {"mha": {"mha_implementations.py"}},
    "ch05": {"llama": {"llama3.py", "qwen3.py", "gemma3.py", "generate_llm.py", "hf_save.py", "family_training.py", "__main__.py"}, "ui": {"app.py", "__main__.py"},
             "training_speed": {"training_speed.py"}, "gutenberg": {"prepare_dataset.py", "pretraining_simple.py"},
             "hparam_tuning": {"hparam_search.py"}},
    "ch06": {"ui": {"app.py", "__main__.py"}, "experiments": {"additional_experiments.py", "families.py"},
             "imdb": {"labeled_data.py", "report.py", "download_prepare_dataset.py", "train_gpt.py", "train_bert_hf.py",
                      "train_sklearn_logreg.py", "compare.py", "__main__.py"}},
    "ch07": {"dpo": {"dpo.py", "preference_data.py", "__main__.py"}, "other_families": {"family_finetuning.py"}, "export_gguf": {"export_gguf.py", "__main__.py"}, "serve": {"__main__.py"},
             "data_generation": {"generate_instruction_data.py", "reflection.py"},
             "dataset_utils": {"find_near_duplicates.py", "create_passive_voice_entries.py"},
             "model_evaluation": set(),
             "ui": {"app.py", "__main__.py"}},
}

# Every documented command, as `python -m` runs it.
COMMANDS = ["ch05.gpt_train", "ch05.gpt_generate", "ch05.gpt_download", "ch05.llama", "ch05.llama.generate_llm",
            "ch05.gutenberg.prepare_dataset", "ch05.gutenberg.pretraining_simple", "ch05.hparam_tuning.hparam_search",
            "ch05.ui", "ch06.gpt_class_finetune", "ch06.ui",
            "ch06.imdb", "ch06.imdb.download_prepare_dataset", "ch06.imdb.train_gpt", "ch06.imdb.train_bert_hf",
            "ch06.imdb.train_sklearn_logreg", "ch07.gpt_instruction_finetuning",
            "ch07.ollama_evaluate", "ch07.export_gguf", "ch07.dpo", "ch07.dpo.preference_data", "ch07.serve", "ch07.ui",
            "ch07.data_generation.generate_instruction_data", "ch07.data_generation.reflection",
            "ch07.dataset_utils.find_near_duplicates", "ch07.dataset_utils.create_passive_voice_entries"]


def imported_names(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
    return names


def test_llmfs_source_imports_no_chapter():
    import re

    offenders = {f"llmfs/{p.name}": sorted(n for n in imported_names(p) if re.match(CHAPTER + r"\b", n))
                 for p in sorted((REPO / "llmfs").glob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}


def test_importing_all_of_llmfs_loads_no_chapter():
    code = ("import importlib, sys\n"
            f"for name in {LLMFS_MODULES!r}: importlib.import_module('llmfs.' + name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ch02', 'ch03', 'ch04', 'ch05', 'ch06', 'ch07', 'appendix_a', 'appendix_d', 'appendix_e')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("folder", sorted(CHAPTER_FILES))
def test_chapter_folders_hold_the_book(folder):
    root = REPO / folder
    modules = {p.name for p in root.glob("*.py")} - {"__init__.py"}
    assert modules == CHAPTER_FILES[folder], f"{folder}/ should hold only the book's modules and cli.py"
    subfolders = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert subfolders == set(BONUS_FOLDERS.get(folder, {}))
    for name, files in BONUS_FOLDERS.get(folder, {}).items():
        assert {p.name for p in (root / name).glob("*.py")} - {"__init__.py"} == files


def test_chapters_use_llmfs_for_the_machinery():
    """The other direction: a chapter that needs a helper imports it from llmfs (a chapter module never
    defines its own atomic writes, downloads or device choice: those names live in llmfs alone)."""
    machinery = {"atomic_write", "atomic_path", "get_data_file", "get_device", "outputs_dir", "is_quick", "Parser",
                 "check_output_dir", "save_checkpoint", "make_optimizer"}
    defined = {}
    for path in sorted(REPO.glob("ch0*/**/*.py")) + sorted(REPO.glob("appendix-*/*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in machinery:
                defined.setdefault(str(path.relative_to(REPO)), []).append(node.name)
    assert not defined


# Runs each command as `python -m X --help` would (`runpy`, as __main__), all in ONE interpreter: the project's
# own modules are dropped from sys.modules before each command, so each runs as in a fresh process, while
# torch, gradio and the rest are imported once (27 fresh interpreters took ~80 s of CPU; this, ~10).
RUN_EACH_AS_MAIN = r"""
import contextlib, io, json, os, runpy, sys

repo = os.path.realpath(sys.argv[1])


def ours(module) -> bool:
    path = getattr(module, "__file__", None)
    if not path:
        return False
    inside = os.path.relpath(os.path.realpath(path), repo)
    return not inside.startswith((os.pardir, ".")) and not os.path.isabs(inside)


results = []
for command in sys.argv[2:]:
    for name in [name for name, module in list(sys.modules.items()) if ours(module)]:
        del sys.modules[name]
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [command, "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(command, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    results.append({"command": command, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()[-2000:],
                    "imported": sorted(name for name, module in sys.modules.items() if ours(module))})
print(json.dumps(results))
"""


def test_no_command_imports_its_own_module_again():
    """`python -m X` runs X as __main__; X (or X.__main__ for a package) must not be imported again by name."""
    out = subprocess.run([sys.executable, "-c", RUN_EACH_AS_MAIN, str(REPO), *COMMANDS], capture_output=True,
                         text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["command"] for r in results] == COMMANDS
    for r in results:
        assert r["code"] == 0 and "usage:" in r["stdout"], (r["command"], r["stderr"])
    # `python -m package` imports the package and runs its __main__.py; `python -m module` runs the module.
    executed = {r["command"]: f"{r['command']}.__main__" if (REPO / r["command"].replace(".", "/") / "__main__.py")
                .is_file() else r["command"] for r in results}
    twice = [executed[r["command"]] for r in results if executed[r["command"]] in r["imported"]]
    assert not twice, f"executed as __main__ and imported again by name: {twice}"
    # The check sees imports: each command's own package was imported (fresh, after the purge).
    assert all(r["command"].split(".")[0] in r["imported"] for r in results)
