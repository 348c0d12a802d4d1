"""Getting the chapters' data files, offline first.

`get_data_file(name)` returns a local path to a verified copy of a named file,
looking in this order:

1. the folder named by the environment variable `LLMFS_DATA_MIRROR` (a read-only
   mirror, e.g. a USB stick or the shared folder CI uses);
2. the local cache (`LLMFS_CACHE_DIR`, default `~/.cache/llms-from-scratch`);
3. the canonical URL, downloaded with `pooch` (progress bar, sha256 check,
   atomic write) into the cache.

Every copy is checked against its sha256, so a wrong or partial file is never
returned. When nothing works, the error says which URL failed, where the cache
is, and how to use a mirror.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from llmfs.errors import UserError

MIRROR_ENV = "LLMFS_DATA_MIRROR"
CACHE_ENV = "LLMFS_CACHE_DIR"


@dataclass(frozen=True)
class DataFile:
    name: str
    url: str
    sha256: str
    # When the URL is a zip archive, the member to extract; its sha256 is the one above.
    archive_member: str | None = None


DATA_FILES: dict[str, DataFile] = {
    f.name: f
    for f in [
        DataFile(
            "the-verdict.txt",
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
            "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
        ),
        DataFile(
            "SMSSpamCollection",
            "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
            archive_member="SMSSpamCollection",
        ),
        DataFile(
            "instruction-data.json",
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
            "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
        ),
        DataFile(
            "instruction-data-with-preference.json",
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
            "instruction-data-with-preference.json",
            "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
        ),
        DataFile(
            "tinyshakespeare.txt",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        ),
    ]
}


class DataUnavailableError(UserError, RuntimeError):
    """The file is in neither the mirror nor the cache, and could not be downloaded."""


class ChecksumError(UserError, RuntimeError):
    """A file's sha256 does not match the recorded value."""


def cache_dir() -> Path:
    """Where downloaded files are kept (`LLMFS_CACHE_DIR` overrides the default)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llms-from-scratch"


def sha256sum(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, spec: DataFile) -> None:
    actual = sha256sum(path)
    if actual != spec.sha256:
        raise ChecksumError(
            f"{spec.name}: checksum mismatch for {path}\n  expected sha256 {spec.sha256}\n"
            f"  actual   sha256 {actual}\nThe file is corrupt or a different version; delete it and try again."
        )


def _download(spec: DataFile, target: Path) -> None:
    """Download `spec.url` into `target` (verified, atomic). Raises DataUnavailableError/ChecksumError."""
    # imported here: only needed when something is actually downloaded
    import pooch
    import requests

    target.parent.mkdir(parents=True, exist_ok=True)
    known_hash = None if spec.archive_member else f"sha256:{spec.sha256}"
    download_name = target.name + (".zip" if spec.archive_member else "")
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel("WARNING")  # its "Downloading data from ..." line: the progress bar says as much
    try:
        # pooch writes to a temporary file and moves it into place only after the hash matched.
        # A bounded wait: 10 s to connect, 30 s without data, instead of an unresponsive server's minutes.
        downloader = pooch.HTTPDownloader(progressbar=True, timeout=(10, 30))
        fetched = Path(pooch.retrieve(spec.url, known_hash=known_hash, fname=download_name,
                                      path=target.parent, downloader=downloader))
    except Exception as exc:
        # pooch signals a hash mismatch with a plain ValueError (it has already deleted the
        # bad download). Some requests errors (InvalidURL, MissingSchema) are ValueErrors
        # too, so they are told apart by type, not caught by a bare `except ValueError`.
        if isinstance(exc, ValueError) and not isinstance(exc, requests.RequestException) and "hash" in str(exc):
            raise ChecksumError(
                f"{spec.name}: the file downloaded from {spec.url} failed verification and was deleted; "
                f"expected sha256 {spec.sha256}. {exc}"
            ) from exc
        # no network, DNS failure, HTTP error, bad URL, ...
        raise DataUnavailableError(_unavailable_message(spec, target, exc)) from exc
    finally:
        logger.setLevel(level)

    if spec.archive_member:
        tmp = target.with_name(f".{target.name}.part")
        try:
            with zipfile.ZipFile(fetched) as zf, zf.open(spec.archive_member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            _verify(tmp, spec)
            os.replace(tmp, target)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataUnavailableError(
                f"{spec.name}: {spec.url} is not a zip archive holding {spec.archive_member!r} ({exc})"
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)
            fetched.unlink(missing_ok=True)


def _unavailable_message(spec: DataFile, target: Path, exc: BaseException | None) -> str:
    reason = f" ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})" if exc else ""
    mirror = os.environ.get(MIRROR_ENV)
    where = ("the data mirror or the cache" if not mirror or Path(mirror).expanduser().is_dir()
             else f"the cache, and the data mirror {MIRROR_ENV}={mirror} is not a folder")
    return (
        f"Could not get {spec.name!r}: it is not in {where}, and downloading "
        f"{spec.url} failed{reason}.\n"
        f"What to do:\n"
        f"  * download it by other means and put it at {target}, or\n"
        f"  * set the environment variable {MIRROR_ENV} to a folder that holds {spec.name}, or\n"
        f"  * set {CACHE_ENV} to a folder that already holds it, or connect to the network and retry."
    )


def get_data_file(name: str, *, download: bool = True, url: str | None = None) -> Path:
    """Return the local path of a verified copy of the data file `name`.

    Looks in `$LLMFS_DATA_MIRROR`, then the cache, then downloads (unless
    `download=False`) from the recorded URL, or from `url` when given (a mirror
    of the same file: the recorded sha256 still applies). Never returns a file
    whose checksum does not match.
    """
    try:
        spec = DATA_FILES[name]
    except KeyError:
        raise KeyError(f"unknown data file {name!r}; known files: {sorted(DATA_FILES)}") from None
    if url is not None:
        spec = replace(spec, url=url)

    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        candidate = Path(mirror).expanduser() / name
        if candidate.is_file():
            _verify(candidate, spec)
            return candidate

    target = cache_dir() / name
    if target.is_file():
        _verify(target, spec)
        return target

    if not download:
        raise DataUnavailableError(_unavailable_message(spec, target, None))
    _download(spec, target)
    return target


def data_file_for_url(url: str) -> str | None:
    """The name of the data file recorded with this download URL, or None."""
    return next((f.name for f in DATA_FILES.values() if f.url == url), None)


def data_file_status(name: str) -> str | None:
    """Where `name` is available without downloading ('mirror'/'cache'), or None."""
    mirror = os.environ.get(MIRROR_ENV)
    if mirror and (Path(mirror).expanduser() / name).is_file():
        return "mirror"
    if (cache_dir() / name).is_file():
        return "cache"
    return None


def read_text_file(name: str) -> str:
    """Convenience: the text of a data file (UTF-8)."""
    return get_data_file(name).read_text(encoding="utf-8")
