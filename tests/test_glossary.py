"""Tests for docs/glossary.md: the Chinese text uses the Chinese edition's terms, one per concept.

The glossary's first table lists, per term, the translations in circulation that we do not use; none of
them may appear in the project's Chinese files (README.zh-CN.md, any other *.zh-CN.md, and the markdown
and code cells of notebooks whose name ends in .zh-CN.ipynb)."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLOSSARY = REPO / "docs" / "glossary.md"


def edition_terms() -> list[tuple[str, str, list[str]]]:
    """(English, 中文, [rejected translations]) of the glossary's first table."""
    text = GLOSSARY.read_text(encoding="utf-8")
    table = text.split("## The Chinese edition's terms")[1].split("\n## ")[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("English", "---"):
            rejected = [re.sub(r"\(.*?\)", "", r).strip() for r in cells[2].split(",")]
            rows.append((cells[0], cells[1], [r for r in rejected if r]))
    return rows


def chinese_texts() -> dict[str, str]:
    files = {p for p in REPO.rglob("*.zh-CN.md") if ".venv" not in p.parts and ".ci-venv" not in p.parts}
    texts = {p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8") for p in files}
    for nb in REPO.rglob("*.zh-CN.ipynb"):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        texts[nb.relative_to(REPO).as_posix()] = "\n".join("".join(c["source"]) for c in cells)
    return texts


def test_the_glossary_has_the_editions_terms():
    terms = {english: chinese for english, chinese, _ in edition_terms()}
    assert terms["token"] == "词元" and terms["tokenizer"] == "分词器" and terms["embedding"] == "嵌入"
    assert terms["self-attention"] == "自注意力" and terms["pretraining"] == "预训练" and terms["fine-tuning"] == "微调"
    assert all(rejected for _, _, rejected in edition_terms())


def test_chinese_text_uses_only_the_editions_terms():
    texts = chinese_texts()
    assert "README.zh-CN.md" in texts
    found = [(name, english, word) for name, text in texts.items() for english, _, rejected in edition_terms()
             for word in rejected if word in text]
    assert not found, f"translations the glossary rejects (file, term, word): {found}"
    assert all(chinese in texts["README.zh-CN.md"] for _, chinese, _ in edition_terms())  # and uses them


def test_the_glossary_check_finds_a_rejected_word():
    """The check can fail: a text with 令牌 for token is caught."""
    rejected = {word for _, _, words in edition_terms() for word in words}
    assert "令牌" in rejected and any(word in "每个令牌都有一个嵌入" for word in rejected)


# The English words each term of the first table stands for, as they appear in running text.
ENGLISH_FORMS = {
    "token": r"\btokens?\b",
    "tokenizer": r"\btokeni[sz]ers?\b",
    "tokenization": r"\btokeni[sz](?:ation|e|es|ed|ing)\b",
    "embedding": r"\bembeddings?\b",
    "self-attention": r"\bself-attention\b",
    "pretraining": r"\bpre-?train(?:s|ed|ing)?\b",
    "fine-tuning": r"\bfine-?tun(?:e|es|ed|ing)\b",
}


def prose(markdown: str) -> str:
    """The running text of a markdown cell: no code blocks, code spans, link targets or URLs."""
    markdown = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    markdown = re.sub(r"`[^`]*`", " ", markdown)
    markdown = re.sub(r"\]\([^)]*\)", "]", markdown)
    return re.sub(r"https?://\S+", " ", markdown)


def missing_terms(english: str, chinese: str) -> list[str]:
    """The glossary terms the English cell uses whose Chinese term its translation lacks."""
    chinese_terms = {english_term: chinese_term for english_term, chinese_term, _ in edition_terms()}
    text = prose(english)
    return [f"{term} -> {chinese_terms[term]}" for term, pattern in ENGLISH_FORMS.items()
            if re.search(pattern, text, re.I) and chinese_terms[term] not in chinese]


def test_every_edition_term_has_its_english_forms():
    assert {english for english, _, _ in edition_terms()} == set(ENGLISH_FORMS)


def test_translated_cells_use_the_editions_term_for_each_term_they_translate():
    """Where an English notebook cell says "token", its Chinese twin says 词元 (and so on for each term)."""
    found = []
    for nb in sorted(REPO.rglob("*.zh-CN.ipynb")):
        if {".venv", ".ci-venv"} & set(nb.relative_to(REPO).parts):
            continue
        english = nb.with_name(nb.name.replace(".zh-CN.ipynb", ".ipynb"))
        en, zh = (json.loads(p.read_text(encoding="utf-8"))["cells"] for p in (english, nb))
        for a, b in zip(en, zh):
            if a["cell_type"] == "markdown":
                lacking = missing_terms("".join(a["source"]), "".join(b["source"]))
                if lacking:
                    found.append(f"{nb.relative_to(REPO).as_posix()} cell {a.get('id')}: {', '.join(lacking)}")
    assert not found, "translations without the edition's term:\n" + "\n".join(found)


def test_the_term_check_finds_a_missing_term():
    assert missing_terms("Each token has an embedding (`tok_emb`).", "每个词元都有一个嵌入。") == []
    assert missing_terms("Each token has an embedding.", "每个单词都有一个向量。") == ["token -> 词元", "embedding -> 嵌入"]
    assert missing_terms("We fine-tune the pretrained model; see `tokens`.", "我们微调这个预训练模型。") == []
    assert missing_terms("The `tokenizer` object", "这个对象") == []
