"""ch02/bpe/bpe.py: the byte pair encoding tokenizer from scratch.

GPT-2 parity with the project's tiktoken tokenizer, round trips (property-based with hypothesis),
deterministic training with the documented tie rule, naive and incremental trainers agreeing, the
Hugging Face and tiktoken exports giving identical ids, files and errors.
"""

import ast
import base64
import json
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ch02.bpe.bpe as bpe
from ch02.bpe.bpe import BPETokenizerSimple, PairCounts, bpe_word, bytes_to_unicode, train_naive
from ch02.tokenizer import END_OF_TEXT, GPT2_PATTERN, get_gpt2_tokenizer
from llmfs.download import get_data_file
from llmfs.errors import InvalidInput
from test_ch02_tokenizer import SAMPLE, SAMPLE_IDS, TRICKY

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "ch02" / "bpe" / "bpe-from-scratch.ipynb"

# Deterministic, and no example database written into the working tree.
PROPERTY = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

HARD = [
    *TRICKY,
    "你好，世界！这是一个测试。分词器把汉字拆成字节。",
    "emoji 🎨🧑‍🎨👍🏽 and flags 🇳🇵🇩🇪",
    " " * 40 + "x" + "\n" * 7 + "\t \t" + " " * 3,
    "1234567890 3.14159 1,000,000 ٣٤٥ ๑๒๓",
    "I'm sure you'll see they've done it; she'd say we're 'quoted' and it's OK. DON'T",
    "नेपाली भाषा देवनागरी लिपिमा लेखिन्छ।",
]


@pytest.fixture(scope="module")
def gpt2() -> BPETokenizerSimple:
    tokenizer = BPETokenizerSimple()
    tokenizer.load_tiktoken_ranks()
    return tokenizer


@pytest.fixture(scope="module")
def verdict() -> str:
    return get_data_file("the-verdict.txt", download=False).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return get_data_file("tinyshakespeare.txt", download=False).read_text(encoding="utf-8")[:20_000]


@pytest.fixture(scope="module")
def trained(verdict) -> BPETokenizerSimple:
    tokenizer = BPETokenizerSimple()
    tokenizer.train(verdict, vocab_size=600)
    return tokenizer


@pytest.fixture(scope="module")
def exports(tmp_path_factory, gpt2, trained):
    """Hugging Face and tiktoken tokenizers built from our exports of GPT-2 and of the trained vocabulary."""
    from tokenizers import Tokenizer

    out = tmp_path_factory.mktemp("exports")
    built = {}
    for name, tok in (("gpt2", gpt2), ("trained", trained)):
        hf = Tokenizer.from_file(str(tok.to_hf_tokenizer(out / f"{name}.json")))
        ranks = tiktoken.load.load_tiktoken_bpe(str(tok.to_tiktoken(out / f"{name}.tiktoken")))
        tt = tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                               special_tokens=tok.special_tokens)
        built[name] = (tok, hf, tt)
    return built


# --- GPT-2 parity -----------------------------------------------------------------------------------

def test_gpt2_ranks_give_tiktoken_ids_on_the_verdict(gpt2, verdict):
    ids = gpt2.encode(verdict)
    assert ids == get_gpt2_tokenizer().encode(verdict)
    assert len(ids) == 5145
    assert gpt2.decode(ids) == verdict
    assert gpt2.encode(SAMPLE, allowed_special={END_OF_TEXT}) == SAMPLE_IDS


@pytest.mark.parametrize("text", HARD)
def test_gpt2_ranks_give_tiktoken_ids_on_hard_text(gpt2, text):
    assert gpt2.encode(text) == get_gpt2_tokenizer().encode(text)
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_ranks_give_tiktoken_ids_on_shakespeare(gpt2, shakespeare):
    assert len(shakespeare) == 20_000
    assert gpt2.encode(shakespeare) == get_gpt2_tokenizer().encode(shakespeare)


def test_gpt2_special_tokens_like_tiktoken(gpt2):
    enc = get_gpt2_tokenizer()
    text = f"a{END_OF_TEXT}b {END_OF_TEXT}"
    assert gpt2.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert gpt2.special_tokens == {END_OF_TEXT: 50256}
    assert gpt2.decode([50256]) == END_OF_TEXT


def test_lone_surrogates_are_replaced_as_tiktoken_does(gpt2):
    text = "ok \ud800 then"
    assert gpt2.encode(text) == get_gpt2_tokenizer().encode(text)


def test_very_long_word_is_fast_and_exact(gpt2):
    text = " " * 5000 + "1" * 3000
    assert gpt2.encode(text) == get_gpt2_tokenizer().encode(text)


@PROPERTY
@given(st.text(max_size=60))
def test_property_gpt2_matches_tiktoken_and_round_trips(gpt2, text):
    ids = gpt2.encode(text, allowed_special="all")  # hypothesis does try "<|endoftext|>"
    assert ids == get_gpt2_tokenizer().encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text


# --- training ----------------------------------------------------------------------------------------

def test_training_is_deterministic_and_round_trips(trained, verdict):
    again = BPETokenizerSimple()
    again.train(verdict, vocab_size=600)
    assert again.bpe_merges == trained.bpe_merges
    assert len(trained.vocab) == 600 and len(trained.bpe_merges) == 599 - 256
    assert trained.special_tokens == {END_OF_TEXT: 599}
    assert trained.decode(trained.encode(verdict)) == verdict
    # The first merges of an English story: " t", "he", " a", ...
    first = [trained.vocab[i] for i in list(trained.bpe_merges.values())[:3]]
    assert first == [b" t", b"he", b" a"]
    # A trained vocabulary compresses its own training text better than GPT-2's bytes alone would.
    assert len(trained.encode(verdict)) < 0.45 * len(verdict.encode("utf-8"))


def test_ties_go_to_the_pair_with_the_smallest_ids():
    # Every pair occurs once: " c" (32, 99) < "ab" (97, 98) < "cd" (99, 100).
    tok = BPETokenizerSimple()
    tok.train("ab cd", vocab_size=259, allowed_special=())
    assert list(tok.bpe_merges) == [(32, 99), (97, 98), (256, 100)]
    assert tok.vocab[258] == b" cd"
    assert bpe.most_frequent({(5, 1): 2, (1, 9): 2, (0, 0): 1}) == (1, 9)


def test_special_ids_come_last_in_sorted_order():
    tok = BPETokenizerSimple()
    tok.train("ab<|b|>ab<|a|>ba", vocab_size=260, allowed_special=["<|b|>", "<|a|>"])
    assert tok.special_tokens == {"<|a|>": 258, "<|b|>": 259}
    # Special tokens are cut out before counting, so no merge reaches into them.
    assert [tok.vocab[i] for i in tok.bpe_merges.values()] == [b"ab", b"ba"]
    assert tok.encode("ab<|a|>ba", allowed_special="all") == [256, 258, 257]


def test_training_stops_when_every_word_is_one_token():
    tok = BPETokenizerSimple()
    tok.train("abc abc", vocab_size=1000)
    assert [tok.vocab[i] for i in tok.bpe_merges.values()] == [b"ab", b"abc", b" abc"]
    assert len(tok.vocab) == 256 + 3 + 1


def test_incremental_trainer_learns_the_naive_merges(verdict):
    text = verdict[:4000]
    tok = BPETokenizerSimple()
    tok.train(text, vocab_size=400)
    assert train_naive(text, vocab_size=400) == tok.bpe_merges


@PROPERTY
@given(st.text(alphabet=st.sampled_from("aab  \n'1é你"), max_size=80), st.integers(257, 300))
def test_property_incremental_equals_naive_and_round_trips(text, vocab_size):
    # A tiny alphabet makes repeats, overlapping pairs ("aaaa") and ties common.
    tok = BPETokenizerSimple()
    tok.train(text, vocab_size=vocab_size)
    assert train_naive(text, vocab_size=vocab_size) == tok.bpe_merges
    assert tok.decode(tok.encode(text, allowed_special="all")) == text
    assert len(tok.vocab) <= vocab_size


@PROPERTY
@given(st.text(max_size=60))
def test_property_trained_vocabulary_round_trips_any_text(trained, text):
    assert trained.decode(trained.encode(text, allowed_special="all")) == text


def test_pair_counts_after_merges_equal_a_recount():
    words = {b"banana": 3, b" bandana": 2, b"aaaa": 1}
    pairs = PairCounts(words)
    vocab = {i: bytes([i]) for i in range(256)}
    inverse = {b: i for i, b in vocab.items()}
    for _ in range(4):
        pair = pairs.most_frequent()
        pairs.merge(pair, bpe.new_token(vocab, inverse, pair))
        recount = bpe.Counter()
        for ids, freq in zip(pairs.words, pairs.freqs):
            for p in zip(ids, ids[1:]):
                recount[p] += freq
        assert dict(pairs.counts) == dict(recount)


def test_a_pair_that_spells_an_existing_token_reuses_its_id():
    vocab = {i: bytes([i]) for i in range(256)}
    inverse = {b: i for i, b in vocab.items()}
    ab = bpe.new_token(vocab, inverse, (97, 98))
    bc = bpe.new_token(vocab, inverse, (98, 99))
    abc = bpe.new_token(vocab, inverse, (ab, 99))
    assert bpe.new_token(vocab, inverse, (97, bc)) == abc
    assert len(vocab) == 259


# --- encoding ----------------------------------------------------------------------------------------

def test_each_distinct_word_is_split_once(monkeypatch):
    tok = BPETokenizerSimple()
    tok.load_tiktoken_ranks()
    calls = []
    monkeypatch.setattr(bpe, "bpe_word", lambda word, ranks: calls.append(word) or bpe_word(word, ranks))
    ids = tok.encode(" the cat the cat the cat")
    assert sorted(calls) == [b" cat", b" the"]
    assert ids == get_gpt2_tokenizer().encode(" the cat the cat the cat")


def test_bpe_word_merges_lowest_rank_first():
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"bc": 256, b"ab": 257, b"abc": 258, b"cd": 259})
    # "bc" (256) goes first, beating "ab" (257); then "a" + "bc" spells "abc" (258), beating "cd" (259).
    assert bpe_word(b"abcd", ranks) == [258, 100]
    assert bpe_word(b"bcd", ranks) == [256, 100]
    assert bpe_word(b"abc", ranks) == [258]  # a whole-word token is taken at once
    assert bpe_word(b"abab", ranks) == [257, 257]


def test_bytes_to_unicode_is_gpt2s_map():
    chars = bytes_to_unicode()
    assert len(set(chars.values())) == 256
    assert chars[ord(" ")] == "Ġ" and chars[ord("\n")] == "Ċ" and chars[ord("A")] == "A"
    from tokenizers.pre_tokenizers import ByteLevel

    assert set(chars.values()) == set(ByteLevel.alphabet())


# --- exports -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "trained"])
def test_exports_give_identical_ids(exports, verdict, shakespeare, name):
    tok, hf, tt = exports[name]
    for text in [verdict, shakespeare, *HARD, f"end{END_OF_TEXT} start"]:
        ids = tok.encode(text, allowed_special="all")
        assert hf.encode(text).ids == ids
        assert tt.encode(text, allowed_special="all") == ids
        assert hf.decode(ids, skip_special_tokens=False) == text
        assert tt.decode(ids) == text
    assert hf.token_to_id(END_OF_TEXT) == tok.special_tokens[END_OF_TEXT]


@PROPERTY
@given(st.text(max_size=40))
def test_property_exports_match_ours(exports, text):
    for name in ("gpt2", "trained"):
        tok, hf, tt = exports[name]
        ids = tok.encode(text, allowed_special="all")
        assert hf.encode(text).ids == ids
        assert tt.encode(text, allowed_special="all") == ids


def test_tiktoken_export_is_a_rank_file(tmp_path, trained):
    path = trained.to_tiktoken(tmp_path / "t.tiktoken")
    lines = path.read_text().splitlines()
    assert len(lines) == len(trained.inverse_vocab)
    token, rank = lines[300].split()
    assert trained.vocab[int(rank)] == base64.b64decode(token)


def test_transformers_loads_the_hf_export(tmp_path, trained, verdict):
    # transformers needs PyTorch; .ci/run's extra Pythons run this file without either.
    PreTrainedTokenizerFast = pytest.importorskip("transformers").PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(trained.to_hf_tokenizer(tmp_path / "tokenizer.json")),
                                 eos_token=END_OF_TEXT)
    text = verdict[:2000] + END_OF_TEXT + " 你好"
    assert hf(text)["input_ids"] == trained.encode(text, allowed_special="all")
    assert hf.eos_token_id == trained.special_tokens[END_OF_TEXT]


# --- files -------------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path, trained, verdict):
    path = tmp_path / "vocab.json"
    trained.save_vocab_and_merges(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["vocab"]["Ġt"] == trained.inverse_vocab[b" t"]  # GPT-2's readable form
    loaded = BPETokenizerSimple()
    loaded.load_vocab_and_merges(path)
    assert loaded.vocab == trained.vocab
    assert loaded.bpe_merges == trained.bpe_merges
    assert loaded.special_tokens == trained.special_tokens
    assert loaded.encode(verdict) == trained.encode(verdict)


def test_gpt2_saved_and_loaded_keeps_parity(tmp_path, gpt2, verdict):
    gpt2.save_vocab_and_merges(tmp_path / "gpt2.json")
    loaded = BPETokenizerSimple()
    loaded.load_vocab_and_merges(tmp_path / "gpt2.json")
    assert loaded.encode(verdict[:3000]) == get_gpt2_tokenizer().encode(verdict[:3000])


def _corrupt(tmp_path, trained, change):
    path = tmp_path / "vocab.json"
    trained.save_vocab_and_merges(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="other"), "not a vocabulary file written by save_vocab_and_merges"),
    (lambda d: d["vocab"].pop("Ġ"), "256 single bytes"),
    (lambda d: d["merges"].append([1, 2]), r"merge \[1, 2\] does not make a token"),
    (lambda d: d["vocab"].update({"☃": 5}), "unknown character"),
    (lambda d: d["vocab"].update({"Ġt": 7}), "distinct"),
    (lambda d: d.pop("merges"), "missing entry"),
])
def test_corrupt_vocabulary_files_are_refused(tmp_path, trained, change, message):
    path = _corrupt(tmp_path, trained, change)
    fresh = BPETokenizerSimple()
    with pytest.raises(InvalidInput, match=message):
        fresh.load_vocab_and_merges(path)
    assert fresh.vocab == {}  # nothing half-loaded
    assert issubclass(InvalidInput, ValueError)  # a user's file: one line from a command, still a ValueError


def test_not_json_and_bad_rank_files_are_refused(tmp_path):
    (tmp_path / "a.json").write_text("{half", encoding="utf-8")
    with pytest.raises(InvalidInput, match="a.json is not a vocabulary file"):
        BPETokenizerSimple().load_vocab_and_merges(tmp_path / "a.json")
    (tmp_path / "r.tiktoken").write_text("IQ== 0\nnot-base64! 1\n", encoding="ascii")
    with pytest.raises(InvalidInput, match="line 2: expected '<base64 token> <rank>'"):
        BPETokenizerSimple().load_tiktoken_ranks(tmp_path / "r.tiktoken")
    (tmp_path / "s.tiktoken").write_text("IQ== 0\n", encoding="ascii")
    with pytest.raises(InvalidInput, match="not a usable rank file: 255 of the 256 single bytes are missing"):
        BPETokenizerSimple().load_tiktoken_ranks(tmp_path / "s.tiktoken")


# --- errors ------------------------------------------------------------------------------------------

def test_vocab_size_below_bytes_and_specials_is_refused():
    with pytest.raises(ValueError, match="at least 257"):
        BPETokenizerSimple().train("hello", vocab_size=256)
    with pytest.raises(ValueError, match="at least 256"):
        BPETokenizerSimple().train("hello", vocab_size=100, allowed_special=())
    with pytest.raises(TypeError, match="vocab_size must be an integer"):
        BPETokenizerSimple().train("hello", vocab_size=300.0)
    with pytest.raises(TypeError, match="not the string"):
        BPETokenizerSimple().train("hello", vocab_size=300, allowed_special=END_OF_TEXT)


def test_special_token_in_text_needs_allowed_special(gpt2, trained):
    for tok in (gpt2, trained):
        with pytest.raises(ValueError, match="contains the special token '<\\|endoftext\\|>'; pass allowed_special"):
            tok.encode(f"hello {END_OF_TEXT}")
    with pytest.raises(ValueError, match="contains the special token"):
        gpt2.encode(END_OF_TEXT, allowed_special=None)  # the book's default: none allowed
    with pytest.raises(ValueError, match="does not have"):
        gpt2.encode("hi", allowed_special={"<|im_start|>"})
    with pytest.raises(TypeError, match="not the string"):
        gpt2.encode("hi", allowed_special=END_OF_TEXT)


def test_decode_refuses_unknown_ids(gpt2, trained):
    with pytest.raises(ValueError, match="token id 50257 is not in the vocabulary \\(ids 0 to 50256\\)"):
        gpt2.decode([15496, 50257])
    with pytest.raises(ValueError, match="token id -1"):
        trained.decode(iter([1, -1]))


# --- the notebook builds the module's code -------------------------------------------------------------

NOTEBOOK_DEFINES = ["pretokenize", "count_pairs", "most_frequent", "merge_pair", "new_token", "train_naive",
                    "bpe_word"]


def test_notebook_defines_the_modules_functions():
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    in_notebook = {n.name: ast.dump(n) for n in ast.parse(code).body if isinstance(n, ast.FunctionDef)}
    in_module = {n.name: ast.dump(n) for n in ast.parse(Path(bpe.__file__).read_text()).body
                 if isinstance(n, ast.FunctionDef)}
    for name in NOTEBOOK_DEFINES:
        assert in_notebook.get(name) == in_module[name], f"the notebook's {name} differs from ch02/bpe/bpe.py's"

