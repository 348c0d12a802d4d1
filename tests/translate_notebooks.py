"""Write the Chinese notebooks (`*.zh-CN.ipynb`) from the English ones and a translation catalogue.

    python tests/translate_notebooks.py                 # regenerate every Chinese notebook
    python tests/translate_notebooks.py --check         # report what is stale, write nothing
    python tests/translate_notebooks.py --todo ch03/ch03.ipynb   # add entries to translate

One source, two languages: a Chinese notebook is its English notebook with the markdown cells (and,
where they teach, the comments of code cells) taken from `docs/zh-CN/<notebook path>.md`. Its code
and stored outputs are the English notebook's, so it is never executed a second time.

The catalogue is Markdown, one entry per cell, each entry opened by a marker line

    <!-- cell <cell id> en <digest> -->          a markdown cell's translation
    <!-- cell <cell id> en <digest> code -->     a code cell, comments translated (a ```python block)

where the digest is that of the English cell's text the entry translates. When an English cell
changes, its digest no longer matches and the entry is stale; a markdown cell without an entry is
untranslated. `--todo` appends an entry, marked `todo`, for each such cell (with the English text to
translate); `tests/test_translations.py` fails, naming the cells, until every entry is translated.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import nbformat

from nbexec import REPO, cell_source, discover, python_only

LANG = "zh-CN"
CATALOGUES = REPO / "docs" / LANG
MARKER = re.compile(r"^<!-- cell (\S+) en ([0-9a-f]{12})( code)?( todo)? -->$", re.M)
COMMAND = "python tests/translate_notebooks.py"


@dataclass
class Entry:
    digest: str
    code: bool
    todo: bool
    text: str


def digest(text: str) -> str:
    """The digest an entry records: what English text it translates."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def english_notebooks() -> list[Path]:
    return discover()  # it leaves the translations out


def translations() -> list[Path]:
    """Every Chinese notebook in the repository (one without an English source among them)."""
    return sorted(p for p in REPO.rglob(f"*.{LANG}.ipynb")
                  if not {".venv", ".ci-venv", ".ipynb_checkpoints"} & set(p.relative_to(REPO).parts))


def is_translation(path: Path) -> bool:
    return path.name.endswith(f".{LANG}.ipynb")


def twin_path(english: Path) -> Path:
    return english.with_name(english.name[: -len(".ipynb")] + f".{LANG}.ipynb")


def catalogue_path(english: Path) -> Path:
    rel = english.resolve().relative_to(REPO)
    return CATALOGUES / rel.with_suffix(".md")


def rel(path: Path) -> str:
    return path.resolve().relative_to(REPO).as_posix()


# ---------------------------------------------------------------- the catalogue

def parse_catalogue(text: str) -> dict[str, Entry]:
    """Cell id -> entry. The text before the first marker is the catalogue's own header."""
    entries: dict[str, Entry] = {}
    marks = list(MARKER.finditer(text))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = text[m.end():end].strip("\n")
        code = bool(m.group(3))
        if code:
            lines = body.split("\n")
            if len(lines) < 2 or lines[0].strip() != "```python" or lines[-1].strip() != "```":
                raise ValueError(f"the code entry for cell {m.group(1)} is not one ```python block")
            body = "\n".join(lines[1:-1])
        if m.group(1) in entries:
            raise ValueError(f"cell {m.group(1)} has two entries")
        entries[m.group(1)] = Entry(m.group(2), code, bool(m.group(4)), body)
    return entries


def format_entry(cell_id: str, entry: Entry) -> str:
    marker = f"<!-- cell {cell_id} en {entry.digest}{' code' if entry.code else ''}{' todo' if entry.todo else ''} -->"
    body = f"```python\n{entry.text}\n```" if entry.code else entry.text
    return f"{marker}\n{body}\n"


def header(english: Path) -> str:
    return (f"# {rel(english)}: 中文译文 / Chinese translation\n\n"
            f"One entry per cell; see `tests/translate_notebooks.py` for the format and "
            f"`docs/glossary.md` for the terms.\n"
            f"每个单元格一条译文；格式见 `tests/translate_notebooks.py`，译名见 `docs/glossary.md`。\n\n")


def load_catalogue(english: Path) -> dict[str, Entry]:
    path = catalogue_path(english)
    return parse_catalogue(path.read_text(encoding="utf-8")) if path.exists() else {}


# ---------------------------------------------------------------- code cells: comments only

def tokens(src: str) -> list[tokenize.TokenInfo] | None:
    """The Python tokens of a code cell (magics blanked); None when it does not tokenize."""
    try:
        return list(tokenize.generate_tokens(io.StringIO(python_only(src) + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None


def code_tokens(src: str) -> list[tuple[int, str]] | str:
    """The code without its comments, as tokens (magic lines kept as text); the text if it does not tokenize."""
    toks = tokens(src)
    if toks is None:
        return src
    magics = [(0, line) for line in src.split("\n") if line.lstrip().startswith(("%", "!"))]
    return magics + [(t.type, t.string) for t in toks if t.type not in (tokenize.COMMENT, tokenize.NL)]


def same_code(english: str, translated: str) -> bool:
    """True when the two cells differ at most in their comments."""
    return code_tokens(english) == code_tokens(translated)


# ---------------------------------------------------------------- checking and writing

def problems(english_nb: dict, entries: dict[str, Entry]) -> list[str]:
    """What keeps a notebook's translation from being current: one line per cell."""
    found = []
    ids = [c.get("id") for c in english_nb["cells"]]
    for i, cell in enumerate(english_nb["cells"]):
        cid, text = cell.get("id"), cell_source(cell)
        first = text.strip().split("\n")[0][:60]
        where = f"cell {i} (id {cid}: {first!r})"
        if not cid or ids.count(cid) > 1:
            found.append(f"{where} has no id of its own")
            continue
        entry = entries.get(cid)
        if cell["cell_type"] == "markdown":
            if entry is None:
                found.append(f"{where} has no translation")
                continue
        elif entry is None or cell["cell_type"] != "code":
            continue
        if entry.code != (cell["cell_type"] == "code"):
            found.append(f"{where}: the entry is for a {'code' if entry.code else 'markdown'} cell")
        elif entry.todo:
            found.append(f"{where} is marked todo")
        elif entry.digest != digest(text):
            found.append(f"{where} changed after its translation")
        elif entry.code and not same_code(text, entry.text):
            found.append(f"{where}: the translated code cell differs in more than its comments")
    found += [f"entry {cid} names no cell of the notebook" for cid in entries if cid not in ids]
    return found


def localize_links(text: str, folder: Path) -> str:
    """Links to an English notebook point to its Chinese twin."""
    def swap(m: re.Match) -> str:
        link, anchor = m.group(1), m.group(2) or ""
        target = (folder / link).resolve()
        if not is_translation(target) and target.exists() and REPO in target.parents:
            return f"]({link[: -len('.ipynb')]}.{LANG}.ipynb{anchor})"
        return m.group(0)
    return re.sub(r"\]\((?!https?:)([^)#\s]+\.ipynb)(#[^)\s]*)?\)", swap, text)


CJK = r"\u3000-\u303f\u4e00-\u9fff\uff00-\uffef"
CJK_PUNCT = r"\u3000-\u303f\uff00-\uffef"
# A break between two Chinese characters, or next to full-width punctuation (which brings its own spacing),
# unless the next line opens a block (list item, heading, table row, quote, code fence, HTML).
SOFT_BREAK = rf"(?<=[{CJK}])\n[ \t]*(?=[{CJK}])|(?<=[{CJK_PUNCT}])\n[ \t]*(?=\S)(?![-*+] |\d+[.)] |#|\||>|```|<)|\n[ \t]*(?=[{CJK_PUNCT}])"


def join_cjk_lines(text: str) -> str:
    """Join a paragraph's lines where the break touches Chinese on both sides or full-width punctuation:
    Markdown turns a line break into a space, which a browser shows between two Chinese characters.
    Code blocks keep their lines."""
    parts = re.split(r"(^```.*?^```[^\n]*$)", text, flags=re.M | re.S)
    return "".join(part if part.startswith("```") else re.sub(SOFT_BREAK, "", part)
                   for part in parts)


def stale_message(english: Path, found: list[str]) -> str:
    """What is stale, and what to run (the command's error and the test's message)."""
    return (f"{rel(english)}: " + "; ".join(found) + f". Translate them in {rel(catalogue_path(english))} "
            f"(`{COMMAND} --todo {rel(english)}` marks each one `todo` there, with the text to translate), "
            f"then run `{COMMAND}`")


def translate(english: Path) -> str:
    """The Chinese notebook's text; ValueError naming the cells when the catalogue is not current."""
    nb = json.loads(english.read_text(encoding="utf-8"))
    entries = load_catalogue(english)
    found = problems(nb, entries)
    if found:
        raise ValueError(stale_message(english, found))
    zh = copy.deepcopy(nb)
    for cell in zh["cells"]:
        entry = entries.get(cell.get("id"))
        if entry is not None:
            text = entry.text if entry.code else join_cjk_lines(localize_links(entry.text, english.parent))
            cell["source"] = text
    zh["metadata"]["llmfs_translation"] = {"language": LANG, "source": english.name}
    text = nbformat.writes(nbformat.from_dict(zh))
    return text if text.endswith("\n") else text + "\n"


def has_comments(src: str) -> bool:
    return any(t.type == tokenize.COMMENT for t in tokens(src) or [])


def add_todo(english: Path, code: bool = False) -> int:
    """Append a `todo` entry (the English text) for each untranslated or stale markdown cell and,
    with `code`, for each code cell with comments (delete those whose comments teach nothing)."""
    nb = json.loads(english.read_text(encoding="utf-8"))
    path = catalogue_path(english)
    text = path.read_text(encoding="utf-8") if path.exists() else header(english)
    entries = parse_catalogue(text)
    added = 0
    for cell in nb["cells"]:
        cid, src = cell.get("id"), cell_source(cell)
        entry = entries.get(cid)
        is_code = cell["cell_type"] == "code"
        if is_code:
            wanted = entry is not None or (code and has_comments(src))
        else:
            wanted = cell["cell_type"] == "markdown"
        if wanted and (entry is None or entry.digest != digest(src)):
            if entry is None:  # new: appended
                text = text.rstrip("\n") + "\n\n" + format_entry(cid, Entry(digest(src), is_code, True, src))
            else:  # stale: replaced where it stands; a translation's old text is the starting point
                old = MARKER.search(text, text.index(f"<!-- cell {cid} en "))
                nxt = MARKER.search(text, old.end())
                redo = format_entry(cid, Entry(digest(src), is_code, True, src if is_code else entry.text))
                text = text[:old.start()] + redo + ("\n" + text[nxt.start():] if nxt else "")
            added += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="English notebooks (default: all)")
    parser.add_argument("--check", action="store_true", help="report stale translations; write nothing")
    parser.add_argument("--todo", action="store_true", help="add `todo` entries for untranslated cells")
    parser.add_argument("--code", action="store_true", help="with --todo: also for code cells with comments")
    args = parser.parse_args(argv)
    notebooks = [p.resolve() for p in args.notebooks] or english_notebooks()
    failed = 0
    for english in notebooks:
        if args.todo:
            print(f"{rel(english)}: {add_todo(english, args.code)} entries to translate in {rel(catalogue_path(english))}")
            continue
        try:
            text = translate(english)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            failed += 1
            continue
        twin = twin_path(english)
        current = twin.read_text(encoding="utf-8") if twin.exists() else None
        if current != text:
            if args.check:
                print(f"{rel(twin)} is not what `{COMMAND}` writes", file=sys.stderr)
                failed += 1
            else:
                twin.write_text(text, encoding="utf-8")
                print(f"wrote {rel(twin)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
