"""ch02/tokenizer.py: the simple vocabulary tokenizers and the offline GPT-2 tokenizer."""

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

from ch02.tokenizer import (
    END_OF_TEXT,
    GPT2_RANKS_FILE,
    UNKNOWN,
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    build_vocab,
    get_gpt2_tokenizer,
    split_text,
)

SAMPLE = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
SAMPLE_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262,
              4252, 18250, 8812, 2114, 286, 617, 34680, 27271, 13]
AKWIRW_IDS = [33901, 86, 343, 86, 220, 959]

# Strings that exercise the split regex: contractions, digits, runs of spaces and
# newlines, trailing whitespace, punctuation runs and non-ASCII letters.
TRICKY = [
    "It's done; they'll see -- we've 3,000 cats!!",
    "a   b\n\n\nc  \t d   ",
    "   leading spaces\r\nand CRLF\r\n",
    "naïve café – “quotes” … 東京 123abc",
    "",
]


# --- simple tokenizers (sections 2.2-2.4) -----------------------------------------------------

def test_split_text_keeps_punctuation_and_drops_whitespace():
    assert split_text("Hello, world. Is this-- a test?") == [
        "Hello", ",", "world", ".", "Is", "this", "--", "a", "test", "?"]


def test_verdict_vocabulary_sizes(verdict_text):
    assert len(split_text(verdict_text)) == 4690
    vocab = build_vocab(verdict_text)
    assert len(vocab) == 1130
    assert list(vocab.values()) == list(range(1130))
    vocab2 = build_vocab(verdict_text, special_tokens=(END_OF_TEXT, UNKNOWN))
    assert len(vocab2) == 1132
    assert vocab2[END_OF_TEXT] == 1130 and vocab2[UNKNOWN] == 1131


def test_simple_tokenizer_v1_round_trip(verdict_text):
    tok = SimpleTokenizerV1(build_vocab(verdict_text))
    text = """"It's the last he painted, you know," Mrs. Gisburn said with pardonable pride."""
    ids = tok.encode(text)
    assert ids[:6] == [1, 56, 2, 850, 988, 602]
    # The simple join rule only removes spaces *before* punctuation, so an opening quote and
    # an apostrophe keep a space after them (as in the book); the words all come back.
    assert tok.decode(ids) == """" It' s the last he painted, you know," Mrs. Gisburn said with pardonable pride."""
    assert split_text(tok.decode(ids)) == split_text(text)


def test_simple_tokenizer_v1_names_unknown_word(verdict_text):
    tok = SimpleTokenizerV1(build_vocab(verdict_text))
    with pytest.raises(KeyError, match="'Hello'"):
        tok.encode("Hello, do you like tea?")


def test_simple_tokenizer_v2_maps_unknown_words(verdict_text):
    vocab = build_vocab(verdict_text, special_tokens=(END_OF_TEXT, UNKNOWN))
    tok = SimpleTokenizerV2(vocab)
    text = " <|endoftext|> ".join(["Hello, do you like tea?", "In the sunlit terraces of the palace."])
    ids = tok.encode(text)
    assert ids == [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
    assert tok.decode(ids) == ("<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of "
                               "the <|unk|>.")


def test_simple_tokenizer_v2_needs_unk_token(verdict_text):
    with pytest.raises(ValueError, match="<|unk|>"):
        SimpleTokenizerV2(build_vocab(verdict_text))


# --- GPT-2 byte pair encoding (section 2.5) ---------------------------------------------------

def test_gpt2_known_ids():
    enc = get_gpt2_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.encode(SAMPLE, allowed_special={END_OF_TEXT}) == SAMPLE_IDS
    assert enc.decode(SAMPLE_IDS) == SAMPLE
    assert enc.encode("Akwirw ier") == AKWIRW_IDS
    assert [enc.decode([i]) for i in AKWIRW_IDS] == ["Ak", "w", "ir", "w", " ", "ier"]


def test_gpt2_rejects_unallowed_special_text():
    with pytest.raises(ValueError):
        get_gpt2_tokenizer().encode(SAMPLE)


def test_gpt2_is_cached_and_offline():
    assert get_gpt2_tokenizer() is get_gpt2_tokenizer()
    assert GPT2_RANKS_FILE.is_file()


def test_gpt2_on_the_verdict(verdict_text):
    enc = get_gpt2_tokenizer()
    ids = enc.encode(verdict_text)
    assert len(verdict_text) == 20479
    assert len(ids) == 5145
    assert enc.decode(ids) == verdict_text


@pytest.mark.parametrize("text", TRICKY)
def test_gpt2_round_trip_tricky(text):
    enc = get_gpt2_tokenizer()
    assert enc.decode(enc.encode(text)) == text


def test_split_regex_matches_tiktoken_definition(verdict_text):
    """tiktoken writes GPT-2's split regex with possessive quantifiers (faster, same splits).
    Build an encoding with tiktoken's own regex and the bundled ranks and compare: this needs
    no download, so it always runs when tiktoken ships the `tiktoken_ext.openai_public` plugin."""
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    ours = get_gpt2_tokenizer()
    theirs = tiktoken.Encoding(name="gpt2-upstream-regex", pat_str=openai_public.r50k_pat_str,
                               mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(GPT2_RANKS_FILE)),
                               special_tokens={END_OF_TEXT: 50256})
    for text in [verdict_text, SAMPLE.replace(END_OF_TEXT, ""), *TRICKY]:
        assert ours.encode(text) == theirs.encode(text)


def _tiktoken_gpt2_cached() -> tuple[bool, str]:
    """Is `tiktoken.get_encoding("gpt2")` loadable without a network (both files cached)?"""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache is None:
        cache = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    paths = [Path(cache) / hashlib.sha1((base + f).encode()).hexdigest() for f in ("vocab.bpe", "encoder.json")]
    return all(p.is_file() for p in paths), cache


def test_gpt2_matches_tiktoken_get_encoding_when_cached(verdict_text):
    cached, cache = _tiktoken_gpt2_cached()
    if not cached:
        pytest.skip("tiktoken.get_encoding('gpt2') would download vocab.bpe/encoder.json from "
                    f"openaipublic.blob.core.windows.net (not in tiktoken's cache {cache}); "
                    "the hard-coded reference ids in test_gpt2_known_ids cover parity offline")
    reference = tiktoken.get_encoding("gpt2")
    ours = get_gpt2_tokenizer()
    assert reference.n_vocab == ours.n_vocab
    for text in [verdict_text, "Akwirw ier", *TRICKY]:
        assert ours.encode(text) == reference.encode(text)
    assert ours.encode(SAMPLE, allowed_special={END_OF_TEXT}) == reference.encode(
        SAMPLE, allowed_special={END_OF_TEXT})


def test_bundled_ranks_file_is_the_recorded_one():
    """ch02/gpt2.tiktoken is the unchanged openai-whisper==20250625 asset named in NOTICE."""
    digest = hashlib.sha256(GPT2_RANKS_FILE.read_bytes()).hexdigest()
    notice = (Path(__file__).resolve().parents[1] / "NOTICE").read_text(encoding="utf-8")
    assert digest == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    assert digest in notice and "openai-whisper==20250625" in notice
