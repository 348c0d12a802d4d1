"""Chapter 2 bonus: a byte pair encoding (BPE) tokenizer from scratch that trains, matches GPT-2 and
exports to Hugging Face `tokenizers` and tiktoken.

Section 2.5 uses GPT-2's tokenizer through tiktoken, which can only *apply* fixed merges. Here we
build the whole thing: `BPETokenizerSimple` (the book's bonus name) learns merges from any text, so
it can tokenize Chinese or Nepali well, encodes and decodes, saves and loads its vocabulary, loads
GPT-2's own ranks (then it gives exactly tiktoken's ids), and writes files that `transformers` and
tiktoken load.

The module reads top to bottom: splitting text into words (GPT-2's regex), the book's slow trainer
(`count_pairs`, `merge_pair`, `train_naive`), the fast incremental one (`PairCounts`), the encoding
rule for one word (`bpe_word`), then the tokenizer class.

Imports from earlier sections: GPT-2's split pattern, rank file and end-of-text token
(`ch02.tokenizer`), atomic file writes (`llmfs.atomic`), the error for a bad file (`llmfs.errors`).
"""

from __future__ import annotations

import base64
import heapq
import json
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex  # like `re`, plus the Unicode classes \p{L} (letters) and \p{N} (numbers) GPT-2's pattern needs

from ch02.tokenizer import END_OF_TEXT, GPT2_PATTERN, GPT2_RANKS_FILE
from llmfs.atomic import atomic_path, atomic_write
from llmfs.errors import InvalidInput

GPT2_SPLIT = regex.compile(GPT2_PATTERN)
FILE_FORMAT = "llmfs-bpe-tokenizer"  # marks our vocabulary files (save_vocab_and_merges)
CACHE_SIZE = 100_000  # words whose encoding `encode` remembers


# --- 1. Words: BPE never merges across them ------------------------------------------------------

def pretokenize(text: str, special_tokens: Iterable[str] = ()) -> list[str]:
    """Split text into GPT-2's words, cutting out `special_tokens` first.

    A word is a run of letters, of digits or of other symbols, usually with the space in front of
    it (" cat", " 42", "!!"), or a run of whitespace. Merges never cross a word boundary, so "dog."
    and "dog!" share the token "dog", and special tokens never merge with their neighbours.
    """
    chunks = [text]
    if special_tokens:
        # Longest first, so that a special token containing another one wins.
        specials = "|".join(regex.escape(s) for s in sorted(special_tokens, key=len, reverse=True))
        chunks = regex.split(specials, text)
    return [word for chunk in chunks for word in GPT2_SPLIT.findall(chunk)]


# --- 2. Training the book's way: recount every pair for every merge --------------------------------

def count_pairs(words: list[list[int]]) -> Counter:
    """How often each adjacent pair of token ids occurs, over all words."""
    return Counter(pair for ids in words for pair in zip(ids, ids[1:]))


def most_frequent(counts: dict[tuple[int, int], int]) -> tuple[int, int]:
    """The pair to merge next: the most frequent one; among equally frequent pairs, the one with the
    smallest ids (compared left id first, then right id). A fixed rule makes training deterministic."""
    return min(counts, key=lambda pair: (-counts[pair], pair))


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids` by `new_id`, left to right ("aaa" -> "aa" "a")."""
    merged, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def new_token(vocab: dict[int, bytes], inverse_vocab: dict[bytes, int], pair: tuple[int, int]) -> int:
    """The id of the token that merging `pair` makes, adding it to the vocabulary if it is new.

    Two different pairs could spell the same bytes ("a"+"bc" and "ab"+"c"). Should that happen, the
    second merges into the existing token, as in Hugging Face's trainer, so every token's bytes stay
    unique (tiktoken's files need that) and the vocabulary does not grow.
    """
    merged = vocab[pair[0]] + vocab[pair[1]]
    if merged not in inverse_vocab:
        inverse_vocab[merged] = len(vocab)
        vocab[len(vocab)] = merged
    return inverse_vocab[merged]


def train_naive(text: str, vocab_size: int,
                allowed_special: Iterable[str] = frozenset({END_OF_TEXT})) -> dict[tuple[int, int], int]:
    """Learn BPE merges as the book's bonus notebook does: before every merge, count all pairs of the
    whole corpus again. Simple, and correct, but slow: a 1,000-token vocabulary on a 1 MB text
    takes minutes. `BPETokenizerSimple.train` learns the same merges incrementally."""
    specials = sorted(set(allowed_special))
    words = [list(word.encode("utf-8")) for word in pretokenize(text, specials)]  # byte values are ids 0-255
    vocab = {i: bytes([i]) for i in range(256)}
    inverse_vocab = {b: i for i, b in vocab.items()}
    merges = {}
    while len(vocab) < vocab_size - len(specials):
        counts = count_pairs(words)
        if not counts:
            break  # every word is a single token
        pair = most_frequent(counts)
        merges[pair] = new_token(vocab, inverse_vocab, pair)
        words = [merge_pair(ids, pair, merges[pair]) for ids in words]
    return merges


# --- 3. Training fast: keep the pair counts up to date ---------------------------------------------

class PairCounts:
    """Pair counts over a corpus that stay correct from merge to merge without recounting.

    Two ideas make training fast:
    1. Count each *distinct* word once and weigh it by how often it occurs (tinyshakespeare has
       297,833 words but only 15,057 distinct ones).
    2. Merging (a, b) into n changes only the words that contain (a, b), and in them only the pairs
       around each merged occurrence: in "x a b y", (x, a) and (b, y) lose one occurrence, (x, n) and
       (n, y) gain one. `where` remembers which words contain a pair, so a merge visits just those.

    To find the most frequent pair we keep a heap of (-count, pair) entries. Every pair that gains
    occurrences contains the new token n and gets a fresh entry with its new count; all other pairs
    only ever lose occurrences. So an entry may overstate its pair's count but never understate it,
    and `most_frequent` pops entries until the top one is up to date (re-pushing the stale ones with
    their true count): that entry is the true maximum, ties going to the smallest pair, the rule of
    the function `most_frequent`.
    """

    def __init__(self, word_counts: dict[bytes, int]):
        self.words = [list(word) for word in word_counts]  # each distinct word as token ids (bytes at first)
        self.freqs = list(word_counts.values())  # how often each distinct word occurs
        self.counts: dict[tuple[int, int], int] = defaultdict(int)  # pair -> occurrences in the corpus
        self.where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that may contain it
        for w, (ids, freq) in enumerate(zip(self.words, self.freqs)):
            for pair in zip(ids, ids[1:]):
                self.counts[pair] += freq
                self.where[pair].add(w)
        self.heap = [(-count, pair) for pair, count in self.counts.items()]
        heapq.heapify(self.heap)

    def most_frequent(self) -> tuple[int, int] | None:
        """The most frequent pair (ties: smallest ids), or None when no word has two tokens left."""
        while self.heap:
            neg_count, pair = self.heap[0]
            count = self.counts.get(pair, 0)
            if -neg_count == count:
                return pair
            # Stale entry: the pair lost occurrences since it was pushed. Re-file it with its count.
            if count > 0:
                heapq.heapreplace(self.heap, (-count, pair))
            else:
                heapq.heappop(self.heap)
        return None

    def merge(self, pair: tuple[int, int], new_id: int) -> None:
        """Merge `pair` into `new_id` in every word that contains it and update the counts."""
        a, b = pair
        delta: dict[tuple[int, int], int] = defaultdict(int)  # change of each neighbouring pair's count
        for w in self.where.pop(pair):
            ids, freq = self.words[w], self.freqs[w]
            i = 0
            while i < len(ids) - 1:
                if ids[i] == a and ids[i + 1] == b:
                    if i > 0:  # left neighbour x: (x, a) -> (x, n)
                        delta[ids[i - 1], a] -= freq
                        delta[ids[i - 1], new_id] += freq
                        self.where[ids[i - 1], new_id].add(w)
                    if i + 2 < len(ids):  # right neighbour y: (b, y) -> (n, y)
                        delta[b, ids[i + 2]] -= freq
                        delta[new_id, ids[i + 2]] += freq
                        self.where[new_id, ids[i + 2]].add(w)
                    ids[i:i + 2] = [new_id]  # in place; the next comparison sees n as left neighbour
                i += 1
        del self.counts[pair]  # all occurrences are gone (left-to-right merging leaves none)
        delta.pop(pair, None)  # "a a a" with pair (a, a) touched its own count; it is gone anyway
        for p, d in delta.items():
            self.counts[p] += d
            if self.counts[p] <= 0:
                del self.counts[p]
            elif new_id in p:
                heapq.heappush(self.heap, (-self.counts[p], p))  # a new pair: the heap must learn of it


# --- 4. Encoding one word ---------------------------------------------------------------------------

def bpe_word(word: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Split one word into token ids: start from single bytes and keep merging the adjacent pair whose
    merged bytes have the lowest rank (id), the leftmost one on a tie, until no pair is a token.

    Low ranks were learned first, so this replays the training merges in order. It is tiktoken's rule
    and needs only the ranks, which is all GPT-2's `gpt2.tiktoken` stores. A word that is itself a
    token is returned at once, as tiktoken does.
    """
    if word in ranks:
        return [ranks[word]]
    parts = [word[i:i + 1] for i in range(len(word))]
    missing = sys.maxsize  # larger than any rank: "this pair is not a token"
    # pair_ranks[i] is the rank of parts[i] + parts[i + 1]. After a merge only the two pairs next to
    # it change, and min/index run in C, so even a word of 10,000 spaces takes a fraction of a second.
    pair_ranks = [ranks.get(parts[i] + parts[i + 1], missing) for i in range(len(parts) - 1)]
    while pair_ranks:
        lowest = min(pair_ranks)
        if lowest == missing:
            break
        i = pair_ranks.index(lowest)  # the leftmost lowest pair
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], missing)
        if i < len(parts) - 1:
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], missing)
    return [ranks[part] for part in parts]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters, used by Hugging Face files.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) get the
    characters from U+0100 on, which is why a leading space shows up as "Ġ" in GPT-2's vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return dict(sorted(chars.items()))


# --- 5. The tokenizer -----------------------------------------------------------------------------

class BPETokenizerSimple:
    """A byte-level BPE tokenizer like GPT-2's, built from scratch.

    Every text is a sequence of UTF-8 bytes, and the 256 byte values are the first 256 tokens, so any
    string can be encoded (no unknown tokens) and decoded back exactly. Training adds one token at a
    time: the most frequent adjacent pair of tokens in the training words (ties: the pair with the
    smallest ids) becomes a new token, until the vocabulary has `vocab_size` entries (special tokens
    included). Encoding splits the text into words and replays the merges on each (`bpe_word`).

    Attributes (the book's names):
        vocab: id -> the token's bytes (special tokens included).
        inverse_vocab: bytes -> id of the mergeable tokens, GPT-2's "ranks" (special tokens excluded,
            so the text "<|endoftext|>" can never become one token by accident).
        bpe_merges: (left id, right id) -> merged id, in the order training learned them; empty for
            ranks loaded from a tiktoken file, which encoding does not need.
        special_tokens: special token text -> id.
    """

    def __init__(self):
        self.vocab: dict[int, bytes] = {}
        self.inverse_vocab: dict[bytes, int] = {}
        self.bpe_merges: dict[tuple[int, int], int] = {}
        self.special_tokens: dict[str, int] = {}
        self._cache: dict[str, list[int]] = {}  # word -> its token ids, so repeated words cost nothing

    # -- training --

    def train(self, text: str, vocab_size: int, allowed_special: Iterable[str] = frozenset({END_OF_TEXT})) -> None:
        """Learn merges from `text` until the vocabulary has `vocab_size` tokens.

        The special tokens in `allowed_special` get the last ids and are cut out of the text before
        counting. Training stops early when every word is a single token.
        """
        specials = sorted(_check_specials(allowed_special))  # sorted: special ids do not depend on set order
        if not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an integer, got {vocab_size!r}")
        if vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size={vocab_size!r} is too small: a byte-level vocabulary holds the 256 "
                             f"single bytes plus {len(specials)} special token(s), so at least "
                             f"{256 + len(specials)}")
        self.vocab = {i: bytes([i]) for i in range(256)}
        self.inverse_vocab = {b: i for i, b in self.vocab.items()}
        self.bpe_merges = {}
        word_counts = Counter(word.encode("utf-8") for word in pretokenize(text, specials))
        pairs = PairCounts(word_counts)
        while len(self.vocab) < vocab_size - len(specials):
            pair = pairs.most_frequent()
            if pair is None:
                break
            self.bpe_merges[pair] = new_token(self.vocab, self.inverse_vocab, pair)
            pairs.merge(pair, self.bpe_merges[pair])
        self.special_tokens = {}
        for special in specials:
            self.special_tokens[special] = len(self.vocab)
            self.vocab[len(self.vocab)] = special.encode("utf-8")
        self._cache.clear()

    # -- encoding and decoding --

    def encode(self, text: str, allowed_special: Iterable[str] | str | None = frozenset()) -> list[int]:
        """Text -> token ids, exactly as tiktoken's `encode` for the same ranks.

        A special token in the text is an error unless it is in `allowed_special` (or that is "all"; None,
        the book's default, allows none): text from users must not be able to inject control tokens.
        """
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        else:
            allowed = _check_specials(allowed_special or ())
        unknown = allowed - self.special_tokens.keys()
        if unknown:
            raise ValueError(f"allowed_special names {sorted(unknown)}, which this tokenizer does not have; "
                             f"its special tokens are {sorted(self.special_tokens)}")
        for special in self.special_tokens.keys() - allowed:
            if special in text:
                raise ValueError(f"the text contains the special token {special!r}; pass allowed_special="
                                 f"{{{special!r}}} to encode it as a special token, or remove it from the text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: replace them by U+FFFD, as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        if not allowed:
            return self._encode_ordinary(text)
        ids = []
        pattern = "(" + "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        for i, chunk in enumerate(regex.split(pattern, text)):  # odd positions hold the special tokens
            ids.extend([self.special_tokens[chunk]] if i % 2 else self._encode_ordinary(chunk))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids = []
        for word in GPT2_SPLIT.findall(text):
            # Speed: real text repeats its words, so each distinct word is split only once.
            word_ids = self._cache.get(word)
            if word_ids is None:
                if len(self._cache) >= CACHE_SIZE:
                    self._cache.clear()
                word_ids = self._cache[word] = bpe_word(word.encode("utf-8"), self.inverse_vocab)
            ids.extend(word_ids)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text. Bytes that do not form valid UTF-8 (half a character) become U+FFFD."""
        ids = list(ids)
        try:
            data = b"".join(self.vocab[i] for i in ids)
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or i not in self.vocab)
            raise ValueError(f"token id {bad!r} is not in the vocabulary (ids 0 to {max(self.vocab)})") from None
        return data.decode("utf-8", errors="replace")

    # -- files: our own format, GPT-2's ranks, Hugging Face and tiktoken --

    def save_vocab_and_merges(self, path: str | os.PathLike) -> None:
        """Write the vocabulary, merges and special tokens to one JSON file (atomically).

        Tokens are written in GPT-2's printable form (`bytes_to_unicode`: " the" is "Ġthe"), as in
        Hugging Face's vocab.json, so the file is readable.
        """
        to_char = bytes_to_unicode()
        data = {"format": FILE_FORMAT, "version": 1, "pattern": GPT2_PATTERN,
                "vocab": {"".join(to_char[b] for b in token): i for token, i in self.inverse_vocab.items()},
                "merges": [[a, b] for a, b in self.bpe_merges],
                "special_tokens": self.special_tokens}
        with atomic_write(path) as f:
            json.dump(data, f, ensure_ascii=False, indent=0)

    def load_vocab_and_merges(self, path: str | os.PathLike) -> None:
        """Load a file written by `save_vocab_and_merges`, checking that it is complete and consistent."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"{path} is not a vocabulary file (not JSON: {exc})") from None
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT or data.get("version") != 1:
            raise InvalidInput(f"{path} is not a vocabulary file written by save_vocab_and_merges "
                               f"(expected \"format\": \"{FILE_FORMAT}\", \"version\": 1)")
        try:
            if data["pattern"] != GPT2_PATTERN:
                raise ValueError("it was made with a different split pattern")
            from_char = {c: b for b, c in bytes_to_unicode().items()}
            ranks = {bytes(from_char[c] for c in token): i for token, i in data["vocab"].items()}
            _check_vocab(ranks, data["special_tokens"])
            merges = _read_merges(data["merges"], ranks)
        except (KeyError, TypeError, ValueError) as exc:
            reason = f"missing entry or unknown character {exc}" if isinstance(exc, KeyError) else exc
            raise InvalidInput(f"{path} is a corrupt vocabulary file: {reason}") from None
        self._set_vocab(ranks, data["special_tokens"])
        self.bpe_merges = merges

    def load_tiktoken_ranks(self, path: str | os.PathLike = GPT2_RANKS_FILE,
                            special_tokens: dict[str, int] | None = None) -> None:
        """Load a tiktoken rank file ("<base64 token> <rank>" per line); by default GPT-2's own ranks
        (the bundled `ch02/gpt2.tiktoken`) with its end-of-text token, id 50256."""
        path = Path(path)
        if special_tokens is None:
            special_tokens = {END_OF_TEXT: 50256} if path.resolve() == GPT2_RANKS_FILE.resolve() else {}
        ranks = {}
        try:
            lines = path.read_text(encoding="ascii").splitlines()
        except UnicodeDecodeError:
            raise InvalidInput(f"{path} is not a tiktoken rank file (not ASCII text)") from None
        for n, line in enumerate(lines, start=1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise InvalidInput(f"{path}, line {n}: expected '<base64 token> <rank>', got {line[:60]!r}") from None
        try:
            _check_vocab(ranks, special_tokens)
        except ValueError as exc:
            raise InvalidInput(f"{path} is not a usable rank file: {exc}") from None
        self._set_vocab(ranks, special_tokens)
        self.bpe_merges = {}

    def _set_vocab(self, ranks: dict[bytes, int], special_tokens: dict[str, int]) -> None:
        """Install ranks and special tokens (checked with `_check_vocab` first)."""
        self.inverse_vocab = dict(ranks)
        self.vocab = {i: token for token, i in ranks.items()}
        self.vocab.update({i: s.encode("utf-8") for s, i in special_tokens.items()})
        self.special_tokens = dict(special_tokens)
        self._cache.clear()

    def to_tiktoken(self, path: str | os.PathLike) -> Path:
        """Write the ranks as a tiktoken file. Build the encoding with
        `tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=tiktoken.load.load_tiktoken_bpe(path),
        special_tokens=tokenizer.special_tokens)`; it gives the same ids as `encode`."""
        with atomic_write(path) as f:
            for token, rank in sorted(self.inverse_vocab.items(), key=lambda item: item[1]):
                f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
        return Path(path)

    def to_hf_tokenizer(self, path: str | os.PathLike) -> Path:
        """Write a Hugging Face `tokenizer.json` (needs the `tokenizers` package) that gives the same ids.

        Load it with `tokenizers.Tokenizer.from_file(path)`, or in `transformers` with
        `PreTrainedTokenizerFast(tokenizer_file=path)`. Hugging Face's BPE applies merges by pair, so
        to follow our rule (merge by the rank of the merged bytes) we list, for every token, each way to
        split it into two tokens, ordered by the token's rank: any adjacent pair that spells a token
        then merges at that token's priority. This is how `transformers` converts tiktoken files. With
        `ignore_merges` a word that is itself a token is taken whole, as in `bpe_word`.
        """
        try:
            from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
        except ImportError:
            raise ImportError("to_hf_tokenizer needs Hugging Face's tokenizers: pip install tokenizers") from None
        to_char = bytes_to_unicode()
        printable = {token: "".join(to_char[b] for b in token) for token in self.inverse_vocab}
        splits = sorted(
            (rank, self.inverse_vocab[token[:k]], self.inverse_vocab[token[k:]], token[:k], token[k:])
            for token, rank in self.inverse_vocab.items() for k in range(1, len(token))
            if token[:k] in self.inverse_vocab and token[k:] in self.inverse_vocab
        )
        vocab = {printable[token]: rank for token, rank in self.inverse_vocab.items()}
        clash = set(self.special_tokens) & vocab.keys()
        if clash:
            raise ValueError(f"special token(s) {sorted(clash)} spell an ordinary token in Hugging Face's form")
        vocab.update(self.special_tokens)
        model = models.BPE(vocab=vocab, merges=[(printable[left], printable[right]) for *_, left, right in splits],
                           ignore_merges=True)
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),  # our words
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable chars
        ])
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in self.special_tokens])
        with atomic_path(path) as tmp:
            tokenizer.save(str(tmp))
        return Path(path)


def _check_specials(specials: Iterable[str]) -> set[str]:
    if isinstance(specials, str):
        raise TypeError(f"special tokens must be a set of strings, not the string {specials!r}; "
                        f"write {{{specials!r}}}")
    specials = set(specials)
    if not all(isinstance(s, str) and s for s in specials):
        raise ValueError(f"special tokens must be non-empty strings, got {sorted(map(repr, specials))}")
    return specials


def _check_vocab(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> None:
    """Check what encoding and decoding rely on: all 256 bytes, distinct ids, proper special tokens."""
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{len(missing)} of the 256 single bytes are missing (e.g. {bytes(missing[:1])!r}); "
                         "a byte-level vocabulary needs all of them")
    if not isinstance(special_tokens, dict) or not all(isinstance(s, str) and s for s in special_tokens):
        raise ValueError("special tokens must map non-empty strings to ids")
    ids = [*ranks.values(), *special_tokens.values()]
    if not all(isinstance(i, int) and i >= 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError("token ids must be distinct non-negative integers")


def _read_merges(merges: list, ranks: dict[bytes, int]) -> dict[tuple[int, int], int]:
    """A loaded file's merges as (left id, right id) -> merged id, checking each against the vocabulary."""
    by_id = {i: token for token, i in ranks.items()}
    checked = {}
    for merge in merges:
        a, b = merge
        if a not in by_id or b not in by_id or by_id[a] + by_id[b] not in ranks:
            raise ValueError(f"merge {merge} does not make a token of the vocabulary")
        checked[a, b] = ranks[by_id[a] + by_id[b]]
    return checked
