"""Getting the chapters' data files, offline first, and bounding every network wait.

`get_data_file(name)` returns a local path to a verified copy of a named file,
looking in this order:

1. the folder named by the environment variable `LLMFS_DATA_MIRROR` (a read-only
   mirror, e.g. a USB stick or the shared folder CI uses);
2. the local cache (`LLMFS_CACHE_DIR`, default `~/.cache/llms-from-scratch`);
3. the canonical URL, downloaded with `pooch` (sha256 check, atomic write) into the cache.

Both variables must hold absolute paths (`llmfs.env_paths`). Every copy is checked against its
sha256, so a wrong or partial file is never returned. When nothing works, the one-line error says
which URL failed, where the cache is, and how to use a mirror.

No network wait lasts longer than `NETWORK_WAIT_S` without progress: connecting, waiting for an
answer, a pause in a download's body. A download that keeps receiving data runs as long as it
needs. The same bound covers the pretrained weights chapter 5 fetches from the Hugging Face Hub
(`from_hub`): each of huggingface_hub's requests gets at most what is left of it, its retry
warnings are silenced, the progress bar of a failed attempt is erased, and a stalled endpoint
ends in `HubUnavailable` (the local cache is tried first). A progress bar appears only once data
flows.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

from llmfs.env_paths import CACHE_ENV, MIRROR_ENV, env_path
from llmfs.errors import UserError

# The longest any network wait may last without progress (seconds): connecting, waiting for an
# answer, a listing or metadata request, a pause in a download's body. Tests lower it.
NETWORK_WAIT_S = 30.0
# The quick "is there a network at all" check before a Hugging Face download: without an answer
# this soon, only the local cache is used.
HUB_CONNECT_WAIT_S = 3.0


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


class EndpointStalled(UserError, RuntimeError):
    """A server went the whole wait without answering, without sending more of its answer, or (a listing
    or metadata request) without finishing it."""

    def __init__(self, url: str, waited: float, answered: bool, slow: bool = False):
        self.url, self.waited, self.answered = url, waited, answered
        self.what = (f"did not finish its answer within {waited:.0f} s" if slow
                     else f"stopped sending data for {waited:.0f} s" if answered
                     else f"did not answer within {waited:.0f} s")
        super().__init__(f"{_origin(url)} {self.what}")


class HubUnavailable(UserError, RuntimeError):
    """Files from the Hugging Face Hub are not in the local cache and cannot be had from the endpoint.

    `reason`: 'offline' (HF_HUB_OFFLINE=1), 'unreachable', 'stalled' or 'failed'. The message is a
    clause for "<what> is not available: ..."; the caller adds what to do.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def cache_dir() -> Path:
    """Where downloaded files are kept (`LLMFS_CACHE_DIR`, an absolute path, overrides the default)."""
    return env_path(CACHE_ENV) or Path.home() / ".cache" / "llms-from-scratch"


def mirror_dir() -> Path | None:
    """The read-only data mirror (`LLMFS_DATA_MIRROR`, an absolute path), or None when unset."""
    return env_path(MIRROR_ENV)


def sha256sum(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, spec: DataFile, in_mirror: bool = False) -> None:
    actual = sha256sum(path)
    if actual != spec.sha256:
        fix = (f"replace it in the mirror with a good copy, or unset {MIRROR_ENV} to use the cache and the download"
               if in_mirror else "delete it and run again to download it afresh")
        raise ChecksumError(f"{spec.name}: {path} is corrupt or another version (sha256 {actual}, expected "
                            f"{spec.sha256}); {fix}")


# --- Bounded network waits ---------------------------------------------------------------------

def _origin(url: str) -> str:
    """'https://host:port' of a URL: the endpoint a message names."""
    parts = urlparse(url)
    netloc = parts.netloc.rpartition("@")[2]  # never a user name or token from the URL
    return f"{parts.scheme}://{netloc}" if parts.scheme and netloc else url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def reachable(url: str, timeout: float) -> bool:
    """Can a TCP connection to `url`'s host be opened within `timeout` seconds, name lookup included?

    In a thread, so that a hanging DNS lookup cannot stretch the wait. True when a proxy carries the
    request (the proxy decides then; a direct connection test means nothing).
    """
    import urllib.request

    parts = urlparse(url)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is no number
        return False
    if not host:
        return False
    proxies = urllib.request.getproxies()
    if (proxies.get(parts.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return True
    opened, done = threading.Event(), threading.Event()

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                opened.set()
        except (OSError, ValueError, UnicodeError):
            pass
        finally:
            done.set()

    threading.Thread(target=connect, daemon=True).start()
    done.wait(timeout)
    return opened.is_set()


class _Watchdog:
    """Bounds every request huggingface_hub's httpx clients make during a `bounded_hub_waits` block.

    Each request may wait at most what is left of `wait_s` since the last progress; once nothing is
    left, the next request raises EndpointStalled, which huggingface_hub does not retry. Progress is
    the first answer from an address, and bytes of a file's body beyond what earlier attempts at the
    same address received: a retry that gets the same headers and stalls again gains no time, while
    a download that keeps receiving data is never cut off. A listing or metadata answer (/api/,
    HEAD) must be complete within the wait, however slowly it trickles. `cancel()` (Ctrl-C) refuses
    every further request and wakes the threads waiting on the connections opened meanwhile.
    """

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self.last = time.monotonic()
        self.url = ""
        self.answered = False  # did the last request get its headers?
        self.cancelled = False
        self._received: dict[tuple[str, str], int] = {}  # (method, url) -> the most bytes any attempt got
        self._sockets: list[socket.socket] = []

    def idle(self) -> float:
        return time.monotonic() - self.last

    def progress(self) -> None:
        self.last = time.monotonic()

    def stalled(self) -> EndpointStalled:
        return EndpointStalled(self.url, min(self.idle(), self.wait_s), self.answered)

    def on_request(self, request) -> None:
        if self.cancelled:
            raise KeyboardInterrupt
        left = self.wait_s - self.idle()
        if left <= 0:
            raise self.stalled()
        self.url, self.answered = str(request.url), False
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {key: left if given.get(key) is None else min(given[key], left)
                                         for key in ("connect", "read", "write", "pool")}
        request.extensions["trace"] = self._tracer(request.extensions.get("trace"))

    def on_response(self, response) -> None:
        request = response.request
        key = (request.method, str(request.url))
        if key not in self._received:
            self._received[key] = 0
            self.progress()
        self.answered = True
        offset = _resume_offset(response)
        # A listing or metadata answer is small: the wait bounds all of it, however slowly it trickles.
        metadata = request.method == "HEAD" or "/api/" in request.url.path

        def on_data(n: int) -> None:
            nonlocal offset
            if metadata:
                if self.idle() > self.wait_s:
                    raise EndpointStalled(str(request.url), self.wait_s, True, slow=True)
                return
            offset += n
            if offset > self._received[key]:
                self._received[key] = offset
                self.progress()

        response.stream = _counting_stream(response.stream, on_data)

    def _tracer(self, inner):
        """httpcore's trace hook: remembers the socket of every connection opened, for `cancel`."""
        def trace(event: str, info: dict):
            if event.endswith(("connect_tcp.complete", "start_tls.complete")):
                with contextlib.suppress(Exception):
                    self._sockets.append(info["return_value"].get_extra_info("socket"))
            return inner(event, info) if inner is not None else None
        return trace

    def cancel(self) -> None:
        self.cancelled = True
        for sock in self._sockets:
            with contextlib.suppress(Exception):
                sock.shutdown(socket.SHUT_RDWR)


def _resume_offset(response) -> int:
    """Where a response's body starts in the file: 0, or the start of a 206's Content-Range."""
    if response.status_code != 206:
        return 0
    try:
        return int(response.headers.get("Content-Range", "").split()[1].split("-")[0])
    except (IndexError, ValueError):
        return 0


def _counting_stream(stream, on_data: Callable[[int], None]):
    """`stream` (an httpx response body) calling `on_data(len(chunk))` per chunk; as is for an unknown client."""
    base = getattr(sys.modules.get(type(stream).__module__.split(".")[0]), "SyncByteStream", None)
    if not (isinstance(base, type) and isinstance(stream, base)):
        return stream

    class Counting(base):
        def __iter__(self):
            for chunk in stream:
                if chunk:
                    on_data(len(chunk))
                yield chunk

        def close(self) -> None:
            stream.close()

    return Counting()


_ACTIVE: list[_Watchdog] = []  # the watchdog of the `bounded_hub_waits` block running now (the last one wins)


def _on_request(request) -> None:
    if _ACTIVE:
        _ACTIVE[-1].on_request(request)


def _on_response(response) -> None:
    if _ACTIVE:
        _ACTIVE[-1].on_response(response)


def _hook_hub_clients() -> bool:
    """Make every httpx client huggingface_hub creates call `_on_request`/`_on_response` (which do nothing
    outside a `bounded_hub_waits` block), by wrapping its client factory once. A factory, not the
    current client: huggingface_hub replaces its client after a connection error. False for a
    requests-based huggingface_hub (before 1.0), whose waits stay its own."""
    import huggingface_hub

    try:
        from huggingface_hub.utils import _http
    except ImportError:
        return False
    set_factory = getattr(huggingface_hub, "set_client_factory", None)
    current = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or getattr(_http, "default_client_factory", None)
    if set_factory is None or current is None:
        return False
    if getattr(current, "llmfs_hooked", False):
        return True

    def factory():
        client = current()
        hooks = getattr(client, "event_hooks", None)
        if hooks is not None:
            hooks["request"].append(_on_request)
            hooks["response"].append(_on_response)
        return client

    factory.llmfs_hooked = True
    set_factory(factory)
    return True


@contextlib.contextmanager
def bounded_hub_waits(wait_s: float | None = None) -> Iterator[_Watchdog]:
    """Within the block, huggingface_hub's requests wait at most `wait_s` (NETWORK_WAIT_S) without
    progress (`_Watchdog`), its (and urllib3's) retry warnings are silenced, and Ctrl-C also stops
    the threads it downloads in (when called from the main thread).

    The requests are bounded through the event hooks of huggingface_hub's httpx clients (version 1
    and later); with an older, requests-based huggingface_hub only the warnings are silenced.
    """
    watch = _Watchdog(NETWORK_WAIT_S if wait_s is None else wait_s)
    _hook_hub_clients()
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "urllib3")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        def interrupted(signum, frame):
            watch.cancel()  # the download threads end now, so the command can say "interrupted" and exit
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, interrupted)
    _ACTIVE.append(watch)
    try:
        yield watch
    finally:
        if watch in _ACTIVE:
            _ACTIVE.remove(watch)
        if in_main_thread:  # None: a handler not set from Python; Python's own is the nearest
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _timed_out(exc: BaseException) -> bool:
    """Is a timeout in `exc`'s chain? (requests and huggingface_hub wrap them in other errors.)"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (TimeoutError, EndpointStalled)) or "Timeout" in type(current).__name__:
            return True
        current = current.__cause__ or current.__context__
    return False


def _stall_in(exc: BaseException, watch: _Watchdog) -> EndpointStalled | None:
    """The stall behind a failure: the EndpointStalled in its chain, or one for a timeout in it
    (huggingface_hub turns some into 'not in the cache' errors); None when it failed otherwise."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, EndpointStalled):
            return current
        current = current.__cause__ or current.__context__
    return watch.stalled() if _timed_out(exc) else None


@functools.lru_cache(maxsize=1)
def _bar_erased_on_failure() -> type:
    from huggingface_hub.utils import tqdm as hub_tqdm

    class Bar(hub_tqdm):
        """huggingface_hub's progress bar, erased when its download fails (no trace of a failed attempt)."""

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                self.leave = False
            return super().__exit__(exc_type, exc, tb)

    return Bar


def from_hub(download: Callable[..., str], endpoint: str, offline: bool, **kwargs) -> str:
    """`download(**kwargs)` (huggingface_hub's `hf_hub_download` or `snapshot_download`) from `endpoint`,
    with every network wait bounded; returns its path.

    Offline (HF_HUB_OFFLINE=1), or when the endpoint does not accept a connection within
    HUB_CONNECT_WAIT_S, only the local cache is used. Otherwise the download runs inside
    `bounded_hub_waits`; when the endpoint stalls, the local cache is tried. Raises HubUnavailable.
    """
    def call(local_only: bool) -> str:
        extra = {}
        if not local_only and "tqdm_class" in inspect.signature(download).parameters:
            extra["tqdm_class"] = _bar_erased_on_failure()
        return download(**kwargs, endpoint=endpoint, local_files_only=local_only, **extra)

    not_cached = "not in the local Hugging Face cache"
    if offline or not reachable(endpoint, HUB_CONNECT_WAIT_S):
        try:
            return call(True)
        except Exception as exc:
            if offline:
                raise HubUnavailable("offline", f"{not_cached}, and HF_HUB_OFFLINE=1 is set (cache only)") from exc
            raise HubUnavailable("unreachable", f"{not_cached}, and {endpoint} (HF_ENDPOINT) cannot be reached") \
                from exc
    watch = _Watchdog(0.0)
    try:
        with bounded_hub_waits() as watch:
            return call(False)
    except Exception as exc:
        stall = _stall_in(exc, watch)
        if stall is None:
            raise HubUnavailable("failed", f"downloading it from {endpoint} (HF_ENDPOINT) failed "
                                           f"({type(exc).__name__}: {_first_line(exc)})") from exc
        failure = exc
    with contextlib.suppress(Exception):
        return call(True)  # the endpoint stalled; a copy in the cache still serves
    raise HubUnavailable("stalled", f"{not_cached}, and {endpoint} (HF_ENDPOINT) {stall.what}") from failure


# --- Data files ----------------------------------------------------------------------------------

class _QuietBar:
    """pooch's progress bar, shown once data flows (in a terminal or a notebook) and erased when the
    download fails."""

    def __init__(self):
        self.answered = False  # the server sent its headers
        self._total = None
        self._bar = None

    @property
    def total(self):
        return self._total

    @total.setter
    def total(self, value) -> None:  # pooch sets it once the headers are in
        self.answered = True
        self._total = value

    def update(self, n: int) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm

            # disable=None: shown in a terminal and a notebook, not in a log or a pipe
            self._bar = tqdm(total=self._total or None, ncols=79, ascii=sys.platform == "win32", unit="B",
                             unit_scale=True, leave=True, disable=None)
        self._bar.update(n)

    def reset(self) -> None:
        if self._bar is not None:
            self._bar.reset()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def discard(self) -> None:
        if self._bar is not None:
            self._bar.leave = False
            self._bar.close()


def _download(spec: DataFile, target: Path) -> None:
    """Download `spec.url` into `target` (verified, atomic). Raises DataUnavailableError/ChecksumError."""
    # imported here: only needed when something is actually downloaded
    import pooch
    import requests

    wait = NETWORK_WAIT_S
    if not reachable(spec.url, wait):
        raise DataUnavailableError(_unavailable_message(spec, target, f"{_origin(spec.url)} cannot be reached"))
    target.parent.mkdir(parents=True, exist_ok=True)
    known_hash = None if spec.archive_member else f"sha256:{spec.sha256}"
    download_name = target.name + (".zip" if spec.archive_member else "")
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel("WARNING")  # its "Downloading data from ..." line: the progress bar says as much
    bar = _QuietBar()
    try:
        # pooch writes to a temporary file and moves it into place only after the hash matched.
        # Connecting, the answer, and every pause in the body: at most NETWORK_WAIT_S each.
        downloader = pooch.HTTPDownloader(progressbar=bar, timeout=(wait, wait))
        fetched = Path(pooch.retrieve(spec.url, known_hash=known_hash, fname=download_name,
                                      path=target.parent, downloader=downloader))
    except BaseException as exc:
        bar.discard()
        if not isinstance(exc, Exception):  # Ctrl-C: no trace of the attempt, the caller says "interrupted"
            raise
        # pooch signals a hash mismatch with a plain ValueError (it has already deleted the
        # bad download). Some requests errors (InvalidURL, MissingSchema) are ValueErrors
        # too, so they are told apart by type, not caught by a bare `except ValueError`.
        if isinstance(exc, ValueError) and not isinstance(exc, requests.RequestException) and "hash" in str(exc):
            raise ChecksumError(
                f"{spec.name}: the file downloaded from {spec.url} failed verification and was deleted "
                f"(expected sha256 {spec.sha256}): {' '.join(str(exc).split())}"
            ) from exc
        if isinstance(exc, requests.ConnectTimeout):
            reason = f"{_origin(spec.url)} did not accept a connection within {wait:.0f} s"
        elif _timed_out(exc):  # a read timeout in the body arrives as a ConnectionError
            reason = str(EndpointStalled(spec.url, wait, bar.answered))
        else:  # no network, DNS failure, HTTP error, bad URL, ...
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
        raise DataUnavailableError(_unavailable_message(spec, target, reason)) from exc
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


def _unavailable_message(spec: DataFile, target: Path, reason: str | None) -> str:
    """One line: where the file was looked for, why the download failed (`reason`; None: not tried), what to do."""
    mirror = mirror_dir()
    where = ("it is in neither the data mirror nor the cache" if mirror is None or mirror.is_dir()
             else f"it is not in the cache, and the data mirror {MIRROR_ENV}={mirror} is not a folder")
    tried = f"downloading {spec.url} failed: {reason}" if reason else f"it was not downloaded from {spec.url}"
    return (f"Could not get {spec.name!r}: {where}, and {tried}. What to do: put a copy at {target}; or set "
            f"{MIRROR_ENV} to a folder that holds {spec.name} (an absolute path); or set {CACHE_ENV} to one that "
            "already holds it; or connect to the network and retry")


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

    mirror = mirror_dir()
    if mirror is not None and (mirror / name).is_file():
        _verify(mirror / name, spec, in_mirror=True)
        return mirror / name

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
    mirror = mirror_dir()
    if mirror is not None and (mirror / name).is_file():
        return "mirror"
    if (cache_dir() / name).is_file():
        return "cache"
    return None


def read_text_file(name: str) -> str:
    """Convenience: the text of a data file (UTF-8)."""
    return get_data_file(name).read_text(encoding="utf-8")
