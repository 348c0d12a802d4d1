"""Chapter 2 bonus notebook: comparing BPE implementations (ch02/bpe/compare-bpe-implementations.ipynb).

Recomputes the notebook's claims with the project's code: GPT-2's merges.txt written from the ranks
(its functions are the benchmark's, checked here), tiktoken, our `BPETokenizerSimple`, Hugging Face
`tokenizers` and `transformers`' `GPT2Tokenizer` giving identical ids and exact round trips on texts
with edge cases, what each does with `<|endoftext|>`, which class runs `transformers`' encoding, and
what a fresh process imports. Then reads the stored outputs (a quick-mode run) and checks that they show
the same: the True lines, the sample's ids, the tables' rows and the orderings the prose states. No
timing is asserted except orderings of a wide margin in the stored run, which the prose describes.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, GPT2Tokenizer, GPT2TokenizerFast

from benchmarks import bpe as bench
from ch02.bpe.bpe import BPETokenizerSimple, bytes_to_unicode
from ch02.tokenizer import END_OF_TEXT, get_gpt2_tokenizer
from llmfs.download import get_data_file
from test_ch02_bpe_bpe import HARD

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "ch02" / "bpe" / "compare-bpe-implementations.ipynb"
SAMPLE = f"Hello, do you like tea? {END_OF_TEXT} In the sunlit terraces of someunknownPlace."
TEXTS = [
    SAMPLE,
    "你好，世界！这是一个测试。分词器把汉字拆成字节。",
    "emoji 🎨🧑‍🎨👍🏽 and flags 🇳🇵🇩🇪",
    " " * 40 + "x" + "\n" * 7 + "\t \t" + " " * 3 + "y  \n  z" + " " * 5,
    "I'm sure you'll see they've done it; DON'T. 1234567890 3.14159 ٣٤٥",
    "trailing spaces   \n\n\n   and a lone tab\t",
    "",
    *HARD,
]


def notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def code_cells() -> list[str]:
    return ["".join(c["source"]) for c in notebook()["cells"] if c["cell_type"] == "code"]


def without_docstring(node: ast.FunctionDef) -> str:
    body = node.body[1:] if isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
        else node.body
    return ast.dump(ast.Module(body=body, type_ignores=[]))


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> dict:
    """The four GPT-2 tokenizers, the Hugging Face ones from files written as the notebook writes them."""
    folder = tmp_path_factory.mktemp("bpecmp")
    files = bench.write_tokenizer_files(folder)
    ours = BPETokenizerSimple()
    ours.load_tiktoken_ranks()
    return {"tiktoken": get_gpt2_tokenizer(), "ours": ours, "hf": Tokenizer.from_file(str(files["tokenizer.json"])),
            "transformers": GPT2Tokenizer.from_pretrained(files["gpt2 folder"]), "files": files}


# --- the notebook's code --------------------------------------------------------------------------------

def test_the_notebooks_merges_writer_is_the_benchmarks():
    """The notebook builds last_merge and write_vocab_and_merges; benchmarks/bpe.py must run the same code."""
    defined = {node.name: node for src in code_cells() for node in ast.parse(src).body
               if isinstance(node, ast.FunctionDef)}
    module = {node.name: node for node in ast.parse(Path(bench.__file__).read_text(encoding="utf-8")).body
              if isinstance(node, ast.FunctionDef)}
    for name in ("last_merge", "write_vocab_and_merges"):
        assert without_docstring(defined[name]) == without_docstring(module[name]), name


def test_merges_txt_holds_gpt2s_50000_merges_in_rank_order(tok):
    folder = tok["files"]["gpt2 folder"]
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 50_001
    assert lines[1:5] == ["Ġ t", "Ġ a", "h e", "i n"]  # GPT-2's own first merges
    from_char = {c: b for b, c in bytes_to_unicode().items()}
    ranks = tok["ours"].inverse_vocab
    for rank, line in enumerate(lines[1:], start=256):
        left, right = (bytes(from_char[c] for c in part) for part in line.split(" "))
        assert ranks[left + right] == rank and ranks[left] < rank and ranks[right] < rank, line
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50_257 and vocab[END_OF_TEXT] == 50256 and vocab["Ġthe"] == 262
    our_export = json.loads(tok["files"]["tokenizer.json"].read_text(encoding="utf-8"))
    assert len(our_export["model"]["merges"]) > 2 * 50_000  # every split, as the notebook says


# --- identical ids, round trips -------------------------------------------------------------------------

def encode_all(tok: dict, text: str) -> dict[str, list[int]]:
    return {"tiktoken": tok["tiktoken"].encode(text, allowed_special={END_OF_TEXT}),
            "ours": tok["ours"].encode(text, allowed_special={END_OF_TEXT}),
            "hf": tok["hf"].encode(text).ids, "transformers": tok["transformers"].encode(text)}


@pytest.mark.parametrize("text", TEXTS)
def test_four_tokenizers_give_identical_ids_and_round_trip(tok, text):
    ids = encode_all(tok, text)
    assert ids["ours"] == ids["hf"] == ids["transformers"] == ids["tiktoken"]
    assert tok["tiktoken"].decode(ids["tiktoken"]) == text
    assert tok["ours"].decode(ids["ours"]) == text
    assert tok["hf"].decode(ids["hf"], skip_special_tokens=False) == text
    assert tok["transformers"].decode(ids["transformers"]) == text


@pytest.mark.parametrize("name", ["the-verdict.txt", "tinyshakespeare.txt"])
def test_identical_ids_on_the_books_texts(tok, name):
    text = get_data_file(name, download=False).read_text(encoding="utf-8")[:100_000]
    ids = encode_all(tok, text)
    assert ids["ours"] == ids["hf"] == ids["transformers"] == ids["tiktoken"]
    paragraphs = text.split("\n\n")  # the batch encoders, as the notebook runs them
    reference = [tok["tiktoken"].encode(p) for p in paragraphs]
    assert [e.ids for e in tok["hf"].encode_batch(paragraphs)] == reference
    assert tok["transformers"](paragraphs)["input_ids"] == reference
    assert tok["tiktoken"].encode_batch(paragraphs) == reference


# --- <|endoftext|> ---------------------------------------------------------------------------------------

def test_special_token_behaviour_as_the_notebook_states(tok):
    text = f"one story{END_OF_TEXT}another"
    with pytest.raises(ValueError, match="disallowed special token"):
        tok["tiktoken"].encode(text)
    with pytest.raises(ValueError, match="allowed_special"):
        tok["ours"].encode(text)
    special = tok["tiktoken"].encode(text, allowed_special={END_OF_TEXT})
    assert 50256 in special
    assert tok["ours"].encode(text, allowed_special={END_OF_TEXT}) == special
    assert tok["hf"].encode(text).ids == tok["transformers"].encode(text) == special  # their default
    as_text = tok["tiktoken"].encode_ordinary(text)
    assert 50256 not in as_text and tok["tiktoken"].encode(text, disallowed_special=()) == as_text
    hf_as_text = Tokenizer.from_file(str(tok["files"]["tokenizer.json"]))
    hf_as_text.encode_special_tokens = True
    assert hf_as_text.encode(text).ids == as_text
    assert tok["transformers"].encode(text, split_special_tokens=True) == as_text
    assert tok["hf"].decode(special) == "one storyanother"  # skip_special_tokens=True by default
    assert tok["transformers"].decode(special) == text


def test_transformers_gpt2_tokenizer_is_the_rust_one(tok):
    folder = tok["files"]["gpt2 folder"]
    assert GPT2TokenizerFast is GPT2Tokenizer
    assert type(AutoTokenizer.from_pretrained(folder)) is GPT2Tokenizer
    assert type(AutoTokenizer.from_pretrained(folder, use_fast=False)) is GPT2Tokenizer
    assert GPT2Tokenizer.__mro__[1].__name__ == "TokenizersBackend"
    assert isinstance(tok["transformers"].backend_tokenizer, Tokenizer)
    assert type(tok["transformers"].backend_tokenizer.pre_tokenizer).__name__ == "ByteLevel"


def test_fresh_processes_show_what_each_imports(tok):
    folder = tok["files"]["tokenizer.json"].parent
    reports = {name: bench.load_in_fresh_process(name, folder)
               for name in ("tiktoken", "transformers GPT2Tokenizer", "transformers AutoTokenizer")}
    expected = get_gpt2_tokenizer().encode(SAMPLE, allowed_special="all")
    assert all(r["ids"] == expected for r in reports.values())
    assert reports["transformers GPT2Tokenizer"]["modules"] > 3 * reports["tiktoken"]["modules"]
    assert reports["transformers AutoTokenizer"]["torch"]
    assert not reports["transformers GPT2Tokenizer"]["torch"] and not reports["tiktoken"]["torch"]


# --- the stored outputs -------------------------------------------------------------------------------------

def stored() -> dict[str, str]:
    """Each code cell's stored stdout, by cell id."""
    return {c["id"]: "".join("".join(o.get("text", "")) for o in c.get("outputs", []))
            for c in notebook()["cells"] if c["cell_type"] == "code"}


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_stored_outputs_are_a_quick_mode_run_that_names_the_machine():
    out = stored()
    assert notebook()["metadata"]["llmfs"]["mode"] == "quick"
    assert out["bpecmp-01"].startswith("quick mode: True\n")
    assert re.search(r"CPU: .+ \| torch \d", out["bpecmp-01"])
    for cell in ("bpecmp-07", "bpecmp-09", "bpecmp-17"):  # every measurement names the CPU and torch
        assert re.search(r"CPU: .+ \| torch \d", out[cell]), cell
    assert "merges.txt: 50,000 merges" in out["bpecmp-05"] and "['Ġ t', 'Ġ a', 'h e', 'i n']" in out["bpecmp-05"]


def test_stored_loading_tables_show_what_the_prose_says():
    out = stored()
    kernel = {m[1]: (float(m[2]), float(m[3])) for m in re.finditer(
        r"^(tiktoken|ours|HF tokenizers|transformers)\s+([\d.]+)\s+([\d.]+)$", out["bpecmp-07"], re.M)}
    assert set(kernel) == {"tiktoken", "ours", "HF tokenizers", "transformers"}
    assert kernel["ours"][1] > 1 and kernel["tiktoken"][1] > 1  # Python objects that tracemalloc sees
    assert kernel["HF tokenizers"][1] < 0.5 and kernel["transformers"][1] < 0.5  # Rust's memory it does not
    rows = {m[1]: m.groups() for m in re.finditer(
        r"^(tiktoken|ours|HF tokenizers|transformers|AutoTokenizer)\s+([\d.]+)\s+([\d.]+)\s+([\d,]+)\s+(yes|no)"
        r"\s+([\d.]+)\s+([\d.]+)\s+(True|False)$", out["bpecmp-09"], re.M)}
    assert len(rows) == 5 and all(r[7] == "True" for r in rows.values()), out["bpecmp-09"]
    modules = {name: number(r[3]) for name, r in rows.items()}
    assert modules["transformers"] > 3 * max(modules["tiktoken"], modules["ours"], modules["HF tokenizers"])
    assert modules["AutoTokenizer"] > modules["transformers"]
    assert [name for name, r in rows.items() if r[4] == "yes"] == ["AutoTokenizer"]  # only it imports torch
    assert float(rows["transformers"][1]) > max(float(r[2]) for r in rows.values())  # import > any load
    rss = {name: float(r[5]) for name, r in rows.items()}
    assert max(rss, key=rss.get) == "AutoTokenizer"
    peak = float(rows["HF tokenizers"][6])
    assert peak > rss["HF tokenizers"]  # the prose: its peak is above its final memory


def test_stored_ids_and_special_tokens_agree_with_tiktoken():
    out = stored()
    assert "GPT2TokenizerFast is GPT2Tokenizer: True" in out["bpecmp-11"]
    assert "AutoTokenizer gives: GPT2Tokenizer | with use_fast=False: GPT2Tokenizer" in out["bpecmp-11"]
    assert "the engine that encodes: tokenizers.Tokenizer" in out["bpecmp-11"]
    rows = re.findall(r"^(.+?)\s+([\d,]+)\s+([\d,]+)\s+(True|False)\s+(True|False)$", out["bpecmp-13"], re.M)
    assert len(rows) == 6 and all(r[3] == r[4] == "True" for r in rows), out["bpecmp-13"]
    verdict = get_data_file("the-verdict.txt", download=False).read_text(encoding="utf-8")
    assert ("The Verdict", f"{len(verdict):,}", f"{len(get_gpt2_tokenizer().encode(verdict)):,}", "True",
            "True") in rows
    shown = re.search(r"the book's sample, ids:\s+(\[.*\])", out["bpecmp-13"])[1]
    assert json.loads(shown) == get_gpt2_tokenizer().encode(SAMPLE, allowed_special={END_OF_TEXT})
    special = out["bpecmp-15"]
    assert re.search(r"tiktoken\s+ValueError", special) and re.search(r"ours\s+ValueError", special)
    assert re.search(r"HF tokenizers\s+\[505, 1621, 50256, 29214\]", special)
    assert re.search(r"transformers\s+\[505, 1621, 50256, 29214\]", special)
    assert special.count("all the same: True") == 2
    as_text = str(get_gpt2_tokenizer().encode_ordinary(f"one story{END_OF_TEXT}another"))
    assert special.count(as_text) == 4
    assert "decoding it: HF tokenizers 'one storyanother' | transformers 'one story<|endoftext|>another'" in special


def test_stored_speed_table_has_every_encoder_and_identical_ids():
    out = stored()["bpecmp-17"]
    corpus = get_data_file("tinyshakespeare.txt", download=False).read_text(encoding="utf-8")[:200_000]
    head = re.search(r"^([\d,]+) characters, ([\d,]+) tokens; ([\d,]+) paragraphs", out, re.M)
    assert number(head[1]) == 200_000 and number(head[2]) == len(get_gpt2_tokenizer().encode(corpus))
    assert number(head[3]) == len(corpus.split("\n\n"))
    cpu = {m[1].strip(): number(m[2]) for m in re.finditer(r"^(\S.+?)\s+([\d,]+)\s+([\d,]+)\s+[\d.]+x$", out, re.M)}
    assert set(cpu) == {"tiktoken", "ours, empty word cache", "ours, warm word cache", "HF tokenizers",
                        "transformers", "tiktoken encode_batch", "HF tokenizers encode_batch",
                        "transformers tokenizer(list)"}
    assert "identical ids, whole text: True | paragraphs: True" in out
    # The prose: in the stored run both Hugging Face rows are slower than tiktoken and than ours (wide margins).
    for name in ("HF tokenizers", "transformers"):
        assert cpu[name] < 0.5 * cpu["tiktoken"] and cpu[name] < cpu["ours, empty word cache"], cpu
