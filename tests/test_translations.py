"""The Chinese notebooks (`*.zh-CN.ipynb`) are never stale (fast: nothing executes).

Each is written by `tests/translate_notebooks.py` from its English notebook and the catalogue
`docs/zh-CN/<notebook>.md`. These tests fail, naming the cells, when an English cell changed after its
translation or has none, when a Chinese notebook is not what the command writes, and they prove that
a Chinese notebook's code and stored outputs are the English notebook's, which is why CI does not
execute it a second time.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from nbexec import REPO, cell_source, discover
from translate_notebooks import (
    COMMAND,
    Entry,
    digest,
    english_notebooks,
    join_cjk_lines,
    load_catalogue,
    localize_links,
    parse_catalogue,
    problems,
    same_code,
    stale_message,
    translate,
    translations,
    twin_path,
)

ENGLISH = english_notebooks()
IDS = [p.relative_to(REPO).as_posix() for p in ENGLISH]


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("english", ENGLISH, ids=IDS)
def test_every_english_notebook_has_a_current_chinese_twin(english):
    rel = english.relative_to(REPO).as_posix()
    found = problems(load(english), load_catalogue(english))
    assert not found, stale_message(english, found)
    twin = twin_path(english)
    assert twin.exists(), f"{rel} has no Chinese twin; run `{COMMAND}`"
    assert twin.read_text(encoding="utf-8") == translate(english), \
        f"{twin.relative_to(REPO).as_posix()} is not what `{COMMAND}` writes; run it"


def test_no_chinese_notebook_without_its_english_source():
    twins = translations()
    assert len(twins) == len(ENGLISH)
    for twin in twins:
        english = twin.with_name(twin.name.replace(".zh-CN.ipynb", ".ipynb"))
        assert english in ENGLISH, f"{twin.relative_to(REPO)} has no English notebook"


def test_ci_executes_only_the_english_notebooks():
    found = discover()
    assert found and not any(p.name.endswith(".zh-CN.ipynb") for p in found)


@pytest.mark.parametrize("english", ENGLISH, ids=IDS)
def test_the_chinese_twin_has_the_english_code_and_outputs(english):
    """Read from the files themselves, not from the command: same cells, same code up to comments, same
    outputs and metadata, and every markdown cell translated."""
    en, zh = load(english), load(twin_path(english))
    assert [(c["cell_type"], c.get("id")) for c in zh["cells"]] == [(c["cell_type"], c.get("id")) for c in en["cells"]]
    meta = dict(zh["metadata"])
    assert meta.pop("llmfs_translation") == {"language": "zh-CN", "source": english.name}
    assert meta == en["metadata"], "the stored run's record (metadata.llmfs) is the English notebook's"
    for a, b in zip(en["cells"], zh["cells"]):
        if a["cell_type"] == "code":
            assert b["outputs"] == a["outputs"] and b["execution_count"] == a["execution_count"], a["id"]
            assert same_code(cell_source(a), cell_source(b)), f"cell {a['id']}: the code differs in more than its comments"
        elif a["cell_type"] == "markdown" and re.search(r"[A-Za-z]{4}", cell_source(a)):
            assert re.search(r"[\u4e00-\u9fff]", cell_source(b)), f"cell {a['id']} is not translated"


def headings(markdown: str) -> list[tuple[int, str]]:
    """(level, text) of each heading, outside fenced code blocks."""
    found, fenced = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = re.match(r"^(#{1,6})\s+(.*)", line)
        if m and not fenced:
            found.append((len(m.group(1)), m.group(2)))
    return found


@pytest.mark.parametrize("english", ENGLISH, ids=IDS)
def test_headings_keep_their_level_and_the_books_section_numbers(english):
    en, zh = load(english), load(twin_path(english))
    for a, b in zip(en["cells"], zh["cells"]):
        if a["cell_type"] != "markdown":
            continue
        ha, hb = headings(cell_source(a)), headings(cell_source(b))
        assert [lvl for lvl, _ in ha] == [lvl for lvl, _ in hb], f"cell {a['id']}: headings {ha} -> {hb}"
        for (_, ta), (_, tb) in zip(ha, hb):
            numbers = re.findall(r"(?<![\w.])[A-E]?\d+(?:\.\d+)*", ta)
            missing = [n for n in numbers if not re.search(rf"(?<![\w.]){re.escape(n)}(?![\d])", tb)]
            assert not missing, f"cell {a['id']}: the heading {ta!r} became {tb!r}, without {missing}"


def test_readme_zh_links_every_chinese_notebook():
    readme = (REPO / "README.zh-CN.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([^)\s]+\.zh-CN\.ipynb)\)", readme))
    expected = {twin_path(p).relative_to(REPO).as_posix() for p in ENGLISH}
    assert expected <= linked, f"README.zh-CN.md does not link {sorted(expected - linked)}"


# ---------------------------------------------------------------- the checks can fail

def sample() -> tuple[dict, dict[str, Entry]]:
    """A small English notebook and a current catalogue for it."""
    nb = {"cells": [
        {"cell_type": "markdown", "id": "m1", "metadata": {}, "source": "## 3.1 Attention\n\nA token."},
        {"cell_type": "code", "id": "c1", "metadata": {}, "execution_count": 1, "outputs": [],
         "source": "x = 1  # one\n# add them\ny = x + 1"},
        {"cell_type": "code", "id": "c2", "metadata": {}, "execution_count": 2, "outputs": [], "source": "print(y)"},
    ], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    entries = {"m1": Entry(digest(cell_source(nb["cells"][0])), False, False, "## 3.1 注意力\n\n一个词元。"),
               "c1": Entry(digest(cell_source(nb["cells"][1])), True, False, "x = 1  # 一\n# 把它们相加\ny = x + 1")}
    return nb, entries


def test_a_current_catalogue_has_no_problems():
    nb, entries = sample()
    assert problems(nb, entries) == []


def test_the_check_names_a_changed_cell_a_new_cell_and_a_todo():
    nb, entries = sample()
    changed = copy.deepcopy(nb)
    changed["cells"][0]["source"] = "## 3.1 Attention\n\nTwo tokens."
    assert problems(changed, entries) == ["cell 0 (id m1: '## 3.1 Attention') changed after its translation"]
    added = copy.deepcopy(nb)
    added["cells"].append({"cell_type": "markdown", "id": "m2", "metadata": {}, "source": "New text."})
    assert problems(added, entries) == ["cell 3 (id m2: 'New text.') has no translation"]
    todo = dict(entries, m1=Entry(entries["m1"].digest, False, True, "## 3.1 Attention"))
    assert problems(nb, todo) == ["cell 0 (id m1: '## 3.1 Attention') is marked todo"]
    gone = copy.deepcopy(nb)
    del gone["cells"][1]
    assert problems(gone, entries) == ["entry c1 names no cell of the notebook"]


def test_a_code_translation_may_change_comments_only():
    nb, entries = sample()
    assert same_code("x = 1  # one", "x = 1  # 一") and not same_code('print("a")', 'print("甲")')
    bad = dict(entries, c1=Entry(entries["c1"].digest, True, False, "x = 2  # 一\ny = x + 1"))
    assert problems(nb, bad) == ["cell 1 (id c1: 'x = 1  # one'): the translated code cell differs in more "
                                 "than its comments"]
    changed = copy.deepcopy(nb)
    changed["cells"][1]["source"] = "x = 2  # one\n# add them\ny = x + 1"
    assert problems(changed, entries) == ["cell 1 (id c1: 'x = 2  # one') changed after its translation"]


def test_the_catalogue_round_trips_and_rejects_a_broken_code_entry():
    catalogue = ("# header\n\n<!-- cell m1 en 0123456789ab -->\n## 3.1 注意力\n\n"
                 "<!-- cell c1 en 0123456789ab code todo -->\n```python\nx = 1  # 一\n```\n")
    entries = parse_catalogue(catalogue)
    assert entries == {"m1": Entry("0123456789ab", False, False, "## 3.1 注意力"),
                       "c1": Entry("0123456789ab", True, True, "x = 1  # 一")}
    with pytest.raises(ValueError, match="not one ```python block"):
        parse_catalogue("<!-- cell c1 en 0123456789ab code -->\nx = 1\n")
    with pytest.raises(ValueError, match="two entries"):
        parse_catalogue("<!-- cell m1 en 0123456789ab -->\na\n<!-- cell m1 en 0123456789ab -->\nb\n")


def test_links_to_english_notebooks_point_to_their_twins():
    folder = REPO / "ch05"
    assert localize_links("见 [第 4 章](../ch04/ch04.ipynb#4.6) 和 [代码](gpt_train.py)", folder) == \
        "见 [第 4 章](../ch04/ch04.zh-CN.ipynb#4.6) 和 [代码](gpt_train.py)"
    assert localize_links("[x](https://example.org/a.ipynb) [y](missing.ipynb)", folder) == \
        "[x](https://example.org/a.ipynb) [y](missing.ipynb)"


def test_the_chinese_set_up_adds_jupyterlabs_language_pack():
    lines = [line.strip() for line in (REPO / "requirements-zh.txt").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "-r requirements.txt" and lines[1].startswith("jupyterlab-language-pack-zh-CN")
    readme = (REPO / "README.zh-CN.md").read_text(encoding="utf-8")
    assert "pip install -r requirements-zh.txt" in readme and "HF_ENDPOINT" in readme and "LLMFS_DATA_MIRROR" in readme


def test_chinese_lines_of_a_paragraph_are_joined_outside_code_blocks():
    """A line break between two Chinese characters would render as a stray space."""
    assert join_cjk_lines("第一行，\n第二行。\n\n新段落") == "第一行，第二行。\n\n新段落"
    assert join_cjk_lines("使用 `x`\n和 y。\n- 列表\n- 项") == "使用 `x`\n和 y。\n- 列表\n- 项"
    assert join_cjk_lines("噪声、\n4.4 节\n和 `x`，\n`y` 和\n`z`") == "噪声、4.4 节和 `x`，`y` 和\n`z`"
    assert join_cjk_lines("- 第一项，\n  继续\n- 第二项") == "- 第一项，继续\n- 第二项"
    assert join_cjk_lines("```text\n中\n文\n```\n中\n文") == "```text\n中\n文\n```\n中文"


def test_saving_a_run_rewrites_the_chinese_twin(monkeypatch, tmp_path):
    """`nbexec.py --save` stores new outputs; the twin takes them at once (here written to a temporary file)."""
    import nbexec
    import translate_notebooks

    english = REPO / "ch04" / "exercise-solutions.ipynb"
    monkeypatch.setattr(translate_notebooks, "twin_path", lambda path: tmp_path / "twin.ipynb")
    nbexec.refresh_translation(english)
    assert (tmp_path / "twin.ipynb").read_text(encoding="utf-8") == translate(english)


def test_todo_marks_a_stale_entry_where_it_stands_and_appends_a_new_one(monkeypatch, tmp_path):
    import translate_notebooks

    nb, entries = sample()
    nb["cells"][0]["source"] = "## 3.1 Attention\n\nTwo tokens."
    nb["cells"].append({"cell_type": "markdown", "id": "m2", "metadata": {}, "source": "New text."})
    english = tmp_path / "sample.ipynb"
    english.write_text(json.dumps(nb), encoding="utf-8")
    catalogue = tmp_path / "sample.md"
    catalogue.write_text("# header\n\n" + "\n".join(translate_notebooks.format_entry(cid, e)
                                                 for cid, e in entries.items()), encoding="utf-8")
    monkeypatch.setattr(translate_notebooks, "catalogue_path", lambda path: catalogue)
    assert translate_notebooks.add_todo(english) == 2
    redone = parse_catalogue(catalogue.read_text(encoding="utf-8"))
    assert list(redone) == ["m1", "c1", "m2"]  # the stale entry kept its place
    assert redone["m1"] == Entry(digest("## 3.1 Attention\n\nTwo tokens."), False, True, "## 3.1 注意力\n\n一个词元。")
    assert redone["c1"] == entries["c1"] and redone["m2"] == Entry(digest("New text."), False, True, "New text.")
