"""The READMEs and the notebooks' text against the code: names, variables, paths and commands.

Documentation goes stale silently when code moves; these tests make a move fail loudly instead:

* "The book's names" table (both languages): `from <module> import <name>` works for every name;
* the environment-variable table (both languages) lists every variable the project's source reads;
* every repository path, dotted name and `python -m` command the READMEs and the notebooks' text
  name exists.

Nothing here runs a model; the only imports are the project's own modules.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
READMES = [REPO / "README.md", REPO / "README.zh-CN.md"]
DOCS = [*READMES, REPO / "setup" / "README.md", REPO / "benchmarks" / "README.md"]
NOTEBOOKS = sorted(p for p in REPO.glob("**/*.ipynb") if ".venv" not in p.parts and ".ipynb_checkpoints" not in p.parts)
# The source the environment-variable table must cover (the tests have their own check below).
SOURCE_DIRS = ["llmfs", "ch02", "ch03", "ch04", "ch05", "ch06", "ch07", "appendix-A", "appendix-D", "appendix-E",
               "benchmarks", "setup"]
PROJECT_TOP = r"(?:ch0[2-7]|llmfs|appendix_[ade]|benchmarks)"


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def section(text: str, *titles: str) -> str:
    """The body of the `## <title>` section (the first title found)."""
    for title in titles:
        m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
        if m:
            return m.group(1)
    raise AssertionError(f"no section {titles}")


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the markdown tables in `text`, as lists of stripped cells."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[\s|:-]+\|$", line):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[1:] if rows else rows  # the first row is the header


def markdown_cells(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(read(path))["cells"] if c["cell_type"] == "markdown"]


def code_cells(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(read(path))["cells"] if c["cell_type"] == "code"]


# --- The book's names ----------------------------------------------------------------------------------

def book_names(readme: Path) -> list[tuple[str, str]]:
    """(module, name) for every name in the README's "The book's names" table.

    A row is `| names | module |`; a row that lists several modules separated by " / " lists as many
    groups of names, in the same order. Asides in parentheses (prose, or a signature such as
    `query_model(prompt, model, url)`) are not names.
    """
    body = section(read(readme), "The book's names", "书中的名称")
    pairs = []
    for names_cell, module_cell in table_rows(body):
        names_cell = re.sub(r"`(\w+)\([^`]*\)`", r"`\1`", names_cell)  # a signature -> its name
        names_cell = re.sub(r"[(（][^)）]*[)）]", "", names_cell)  # asides
        groups, modules = names_cell.split(" / "), module_cell.split(" / ")
        assert len(groups) == len(modules), f"{readme.name}: {len(groups)} name groups for {len(modules)} modules"
        for group, module in zip(groups, modules):
            m = re.fullmatch(r"`([\w.]+)`", module.strip())
            assert m, f"{readme.name}: the module cell {module!r} should be one `module`"
            names = re.findall(r"`(\w+)`", group)
            assert names, f"{readme.name}: no names for {m.group(1)}"
            pairs += [(m.group(1), name) for name in names]
    return pairs


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_book_names_import_from_the_module_the_readme_names(readme):
    pairs = book_names(readme)
    assert len(pairs) >= 50 and ("ch06.gpt_class_finetune", "SpamDataset") in pairs
    failed = []
    for module, name in pairs:
        try:
            exec(f"from {module} import {name}", {})
        except ImportError as exc:
            failed.append(f"from {module} import {name}: {exc}")
    assert not failed, "\n".join(failed)


def test_book_names_tables_agree():
    en, zh = (book_names(p) for p in READMES)
    assert en == zh


def test_book_names_parser_pairs_groups_with_their_modules(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("## The book's names\n\n| The book's code | Here |\n|---|---|\n"
                      "| `query_model(prompt, model, url)` (an aside with `not_a_name`), `b` | `m1` |\n"
                      "| `c`, `d` / `e` | `m2` / `m3` |\n\n## Next\n", encoding="utf-8")
    assert book_names(readme) == [("m1", "query_model"), ("m1", "b"), ("m2", "c"), ("m2", "d"), ("m3", "e")]


# --- Environment variables -----------------------------------------------------------------------------

NAME = r"([A-Z][A-Z0-9_]*)"
READS = [
    rf'os\.environ\.get\(\s*"{NAME}"',
    rf'os\.environ\[\s*"{NAME}"\s*\](?!\s*=[^=])',  # a read, not an assignment
    rf'os\.getenv\(\s*"{NAME}"',
    rf'"{NAME}"\s+(?:not\s+)?in\s+os\.environ',
    rf'^\s*[A-Z_]*_ENV\s*=\s*"{NAME}"',  # QUICK_ENV = "LLMFS_QUICK", read through the constant
]
# `any(os.environ.get(v) for v in ("A", "B"))`, `for var in ("A", "B"):\n    os.environ.get(var)`
LOOP = r'for (\w+) in \(([^)]*)\)'


def variables_read(text: str) -> set[str]:
    found = set()
    for pattern in READS:
        found |= set(re.findall(pattern, text, re.M))
    for m in re.finditer(LOOP, text):
        var = re.escape(m.group(1))
        window = text[max(0, m.start() - 100):m.end() + 200]
        if re.search(rf"environ\.get\({var}\)|environ\[{var}\]|\b{var} in os\.environ|getenv\({var}\)", window):
            found |= set(re.findall(rf'"{NAME}"', m.group(2)))
    return found


def source_texts(folders) -> list[tuple[Path, str]]:
    texts = []
    for folder in folders:
        for path in sorted((REPO / folder).glob("**/*.py")):
            texts.append((path, read(path)))
        for path in sorted((REPO / folder).glob("**/*.ipynb")):
            texts += [(path, cell) for cell in code_cells(path)]
    return texts


def project_variables() -> set[str]:
    """Every variable the project's source reads; from the tests, the project's own (LLMFS_*) ones."""
    found = set().union(*(variables_read(text) for _, text in source_texts(SOURCE_DIRS)))
    found |= {v for _, text in source_texts(["tests"]) for v in variables_read(text) if v.startswith("LLMFS_")}
    return found


def documented_variables(readme: Path) -> set[str]:
    body = section(read(readme), "Environment variables", "环境变量")
    return {name for row in table_rows(body) for name in re.findall(rf"`{NAME}`", row[0])}


def test_the_variable_scanner_finds_each_kind_of_read():
    text = '''QUICK_ENV = "A_ENV_CONSTANT"
x = os.environ.get("B_GET", "0")
y = os.environ["C_INDEX"]
os.environ["NOT_READ"] = "1"
z = os.getenv("D_GETENV")
if "E_IN" not in os.environ: pass
any(os.environ.get(v) for v in ("F_LOOP", "G_LOOP"))
for var in ("H_LOOP",):
    print(os.environ.get(var))
for name in ("NOT_ENV",): print(name)
'''
    assert variables_read(text) == {"A_ENV_CONSTANT", "B_GET", "C_INDEX", "D_GETENV", "E_IN", "F_LOOP", "G_LOOP",
                                    "H_LOOP"}


def test_the_scan_covers_the_known_variables():
    assert {"LLMFS_QUICK", "LLMFS_DEVICE", "LLMFS_OUTPUT_DIR", "LLMFS_DATA_MIRROR", "LLMFS_CACHE_DIR",
            "LLMFS_DECODING_LAYOUT", "HF_ENDPOINT", "HF_HUB_OFFLINE", "OLLAMA_HOST", "HTTPS_PROXY", "WORLD_SIZE",
            "QWEN3_DIR", "LLMFS_SCREENSHOT_DIR"} <= project_variables()


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_every_variable_the_project_reads_is_in_the_readme_table(readme):
    missing = project_variables() - documented_variables(readme)
    assert not missing, f"{readme.name}'s environment-variable table lacks {sorted(missing)}"


def test_the_variable_tables_list_only_variables_the_project_uses_and_agree():
    """No stale rows: each variable is used by the source, or is one setup/README.md tells readers to set."""
    en, zh = (documented_variables(p) for p in READMES)
    assert en == zh
    everything = "\n".join(text for _, text in source_texts([*SOURCE_DIRS, "tests"]))
    everything += read(REPO / "setup" / "README.md")
    stale = {name for name in en if not re.search(rf"\b{name}\b", everything)}
    assert not stale, f"the READMEs document variables nothing uses: {sorted(stale)}"


def test_llmfs_quick_is_read_by_every_notebook_and_every_quick_option():
    """What the README says of LLMFS_QUICK: the notebooks read it, and every command's --quick is on
    with it (all of them add --quick through llmfs.cli.add_quick_argument, which reads it)."""
    without = [p.relative_to(REPO).as_posix() for p in NOTEBOOKS if "is_quick()" not in "\n".join(code_cells(p))]
    assert not without, f"notebooks that ignore LLMFS_QUICK: {without}"
    texts = list(source_texts(SOURCE_DIRS))
    own_quick = [path.relative_to(REPO).as_posix() for path, text in texts
                 if path.suffix == ".py" and re.search(r"""add_argument\(\s*["']--quick""", text)
                 and path.relative_to(REPO).as_posix() != "llmfs/cli.py"]  # add_quick_argument itself
    assert own_quick == [], f"--quick options that would not see LLMFS_QUICK: {own_quick}"
    users = {path.relative_to(REPO).as_posix() for path, text in texts if "add_quick_argument(p" in text}
    assert {"ch05/cli.py", "llmfs/finetuning.py", "ch07/dpo/dpo.py", "benchmarks/run.py"} <= users


# --- Paths, dotted names and commands in the text ------------------------------------------------------

def documentation() -> list[tuple[str, str]]:
    """(where, text) for the READMEs and every notebook's markdown cells."""
    docs = [(p.relative_to(REPO).as_posix(), read(p)) for p in DOCS]
    docs += [(f"{p.relative_to(REPO).as_posix()}[markdown]", cell) for p in NOTEBOOKS for cell in markdown_cells(p)]
    return docs


def resolves(dotted: str) -> bool:
    """`ch06.gpt_class_finetune.SpamDataset`: the longest importable prefix, then attributes."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        for attr in parts[n:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_paths_in_the_text_exist():
    """`ch05/llama/llama3.py` in backticks or as a link target is a file of the repository."""
    path = r"(?:ch0[2-7]|llmfs|appendix-[ADE]|benchmarks|setup|tests|docs)/[\w./-]*\.(?:py|ipynb|md|tiktoken|png)"
    missing = []
    for where, text in documentation():
        for target in set(re.findall(rf"`({path})`", text)) | set(re.findall(rf"\]\(({path})\)", text)):
            if not (REPO / target).exists() and not target.startswith("benchmarks/results/"):  # what they write
                missing.append(f"{where}: {target}")
    assert not missing, "\n".join(sorted(missing))


def test_dotted_names_in_the_text_resolve():
    """`ch06.cli.finetune`, `llmfs.runtime.is_quick()`: a module, or a name in one."""
    unresolved = set()
    for where, text in documentation():
        for dotted in re.findall(rf"`({PROJECT_TOP}(?:\.\w+)+)(?:\([^`]*\))?`", text):
            if dotted.rsplit(".", 1)[1] in {"py", "ipynb", "md", "json", "pth"}:  # a file name: `ch03.ipynb`
                continue
            if not resolves(dotted):
                unresolved.add(f"{where}: {dotted}")
    assert not unresolved, "\n".join(sorted(unresolved))


def test_python_m_commands_in_the_text_exist():
    """Every `python -m <project module>` the text shows can be run: a module, or a package with __main__."""
    missing = set()
    for where, text in documentation():
        for module in re.findall(rf"python -m ({PROJECT_TOP}(?:\.\w+)*)", text):
            spec = importlib.util.find_spec(module)
            runnable = spec is not None and (spec.submodule_search_locations is None
                                             or importlib.util.find_spec(module + ".__main__") is not None)
            if not runnable:
                missing.add(f"{where}: python -m {module}")
    assert not missing, "\n".join(sorted(missing))


def test_the_text_checks_catch_a_stale_name():
    assert resolves("ch06.gpt_class_finetune.SpamDataset") and resolves("llmfs.runtime")
    assert not resolves("ch06.spam_data.SpamDataset") and not resolves("ch06.gpt_class_finetune.no_such_name")


def test_readme_commands_match_test_layouts_list():
    """The commands the READMEs show are the ones tests/test_layout.py runs with --help."""
    from test_layout import COMMANDS

    shown = {m for readme in READMES for m in re.findall(r"python -m (ch0[2-7](?:\.\w+)*)", read(readme))}
    assert shown <= set(COMMANDS), f"commands missing from tests/test_layout.py: {sorted(shown - set(COMMANDS))}"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_the_readme_table_and_the_commands_list_agree(readme):
    """`llmfs.runtime.environment_variables()` is what the commands announce; the README names each of them."""
    from llmfs.runtime import environment_variables

    listed = {name.upper() for var in environment_variables() for name in (var.name, *var.also)}
    missing = sorted(listed - documented_variables(readme))  # the table writes http_proxy as HTTP_PROXY
    assert not missing, f"{readme.name}'s environment-variable table lacks {missing}"


def test_screenshots_come_from_documented_commands():
    """tests/screenshots.py runs the README's own commands, and both READMEs show its pictures
    with the command that produced each model."""
    import screenshots

    commands = {"python -m " + " ".join(args) for args in screenshots.TRAIN.values()}
    for readme in (REPO / "README.md", REPO / "README.zh-CN.md"):
        text = read(readme)
        blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S))
        if readme.name == "README.md":
            assert all(c in blocks for c in commands), "the screenshot tool trains with commands the README documents"
        for chapter in screenshots.TRAIN:
            assert f"docs/screenshots/{chapter}-app.png" in text and (REPO / f"docs/screenshots/{chapter}-app.png").is_file()
        assert all(f"`{c}`" in text for c in commands), f"{readme.name}: each caption names the command behind its model"
