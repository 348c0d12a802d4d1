"""Chapter 5 bonus: prepare Project Gutenberg (or any folder of text files) for pretraining.

The book's `prepare_dataset.py` (ch05/03_bonus_pretraining_on_gutenberg) reads every book whole,
joins them with `<|endoftext|>` into ~500 MB text files (`combine_files`), and leaves tokenizing to the
training script, which tokenizes a whole file again at every run. Its README lists what it leaves out:
stripping the Project Gutenberg header and footer, and storing the data pre-tokenized. This module
does both, for corpora of any size:

* every file under `--data-dir` (recursive, sorted, hidden files and folders left out) is read one
  line at a time: its encoding detected (UTF-8, else `charset_normalizer`, else latin-1), the
  Project Gutenberg header and footer cut off (`strip_headers`, a small equivalent of the
  `gutenberg` package's), blank lines collapsed as the book does, files that are empty or not text
  skipped and counted;
* the text is tokenized with GPT-2's tokenizer (`ch02.tokenizer.get_gpt2_tokenizer`) by worker
  processes, and the ids (uint16) are written in the files' order, each document followed by
  `<|endoftext|>` (50256), into shards of about `--shard-tokens` tokens, a train and a val stream (a
  document goes to val by a hash of its path, `--val-fraction`): the same bytes whatever the number of
  workers;
* memory stays bounded: a document is tokenized in pieces of `CHUNK_CHARS` characters, a long one is
  spooled to disk by its worker, a shard is written as it fills;
* a shard is written atomically and `progress.json` records it, so a rerun of an interrupted
  preparation continues after the last finished shard; a finished one writes `manifest.json` and a
  rerun says so and does nothing. `open_shards` gives the training step memory-mapped views.

    python -m ch05.gutenberg.prepare_dataset download        # how the book downloads the books
    python -m ch05.gutenberg.prepare_dataset prepare --data-dir gutenberg/data/raw --output-dir OUT
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from llmfs.atomic import atomic_write
from llmfs.errors import InvalidInput

# New: llmfs.cli (the command's parser and checks) is imported inside the functions that use it: it imports
# PyTorch, which would cost every spawned tokenizing worker seconds of start-up and ~300 MB for nothing.

EOT_ID = 50256  # <|endoftext|>
TOKENIZER = "gpt2 (tiktoken ranks, ch02/gpt2.tiktoken)"
FORMAT = "ch05.gutenberg shards v1: little-endian uint16 GPT-2 ids, <|endoftext|> after every document"
MANIFEST, PROGRESS = "manifest.json", "progress.json"
SHARD_NAME = re.compile(r"^(train|val)-\d{5}\.bin$")

SAMPLE_BYTES = 1 << 20  # what charset_normalizer looks at; the whole file is then checked in blocks
BLOCK_BYTES = 1 << 18
LINE_LIMIT = 1 << 20  # a longer line is read in pieces
CHUNK_CHARS = 1 << 16  # characters per tokenizer call: bounds the list of ids each call makes
SPOOL_TOKENS = 1 << 18  # a document with more tokens goes to a spool file instead of the pipe
HEADER_LINES = 600  # the gutenberg package looks for a start marker in the first 600 lines
WESTERN = ("cp1252", "latin_1", "iso8859_15")  # preferred among charset_normalizer's close guesses
CHAOS_TOLERANCE = 0.1

# Markers of the Project Gutenberg boilerplate, from the `gutenberg` package's lists, the common ones.
START_MARKERS = re.compile(
    r"^\s*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG E-?BOOK"
    r"|\*END\*THE SMALL PRINT!"
    r"|\*\*\*\s*START OF THE PROJECT GUTENBERG"
    r")", re.IGNORECASE)
END_MARKERS = re.compile(
    r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG E-?BOOK"
    r"|End of (the )?Project Gutenberg'?s? E-?Book"
    r"|End of Project Gutenberg's"
    r"|\*\*\*\s*END OF THE PROJECT GUTENBERG"
    r")", re.IGNORECASE)


# --- Reading one file -----------------------------------------------------------------------------

def _decodes(path: Path, encoding: str) -> bool:
    """Does the whole file decode strictly as `encoding` without a NUL character? Read in blocks."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    with open(path, "rb") as f:
        try:
            while block := f.read(BLOCK_BYTES):
                if b"\x00" in block and not encoding.startswith("utf-16"):  # text has none in other encodings
                    return False
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


CONTROL = re.compile("[\x00-\x08\x0e-\x19\x1c-\x1f\x7f-\x9f]")  # not \t \n \v \f \r, ^Z, ESC


def _control_fraction(text: str) -> float:
    return len(CONTROL.findall(text)) / max(1, len(text))


def detect_encoding(path: str | os.PathLike) -> tuple[str | None, str]:
    """(encoding, how) for a file, or (None, reason) for one that is empty or not text.

    The book reads UTF-8 and falls back to latin-1. New: between the two, `charset_normalizer` guesses
    from the first MiB, and the whole file must decode with its guess. Its guesses among the single-byte
    code pages are close calls on short texts (cp1250 for French); a Western one (cp1252, latin-1) is
    taken when its score is within CHAOS_TOLERANCE of the best. A file with NUL bytes (but for UTF-16 with
    its byte-order mark), or whose decoded start is more than 5% control characters, is binary.
    """
    path = Path(path)
    with open(path, "rb") as f:
        sample = f.read(1 << 16)
    if not sample.strip():
        return None, "empty"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # New: Windows' "Unicode" text files
        return ("utf-16", "utf-16 (byte-order mark)") if _decodes(path, "utf-16") else (None, "binary")
    if b"\x00" in sample:
        return None, "binary"
    if _decodes(path, "utf-8"):
        encoding, how = "utf-8-sig", "utf-8"  # -sig: a byte-order mark is not text
    else:
        from charset_normalizer import from_bytes

        with open(path, "rb") as f:
            matches = list(from_bytes(f.read(SAMPLE_BYTES)))
        encoding, how = None, "latin-1 (fallback)"
        if matches:
            best = min(m.chaos for m in matches)
            close = [m.encoding for m in matches if m.chaos <= best + CHAOS_TOLERANCE]
            guess = next((w for w in WESTERN if w in close), matches[0].encoding)
            if _decodes(path, guess):
                encoding, how = guess, f"{guess} (charset_normalizer)"
        if encoding is None:
            if not _decodes(path, "latin-1"):  # NUL bytes after the sample
                return None, "binary"
            encoding = "latin-1"
    if _control_fraction(sample.decode(encoding, errors="replace")) > 0.05:
        return None, "binary"
    return encoding, how


def read_lines(path: str | os.PathLike, encoding: str) -> Iterator[str]:
    """The file's lines, decoded, newlines made "\\n" (as `open(path, "r")` in the book does)."""
    with open(path, "rb") as raw, io.TextIOWrapper(raw, encoding=encoding, newline=None) as f:
        while line := f.readline(LINE_LIMIT):
            yield line


def strip_headers(lines: Iterable[str]) -> Iterator[str]:
    """The lines between Project Gutenberg's "*** START OF ..." and "*** END OF ..." markers.

    The book's later versions call `gutenberg.cleanup.strip_headers`; this is a small streaming
    equivalent: a start marker counts in the first HEADER_LINES lines (which are held back until then),
    an end marker anywhere; text without markers passes unchanged.
    """
    it = iter(lines)
    head: list[str] | None = []
    for line in it:
        if START_MARKERS.match(line):
            head = None  # drop the header and the marker line
            break
        if END_MARKERS.match(line):
            yield from head
            return
        head.append(line)
        if len(head) >= HEADER_LINES:
            break
    if head:
        yield from head
    for line in it:
        if ("UTENBERG" in line or "utenberg" in line) and END_MARKERS.match(line):  # the test first: faster
            return
        yield line


def document_chunks(lines: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """The document as pieces of about `chunk_chars` characters that tokenize as the whole text does.

    The text is what `re.sub(r"\\n\\s*\\n", "\\n\\n", text).strip()` makes of the joined lines: blank
    lines collapsed (as the book's prepare_dataset.py does) and the ends stripped (New). A piece ends
    after a line that ends in one "\\n" and before a line that starts with a letter or a sign: GPT-2's
    pre-tokenizer splits there anyway, so the ids are those of the whole text. A text with no such place
    for 16 pieces is cut anyway (the ids may then differ a little; decoded, the text is the same).
    """
    buf: list[str] = []
    size, started, blank, tail = 0, False, False, ""
    for line in lines:
        body = line.rstrip()
        if not body:
            if line.endswith("\n"):
                blank = started
            elif started:
                tail += line  # a whitespace-only piece of an over-long line
            continue
        if not started:
            started, body, piece = True, body.lstrip(), body.lstrip()
        else:
            sep = tail + ("\n" if blank else "")
            if size >= chunk_chars and sep == "\n" and not line[0].isspace():
                buf.append(sep)
                yield "".join(buf)
                buf, size, piece = [], 0, body
            else:
                piece = sep + body
        blank, tail = False, line[len(line.rstrip()):]
        buf.append(piece)
        size += len(piece)
        if size >= 16 * chunk_chars:
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)


def split_of(relative_path: str, val_fraction: float) -> str:
    """train or val, from a hash of the file's path: stable whatever else is in the folder."""
    h = int.from_bytes(hashlib.sha256(relative_path.encode("utf-8")).digest()[:8], "big") / 2 ** 64
    return "val" if h < val_fraction else "train"


# --- The worker: one file in, its token ids out -------------------------------------------------------

_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from ch02.tokenizer import get_gpt2_tokenizer

        _TOKENIZER = get_gpt2_tokenizer()
    return _TOKENIZER


def tokenize_file(task: tuple[int, str, str, str]) -> dict:
    """Detect, read, strip and tokenize one file (runs in a worker). Returns its record, with the ids
    (bytes) or, for a long document, the name of the spool file holding them."""
    index, path, relative, spool_dir = task
    record: dict = {"index": index, "path": relative, "bytes": 0}
    arrays, tokens, spool, spool_name = [], 0, None, ""
    try:
        record["bytes"] = os.path.getsize(path)
        encoding, how = detect_encoding(path)
        if encoding is None:
            return {**record, "status": "skipped", "reason": how}
        enc = _tokenizer()
        for chunk in document_chunks(strip_headers(read_lines(path, encoding))):
            ids = np.asarray(enc.encode_ordinary(chunk), dtype="<u2")
            tokens += len(ids)
            if spool is None and tokens > SPOOL_TOKENS:
                fd, spool_name = tempfile.mkstemp(dir=spool_dir, prefix=f"doc-{index}-", suffix=".spool")
                spool = os.fdopen(fd, "wb")
                for a in arrays:
                    spool.write(a.tobytes())
                arrays = []
            if spool is not None:
                spool.write(ids.tobytes())
            else:
                arrays.append(ids)
    except OSError as exc:  # gone or unreadable since the listing: skipped and counted, like a binary file
        if spool is not None:
            spool.close()
            os.unlink(spool_name)
        return {**record, "status": "skipped", "reason": "unreadable", "error": exc.strerror or str(exc)}
    if tokens == 0:
        return {**record, "status": "skipped", "reason": "empty"}
    record.update(status="document", encoding=how, tokens=tokens)
    if spool is not None:
        spool.close()
        return {**record, "spool": spool_name}
    return {**record, "ids": b"".join(a.tobytes() for a in arrays)}


def _ignore_ctrl_c() -> None:
    """In a worker: Ctrl-C is the main process's to handle (one message, not one traceback per worker)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ordered_results(tasks: list[tuple[int, str, str, str]], workers: int) -> Iterator[dict]:
    """`tokenize_file` of every task, in the tasks' order; at most 4 tasks per worker in flight, so
    memory does not grow with the corpus when the workers run ahead of the writer."""
    if workers == 1:
        yield from map(tokenize_file, tasks)
        return
    # spawn: the same on every OS, and safe after tiktoken's threads
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_ctrl_c) as pool:
        pending: deque = deque()
        queue = iter(tasks)
        for task in queue:
            pending.append(pool.apply_async(tokenize_file, (task,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --- The writer: shards, progress, manifest ----------------------------------------------------------

class ShardWriter:
    """One split's stream of shards: `<split>-00000.bin`, ... each written to a temporary file and renamed
    into place when it holds `shard_tokens` tokens (or more: a shard ends at a document's end)."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, finished: list[dict], next_file: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.finished = finished  # records of the finished shards
        self.next_file = next_file  # the first file index not in a finished shard of this split
        self._stack: contextlib.ExitStack | None = None
        self._file = None
        self.tokens = self.documents = 0
        self.first_file = self.last_file = -1

    def add(self, index: int, blocks: Iterable[bytes]) -> bool:
        """Append one document (its ids, then <|endoftext|>); True when this finished a shard."""
        if self._file is None:
            self._stack = contextlib.ExitStack()
            name = f"{self.split}-{len(self.finished):05d}.bin"
            self._file = self._stack.enter_context(atomic_write(self.folder / name, "wb"))
            self.tokens = self.documents = 0
            self.first_file = index
        for block in blocks:
            self._file.write(block)
            self.tokens += len(block) // 2
        self._file.write(np.array([EOT_ID], dtype="<u2").tobytes())
        self.tokens += 1
        self.documents += 1
        self.last_file = index
        if self.tokens >= self.shard_tokens:
            self.close()
            return True
        return False

    def close(self) -> None:
        """Finish the open shard (fsync and rename into place)."""
        if self._file is None:
            return
        self._stack.close()
        self.finished.append({"file": f"{self.split}-{len(self.finished):05d}.bin", "split": self.split,
                              "tokens": self.tokens, "documents": self.documents,
                              "first_file": self.first_file, "last_file": self.last_file})
        self._file = self._stack = None
        self.next_file = self.last_file + 1

    def abort(self) -> None:
        """Drop the open shard's temporary file (an error or Ctrl-C: the rerun writes it again)."""
        if self._stack is not None:
            with contextlib.suppress(RuntimeError):
                self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
        self._file = self._stack = None


def list_files(data_dir: Path, exclude: Path | None = None) -> list[tuple[str, Path, int, int]]:
    """(relative path, path, size, mtime) of every file under data_dir, sorted by relative path;
    hidden files and folders (.git, .DS_Store) and the output folder are left out."""
    found = []
    exclude = exclude.resolve() if exclude is not None else None
    for root, dirs, names in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(root, d).resolve() != exclude))
        for name in names:
            path = Path(root, name)
            if name.startswith(".") or not path.is_file():
                continue
            st = path.stat()
            found.append((path.relative_to(data_dir).as_posix(), path, st.st_size, st.st_mtime_ns))
    return sorted(found)


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8192)
    return bool(head.strip()) and b"\x00" not in head


def _fingerprint(files: list[tuple[str, Path, int, int]]) -> str:
    h = hashlib.sha256()
    for relative, _, size, mtime in files:
        h.update(f"{relative}\t{size}\t{mtime}\n".encode("utf-8"))
    return h.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path} cannot be read as JSON ({exc}); pass --overwrite to start afresh") from None


def _ours(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if SHARD_NAME.match(p.name)) if folder.is_dir() else []


def check_inputs(data_dir: str | os.PathLike, output_dir: str | os.PathLike, shard_tokens: int,
                 val_fraction: float, overwrite: bool = False) -> tuple[list, dict, dict | None]:
    """Everything checked before any work: the data folder (exists, holds a text file), the output folder
    (writable, empty of another corpus's shards). Returns (files, source, progress state or None);
    raises a user error (one line) otherwise. `overwrite` removes our earlier shards and state."""
    from llmfs.cli import check_output_dir

    data = Path(data_dir)
    if not data.exists():
        raise FileNotFoundError(f"--data-dir {data} does not exist; download the books first "
                                "(python -m ch05.gutenberg.prepare_dataset download)")
    if not data.is_dir():
        raise NotADirectoryError(f"--data-dir {data} is not a folder")
    if not 0 <= val_fraction < 1:
        raise InvalidInput(f"--val-fraction must be from 0 to below 1, got {val_fraction}")
    if Path(output_dir).resolve() == data.resolve():
        raise InvalidInput(f"--output-dir is --data-dir ({data}); the shards would become input: choose another "
                           "--output-dir")
    files = list_files(data, exclude=Path(output_dir))
    if not any(_looks_like_text(path) for _, path, _, _ in files):
        raise InvalidInput(f"--data-dir {data} holds no text files ({len(files)} files, all empty or binary)")
    out = check_output_dir(output_dir)
    source = {"data_dir": str(data.resolve()), "files": len(files), "listing_sha256": _fingerprint(files),
              "shard_tokens": shard_tokens, "val_fraction": val_fraction, "tokenizer": TOKENIZER, "format": FORMAT}
    if overwrite:
        for p in [*_ours(out), out / MANIFEST, out / PROGRESS]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    manifest, progress = _read_json(out / MANIFEST), _read_json(out / PROGRESS)
    earlier = manifest or progress
    if earlier is None:
        if _ours(out):
            raise FileExistsError(f"--output-dir {out} holds shards ({_ours(out)[0].name}, ...) but no {MANIFEST} "
                                  "or progress.json: another preparation's; pass --overwrite or choose another "
                                  "--output-dir")
        return files, source, None
    if earlier.get("source") != source:
        old = earlier.get("source", {})
        what = [k for k in source if old.get(k) != source[k]]
        kind = "a finished" if manifest else "an unfinished"
        raise FileExistsError(f"--output-dir {out} holds {kind} preparation of another corpus or with other settings "
                              f"({', '.join(what)} differ: {old.get('data_dir')}, {old.get('files')} files); "
                              "pass --overwrite to replace it, or choose another --output-dir")
    return files, source, {**earlier, "finished": manifest is not None}


def _counts(records: Iterable[dict]) -> tuple[Counter, Counter]:
    skipped, encodings = Counter(), Counter()
    for r in records:
        if r["status"] == "skipped":
            skipped[r["reason"]] += 1
        else:
            encodings[r["encoding"]] += 1
    return skipped, encodings


def prepare(data_dir: str | os.PathLike, output_dir: str | os.PathLike, workers: int = 1,
            shard_tokens: int = 50_000_000, val_fraction: float = 0.1, overwrite: bool = False,
            progress: bool = True, on_shard: Callable[[dict], None] | None = None) -> dict:
    """Tokenize every text file under `data_dir` into shards in `output_dir`; return the manifest.

    Resumes an interrupted preparation of the same folder with the same settings; returns a finished
    one's manifest at once. `on_shard(record)` is called after each finished shard (tests use it to
    stop a run mid-way).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    files, source, state = check_inputs(data_dir, output_dir, shard_tokens, val_fraction, overwrite)
    out = Path(output_dir)
    if state is not None and state["finished"]:
        manifest = {k: v for k, v in state.items() if k != "finished"}
        print(f"{out} already holds the finished preparation of {source['data_dir']} ({len(manifest['shards'])} "
              f"shards, {sum(manifest['tokens'].values()):,} tokens); nothing to do", file=sys.stderr)
        return manifest
    # The state kept from an interrupted run: finished shards per split, and the records of the files before
    # the point where every split continues (and of documents already in a finished shard).
    shards = state["shards"] if state else []
    writers = {}
    for split in ("train", "val"):
        done = [s for s in shards if s["split"] == split]
        writers[split] = ShardWriter(out, split, shard_tokens, done, done[-1]["last_file"] + 1 if done else 0)
    restart = min(w.next_file for w in writers.values())
    records = {}
    for r in (state or {}).get("files", []):
        if r["index"] < restart or (r["status"] == "document" and r["index"] < writers[r["split"]].next_file):
            records[r["index"]] = r
    if state:
        print(f"resuming: {len(shards)} finished shards kept, continuing at file {restart + 1} of {len(files)}",
              file=sys.stderr)

    def save_state() -> None:
        done = sorted((s for w in writers.values() for s in w.finished), key=lambda s: (s["split"], s["file"]))
        with atomic_write(out / PROGRESS) as f:
            json.dump({"source": source, "shards": done, "files": [records[i] for i in sorted(records)]}, f)

    todo = [i for i in range(len(files)) if i not in records]
    total = sum(files[i][2] for i in todo)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress, file=sys.stderr)
    spool_dir = out / ".spool"  # long documents' ids on their way from a worker to the writer
    shutil.rmtree(spool_dir, ignore_errors=True)  # left by a killed run
    spool_dir.mkdir()
    save_state()  # from now on the folder is recognisably this preparation's
    done_bytes = done_tokens = 0  # this run's, for the throughput
    try:
        tasks = [(i, str(files[i][1]), files[i][0], str(spool_dir)) for i in todo]
        for result in ordered_results(tasks, workers):
            index = result["index"]
            ids, spool = result.pop("ids", None), result.pop("spool", None)
            if result["status"] == "document":
                split = split_of(result["path"], val_fraction)
                result["split"] = split
                blocks = _spool_blocks(spool) if spool else [ids]
                records[index] = result
                done_tokens += result["tokens"]
                if writers[split].add(index, blocks):
                    save_state()
                    if on_shard:
                        on_shard(writers[split].finished[-1])
            else:
                records[index] = result
            done_bytes += result["bytes"]
            bar.update(result["bytes"])
        for w in writers.values():
            if w.tokens and w._file is not None:
                w.close()
                save_state()
                if on_shard:
                    on_shard(w.finished[-1])
    except KeyboardInterrupt:
        for w in writers.values():
            w.abort()
        kept = sum(len(w.finished) for w in writers.values())
        raise KeyboardInterrupt(f"{kept} finished shards kept in {out}; run the same command again to "
                                "continue after them") from None
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
        shutil.rmtree(spool_dir, ignore_errors=True)

    all_records = [records[i] for i in sorted(records)]
    skipped, encodings = _counts(all_records)
    finished = sorted((s for w in writers.values() for s in w.finished), key=lambda s: (s["split"], s["file"]))
    tokens = {split: sum(s["tokens"] for s in finished if s["split"] == split) for split in ("train", "val")}
    documents = sum(encodings.values())
    if documents == 0:
        raise InvalidInput(f"--data-dir {data_dir} holds no text: {len(files)} files skipped "
                           f"({', '.join(f'{k} {v}' for k, v in skipped.items())})")
    manifest = {"source": source, "format": FORMAT, "tokenizer": TOKENIZER, "dtype": "uint16", "eot_id": EOT_ID,
                "split_rule": "val when sha256(relative path) / 2**256 < val_fraction", "documents": documents,
                "tokens": tokens, "shards": finished, "skipped": dict(skipped), "encodings": dict(encodings),
                "files": all_records}
    with atomic_write(out / MANIFEST) as f:
        json.dump(manifest, f, indent=1)
    with contextlib.suppress(FileNotFoundError):
        (out / PROGRESS).unlink()
    seconds = time.perf_counter() - started
    skipped_text = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"
    print(f"prepared {documents:,} documents, {sum(tokens.values()):,} tokens (train {tokens['train']:,}, val "
          f"{tokens['val']:,}) in {len(finished)} shards; skipped {sum(skipped.values())} files ({skipped_text}); "
          f"encodings: {', '.join(f'{k} {v}' for k, v in sorted(encodings.items()))}; {done_bytes / 1e6:.1f} MB "
          f"in {seconds:.1f} s ({done_bytes / 1e6 / seconds:.2f} MB/s, {done_tokens / seconds:,.0f} tokens/s)",
          file=sys.stderr)
    return manifest


def _spool_blocks(name: str) -> Iterator[bytes]:
    try:
        with open(name, "rb") as f:
            while block := f.read(BLOCK_BYTES):
                yield block
    finally:
        os.unlink(name)


# --- Reading the shards back ---------------------------------------------------------------------------

class ShardSet:
    """The shards of a finished preparation, as read-only memory maps (what the training step samples
    from; nothing is read until used)."""

    def __init__(self, manifest: str | os.PathLike):
        path = Path(manifest)
        path = path / MANIFEST if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run `python -m ch05.gutenberg.prepare_dataset prepare`"
                                    " (an interrupted preparation continues when run again)")
        self.folder, self.manifest = path.parent, json.loads(path.read_text(encoding="utf-8"))

    def memmaps(self, split: str = "train") -> list[np.memmap]:
        maps = []
        for s in self.manifest["shards"]:
            if s["split"] == split:
                file = self.folder / s["file"]
                if file.stat().st_size != 2 * s["tokens"]:
                    raise InvalidInput(f"{file} holds {file.stat().st_size // 2:,} tokens, the manifest says "
                                       f"{s['tokens']:,}: prepare again with --overwrite")
                maps.append(np.memmap(file, dtype="<u2", mode="r"))
        return maps

    def num_tokens(self, split: str = "train") -> int:
        return self.manifest["tokens"][split]


def open_shards(manifest: str | os.PathLike, split: str = "train") -> list[np.memmap]:
    """The memory-mapped shards of one split (train or val) of a finished preparation."""
    return ShardSet(manifest).memmaps(split)


# --- The command -----------------------------------------------------------------------------------------

GUTENBERG_REPO = "https://github.com/pgcorpus/gutenberg.git"
BOOK_STEPS = [["git", "clone", GUTENBERG_REPO], ["pip", "install", "-r", "requirements.txt"],
              ["python", "get_data.py"]]


class NetworkUnavailable(RuntimeError):
    """github.com cannot be reached (exit code 1: a server's trouble, not the user's input)."""


def download(output_dir: str | os.PathLike, execute: bool = False) -> None:
    """The book's way to get the books: clone pgcorpus/gutenberg and run its get_data.py (about 50 GB and
    10-15 hours as the book's README says; it needs rsync). Prints the steps; `execute` runs them."""
    from llmfs.cli import check_output_dir
    from llmfs.download import reachable

    folder = Path(output_dir)
    if shutil.which("git") is None:
        raise InvalidInput("git is not installed; install it, or copy a folder of Project Gutenberg .txt files "
                           "here and run: python -m ch05.gutenberg.prepare_dataset prepare --data-dir FOLDER")
    if not reachable(GUTENBERG_REPO, timeout=5):
        raise NetworkUnavailable("github.com cannot be reached (offline?); on a machine with a network run `git "
                                 f"clone {GUTENBERG_REPO} && cd gutenberg && pip install -r requirements.txt && python "
                                 "get_data.py`, copy gutenberg/data/raw here, then run `python -m "
                                 "ch05.gutenberg.prepare_dataset prepare --data-dir raw`")
    check_output_dir(folder)
    print(f"The book downloads Project Gutenberg with {GUTENBERG_REPO} (about 50 GB, 10-15 hours, needs rsync):")
    print(f"  cd {folder}")
    for step in BOOK_STEPS:
        print("  " + " ".join(step) + ("" if step[0] != "git" else "\n  cd gutenberg"))
    print(f"then: python -m ch05.gutenberg.prepare_dataset prepare --data-dir {folder / 'gutenberg/data/raw'}")
    if not execute:
        print("(add --run to run these steps now)")
    else:
        subprocess.run(BOOK_STEPS[0], cwd=folder, check=True)
        for step in BOOK_STEPS[1:]:
            subprocess.run([sys.executable, "-m", *step] if step[0] == "pip" else [sys.executable, *step[1:]],
                           cwd=folder / "gutenberg", check=True)


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"must be from 0 to below 1, got {text}")
    return value


def parser():
    """The command's options (an `llmfs.cli.Parser`)."""
    from llmfs.cli import Parser, path_argument, positive_int
    from llmfs.runtime import outputs_dir

    p = Parser(prog="python -m ch05.gutenberg.prepare_dataset",
               description="Download Project Gutenberg (the book's steps) or prepare a folder of books as shards.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="the book's download steps (pgcorpus/gutenberg); needs git and a network")
    d.add_argument("--output-dir", type=path_argument, default=outputs_dir("ch05") / "gutenberg",
                   help="where to clone pgcorpus/gutenberg (default outputs/ch05/gutenberg)")
    d.add_argument("--run", action="store_true", help="run the steps (clone, install its requirements, get_data.py)")
    q = sub.add_parser("prepare", help="tokenize a folder of text files into uint16 shards")
    q.add_argument("--data-dir", type=path_argument, required=True,
                   help="folder of text files, searched recursively (the book's: gutenberg/data/raw)")
    q.add_argument("--output-dir", type=path_argument, default=outputs_dir("ch05") / "gutenberg_preprocessed",
                   help="where the shards and manifest.json go (default outputs/ch05/gutenberg_preprocessed)")
    q.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1),
                   help="tokenizing processes (default: up to 4); the output is the same for any number")
    q.add_argument("--shard-tokens", type=positive_int, default=50_000_000,
                   help="tokens per shard (a shard ends at a document's end; default 50,000,000 = 100 MB)")
    q.add_argument("--val-fraction", type=fraction, default=0.1,
                   help="share of documents in the val split (by a hash of their path; default 0.1)")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier preparation in --output-dir")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ch05.gutenberg.prepare_dataset {download,prepare} ...`; returns the exit code."""
    from llmfs.cli import run

    args = parser().parse_args(argv)

    def work() -> None:
        if args.command == "download":
            download(args.output_dir, execute=args.run)
        else:
            prepare(args.data_dir, args.output_dir, workers=args.workers, shard_tokens=args.shard_tokens,
                    val_fraction=args.val_fraction, overwrite=args.overwrite, progress=not args.no_progress)

    return run(work, argv, other_errors={NetworkUnavailable: 1})


if __name__ == "__main__":
    sys.exit(main())
