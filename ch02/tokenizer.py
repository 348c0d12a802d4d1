"""Tokenizers for chapter 2: a regex word tokenizer, two simple vocab-based
tokenizers, and the GPT-2 byte-pair-encoding tokenizer built offline.

`get_gpt2_tokenizer()` is the one GPT-2 tokenizer every later chapter uses. It is
built from the bundled `gpt2.tiktoken` rank file (MIT, from the `openai-whisper`
package) instead of `tiktoken.get_encoding("gpt2")`, which downloads its files at
first use and fails behind a firewall. The ids are identical.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import tiktoken
import tiktoken.load

# Split on punctuation, double dashes and whitespace; keep the separators as tokens.
SPLIT_PATTERN = re.compile(r'([,.:;?_!"()\']|--|\s)')

END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<|unk|>"


def split_text(text: str) -> list[str]:
    """Split text into words and punctuation, dropping whitespace (section 2.2)."""
    return [tok.strip() for tok in SPLIT_PATTERN.split(text) if tok.strip()]


def build_vocab(text: str, special_tokens: tuple[str, ...] = ()) -> dict[str, int]:
    """Map every unique token (sorted) to an integer id; special tokens go last."""
    tokens = sorted(set(split_text(text)))
    tokens.extend(t for t in special_tokens if t not in tokens)
    return {tok: i for i, tok in enumerate(tokens)}


class SimpleTokenizerV1:
    """Vocabulary lookup tokenizer (section 2.3). Unknown words are an error."""

    def __init__(self, vocab: dict[str, int]):
        self.str_to_int = vocab
        self.int_to_str = {i: s for s, i in vocab.items()}

    def encode(self, text: str) -> list[int]:
        preprocessed = re.split(r'([,.:;?_!"()\']|--|\s)', text)
        preprocessed = [item.strip() for item in preprocessed if item.strip()]
        # New: name the unknown word and the way out instead of a bare KeyError.
        unknown = [s for s in preprocessed if s not in self.str_to_int]
        if unknown:
            raise KeyError(
                f"the word {unknown[0]!r} is not in the vocabulary; use SimpleTokenizerV2 "
                f"(maps unknown words to {UNKNOWN}) or build the vocabulary from more text"
            )
        ids = [self.str_to_int[s] for s in preprocessed]
        return ids

    def decode(self, ids: list[int]) -> str:
        text = " ".join([self.int_to_str[i] for i in ids])
        # Remove the space before punctuation (New: ':' and ';' too, as V2 does in the book).
        text = re.sub(r'\s+([,.:;?!"()\'])', r"\1", text)
        return text


class SimpleTokenizerV2(SimpleTokenizerV1):  # New: subclass, so `decode` is V1's (the book repeats it)
    """Like V1, but unknown words become `<|unk|>` (section 2.4).

    The vocabulary must contain `<|unk|>`; build it with
    `build_vocab(text, special_tokens=("<|endoftext|>", "<|unk|>"))`.
    """

    def __init__(self, vocab: dict[str, int]):
        # New: a vocabulary without <|unk|> would fail on the first unknown word; say so now.
        if UNKNOWN not in vocab:
            raise ValueError(f"SimpleTokenizerV2 needs {UNKNOWN!r} in the vocabulary")
        super().__init__(vocab)

    def encode(self, text: str) -> list[int]:
        preprocessed = re.split(r'([,.:;?_!"()\']|--|\s)', text)
        preprocessed = [item.strip() for item in preprocessed if item.strip()]
        preprocessed = [item if item in self.str_to_int else "<|unk|>" for item in preprocessed]
        ids = [self.str_to_int[s] for s in preprocessed]
        return ids


# GPT-2's pre-tokenisation regex: contractions, letters, numbers, other symbols, spaces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_RANKS_FILE = Path(__file__).with_name("gpt2.tiktoken")


@functools.lru_cache(maxsize=1)
def get_gpt2_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 BPE tokenizer (50,257 tokens), built offline from the bundled rank file."""
    if not GPT2_RANKS_FILE.is_file():
        raise FileNotFoundError(
            f"{GPT2_RANKS_FILE} is missing; it ships with this repository. "
            "Restore it with `git checkout -- ch02/gpt2.tiktoken`."
        )
    ranks = tiktoken.load.load_tiktoken_bpe(str(GPT2_RANKS_FILE))
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={END_OF_TEXT: 50256}
    )
