"""llmfs/download.py: mirror -> cache -> download, always sha256-verified, never online.

Downloads are tested against a throw-away HTTP server on 127.0.0.1; the data file specs
are swapped for ones whose URL and checksum match what that server holds. The bounded waits
are tested against `stalling_server` (a server that never answers, or stalls its body) with
NETWORK_WAIT_S lowered to a second.
"""

import dataclasses
import hashlib
import http.server
import io
import os
import re
import signal
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from llmfs import download
from llmfs.cli import run
from llmfs.download import (
    DATA_FILES,
    ChecksumError,
    DataUnavailableError,
    cache_dir,
    data_file_status,
    get_data_file,
    read_text_file,
    sha256sum,
)
from stalling_server import SILENT, StallingServer, stall_body, trickle

CONTENT = "I had always thought Jack Gisburn rather a cheap genius--\n".encode() * 20
CONTENT_SHA = hashlib.sha256(CONTENT).hexdigest()
BAD = b"not the right file\n"
BAD_SHA = hashlib.sha256(BAD).hexdigest()


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Fresh, empty mirror and cache folders; no proxy for the local server."""
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    monkeypatch.setenv("LLMFS_DATA_MIRROR", str(mirror))
    monkeypatch.setenv("LLMFS_CACHE_DIR", str(cache))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return mirror, cache


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/'www' on a random port of 127.0.0.1; yields (folder, base_url, request log)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **kw: _Handler(*a, directory=str(root), **kw)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}", httpd.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def use_spec(monkeypatch, name="the-verdict.txt", **changes):
    """Replace DATA_FILES[name] by a copy with `changes` (url, sha256, ...)."""
    spec = dataclasses.replace(DATA_FILES[name], **changes)
    monkeypatch.setitem(DATA_FILES, name, spec)
    return spec


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- mirror and cache --------------------------------------------------------------------------

def test_mirror_hit(dirs, monkeypatch):
    mirror, cache = dirs
    use_spec(monkeypatch, sha256=CONTENT_SHA, url="http://127.0.0.1:1/never-used")
    (mirror / "the-verdict.txt").write_bytes(CONTENT)
    assert data_file_status("the-verdict.txt") == "mirror"
    assert get_data_file("the-verdict.txt") == mirror / "the-verdict.txt"
    assert leftovers(cache) == []  # nothing copied or downloaded


def test_cache_hit_when_mirror_lacks_the_file(dirs, monkeypatch):
    mirror, cache = dirs
    use_spec(monkeypatch, sha256=CONTENT_SHA, url="http://127.0.0.1:1/never-used")
    cache.mkdir()
    (cache / "the-verdict.txt").write_bytes(CONTENT)
    assert data_file_status("the-verdict.txt") == "cache"
    assert get_data_file("the-verdict.txt") == cache / "the-verdict.txt"
    assert read_text_file("the-verdict.txt") == CONTENT.decode()


def test_cache_hit_without_mirror(dirs, monkeypatch):
    _, cache = dirs
    monkeypatch.delenv("LLMFS_DATA_MIRROR")
    use_spec(monkeypatch, sha256=CONTENT_SHA)
    cache.mkdir()
    (cache / "the-verdict.txt").write_bytes(CONTENT)
    assert get_data_file("the-verdict.txt", download=False) == cache / "the-verdict.txt"


def test_mirror_wins_over_cache(dirs, monkeypatch):
    mirror, cache = dirs
    use_spec(monkeypatch, sha256=CONTENT_SHA)
    cache.mkdir()
    for folder in (mirror, cache):
        (folder / "the-verdict.txt").write_bytes(CONTENT)
    assert get_data_file("the-verdict.txt") == mirror / "the-verdict.txt"


@pytest.mark.parametrize("where", ["mirror", "cache"])
def test_bad_local_copy_is_a_checksum_error(dirs, monkeypatch, where):
    mirror, cache = dirs
    use_spec(monkeypatch, sha256=CONTENT_SHA, url="http://127.0.0.1:1/never-used")
    folder = mirror if where == "mirror" else cache
    folder.mkdir(exist_ok=True)
    (folder / "the-verdict.txt").write_bytes(BAD)
    with pytest.raises(ChecksumError) as info:
        get_data_file("the-verdict.txt")
    message = str(info.value)
    assert str(folder / "the-verdict.txt") in message
    assert CONTENT_SHA in message and BAD_SHA in message


def test_not_available_without_download(dirs, monkeypatch):
    _, cache = dirs
    spec = use_spec(monkeypatch, sha256=CONTENT_SHA, url="http://127.0.0.1:1/never-used")
    assert data_file_status("the-verdict.txt") is None
    with pytest.raises(DataUnavailableError) as info:
        get_data_file("the-verdict.txt", download=False)
    message = str(info.value)
    assert spec.url in message and str(cache / "the-verdict.txt") in message and "LLMFS_DATA_MIRROR" in message


def test_unknown_name_lists_known_files():
    with pytest.raises(KeyError, match="the-verdict.txt"):
        get_data_file("no-such-file.txt")


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMFS_CACHE_DIR", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "llms-from-scratch"
    monkeypatch.setenv("LLMFS_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_sha256sum(tmp_path):
    (tmp_path / "f").write_bytes(CONTENT)
    assert sha256sum(tmp_path / "f") == CONTENT_SHA


def test_data_file_table_is_well_formed():
    # The chapters' own files; a bonus module may add its own (ch06.imdb adds the IMDb archive).
    assert set(DATA_FILES) >= {"the-verdict.txt", "SMSSpamCollection", "instruction-data.json",
                               "instruction-data-with-preference.json", "tinyshakespeare.txt"}
    for name, spec in DATA_FILES.items():
        assert spec.name == name
        assert spec.url.startswith("https://")
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
    assert DATA_FILES["SMSSpamCollection"].archive_member == "SMSSpamCollection"


def test_real_data_files_verify_where_available():
    """The recorded checksums match the copies in the mirror/cache this run uses."""
    found = [name for name in DATA_FILES if data_file_status(name)]
    if not found:
        pytest.skip("no data file in LLMFS_DATA_MIRROR or the cache")
    for name in found:
        assert sha256sum(get_data_file(name, download=False)) == DATA_FILES[name].sha256


# --- downloads (from a local server) -----------------------------------------------------------

def test_download_from_local_server(dirs, server, monkeypatch):
    _, cache = dirs
    www, base, requests_seen = server
    (www / "verdict.txt").write_bytes(CONTENT)
    use_spec(monkeypatch, url=f"{base}/verdict.txt", sha256=CONTENT_SHA)

    path = get_data_file("the-verdict.txt")
    assert path == cache / "the-verdict.txt"
    assert path.read_bytes() == CONTENT
    assert leftovers(cache) == ["the-verdict.txt"]  # no temporary files left behind
    assert data_file_status("the-verdict.txt") == "cache"

    # The second call is served from the cache: no new request.
    assert get_data_file("the-verdict.txt") == path
    assert requests_seen == ["/verdict.txt"]


def test_download_from_a_url_given_by_the_caller(dirs, server, monkeypatch):
    """`url=` fetches the same file from elsewhere (the book's backup URL); the recorded sha256 still applies."""
    _, cache = dirs
    www, base, requests_seen = server
    (www / "copy.txt").write_bytes(CONTENT)
    (www / "other.txt").write_bytes(BAD)
    use_spec(monkeypatch, url="http://127.0.0.1:1/never-used", sha256=CONTENT_SHA)

    with pytest.raises(ChecksumError):
        get_data_file("the-verdict.txt", url=f"{base}/other.txt")
    assert get_data_file("the-verdict.txt", url=f"{base}/copy.txt").read_bytes() == CONTENT
    assert requests_seen == ["/other.txt", "/copy.txt"]
    assert DATA_FILES["the-verdict.txt"].url == "http://127.0.0.1:1/never-used"  # the table is unchanged


def test_data_file_for_url():
    for name, spec in DATA_FILES.items():
        assert download.data_file_for_url(spec.url) == name
    assert download.data_file_for_url("https://example.com/unknown.json") is None


def test_download_with_wrong_content_leaves_nothing(dirs, server, monkeypatch):
    _, cache = dirs
    www, base, _ = server
    (www / "verdict.txt").write_bytes(BAD)
    use_spec(monkeypatch, url=f"{base}/verdict.txt", sha256=CONTENT_SHA)
    with pytest.raises(ChecksumError) as info:
        get_data_file("the-verdict.txt")
    message = str(info.value)
    assert "the-verdict.txt" in message and CONTENT_SHA in message and BAD_SHA in message
    assert leftovers(cache) == []


def test_http_error_is_data_unavailable(dirs, server, monkeypatch):
    _, cache = dirs
    _, base, _ = server
    spec = use_spec(monkeypatch, url=f"{base}/missing.txt", sha256=CONTENT_SHA)
    with pytest.raises(DataUnavailableError, match=re.escape(spec.url)):
        get_data_file("the-verdict.txt")
    assert leftovers(cache) == []


def test_offline_error_says_what_to_do(dirs, monkeypatch):
    _, cache = dirs
    spec = use_spec(monkeypatch, url="http://127.0.0.1:1/x", sha256=CONTENT_SHA)
    with pytest.raises(DataUnavailableError) as info:
        get_data_file("the-verdict.txt")
    message = str(info.value)
    assert spec.url in message
    assert str(cache / "the-verdict.txt") in message
    assert "LLMFS_DATA_MIRROR" in message
    assert not (cache / "the-verdict.txt").exists()


def test_malformed_url_is_not_a_checksum_error(dirs, monkeypatch):
    # requests' InvalidURL is a ValueError, like pooch's hash mismatch; it must not read as one.
    use_spec(monkeypatch, url="http://", sha256=CONTENT_SHA)
    with pytest.raises(DataUnavailableError):
        get_data_file("the-verdict.txt")


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(f"{name}", data)
    return buf.getvalue()


SMS = b"ham\tGo until jurong point, crazy..\nspam\tFree entry in 2 a wkly comp to win\n"
SMS_SHA = hashlib.sha256(SMS).hexdigest()


def test_zip_archive_member_is_extracted(dirs, server, monkeypatch):
    _, cache = dirs
    www, base, _ = server
    (www / "sms.zip").write_bytes(_zip_bytes({"readme": b"about the data", "SMSSpamCollection": SMS}))
    use_spec(monkeypatch, "SMSSpamCollection", url=f"{base}/sms.zip", sha256=SMS_SHA)

    path = get_data_file("SMSSpamCollection")
    assert path == cache / "SMSSpamCollection"
    assert path.read_bytes() == SMS
    assert leftovers(cache) == ["SMSSpamCollection"]  # the zip itself is removed


def test_zip_member_with_wrong_content_leaves_nothing(dirs, server, monkeypatch):
    _, cache = dirs
    www, base, _ = server
    (www / "sms.zip").write_bytes(_zip_bytes({"SMSSpamCollection": BAD}))
    use_spec(monkeypatch, "SMSSpamCollection", url=f"{base}/sms.zip", sha256=SMS_SHA)
    with pytest.raises(ChecksumError) as info:
        get_data_file("SMSSpamCollection")
    assert SMS_SHA in str(info.value) and BAD_SHA in str(info.value)
    assert leftovers(cache) == []


@pytest.mark.parametrize("payload", [_zip_bytes({"other": SMS}), b"this is not a zip archive"])
def test_zip_without_the_member_is_data_unavailable(dirs, server, monkeypatch, payload):
    _, cache = dirs
    www, base, _ = server
    (www / "sms.zip").write_bytes(payload)
    use_spec(monkeypatch, "SMSSpamCollection", url=f"{base}/sms.zip", sha256=SMS_SHA)
    with pytest.raises(DataUnavailableError, match="SMSSpamCollection"):
        get_data_file("SMSSpamCollection")
    assert leftovers(cache) == []


def test_module_imports_pooch_lazily():
    # Importing llmfs.download must stay cheap and never touch the network.
    assert "pooch" not in vars(download)


# --- a corrupt mirror file, bounded waits, Ctrl-C: one line each -------------------------------------

def test_a_corrupt_file_in_the_mirror_is_one_line_that_says_what_to_do(dirs, monkeypatch, capsys):
    mirror, _ = dirs
    use_spec(monkeypatch, sha256=CONTENT_SHA, url="http://127.0.0.1:1/never-used")
    (mirror / "the-verdict.txt").write_bytes(BAD)
    assert run(lambda: get_data_file("the-verdict.txt")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the-verdict.txt: ") and "Traceback" not in err
    assert str(mirror / "the-verdict.txt") in err and BAD_SHA in err and CONTENT_SHA in err
    assert "replace it in the mirror with a good copy, or unset LLMFS_DATA_MIRROR" in err


@pytest.mark.parametrize("reply, says", [(SILENT, "did not answer within 1 s"),
                                         (stall_body(100_000, b"x" * 5000), "stopped sending data for 1 s")],
                         ids=["never-answers", "stalls-the-body"])
def test_a_stalled_server_is_given_up_on_after_the_wait_in_one_line(dirs, monkeypatch, capsys, reply, says):
    _, cache = dirs
    monkeypatch.setattr(download, "NETWORK_WAIT_S", 1.0)
    with StallingServer([("GET", "/", reply)]) as server:
        use_spec(monkeypatch, url=f"{server.url}/verdict.txt", sha256=CONTENT_SHA)
        start = time.monotonic()
        assert run(lambda: get_data_file("the-verdict.txt")) == 2
        elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert 1 <= elapsed < 6
    assert err.count("\n") == 1 and err.startswith("error: Could not get 'the-verdict.txt'")
    assert f"{server.url} {says}" in err and "LLMFS_DATA_MIRROR" in err
    assert leftovers(cache) == []


def test_a_slow_download_that_keeps_sending_is_not_cut_off(dirs, monkeypatch):
    """The wait bounds a pause, not the download: 2 s of data, never 1 s without any."""
    monkeypatch.setattr(download, "NETWORK_WAIT_S", 1.0)
    with StallingServer([("GET", "/", trickle(CONTENT, pieces=6, interval=0.4))]) as server:
        use_spec(monkeypatch, url=f"{server.url}/verdict.txt", sha256=CONTENT_SHA)
        start = time.monotonic()
        assert get_data_file("the-verdict.txt").read_bytes() == CONTENT
    assert time.monotonic() - start > 1.5


def test_an_unreachable_host_fails_at_once(dirs, monkeypatch):
    use_spec(monkeypatch, url="http://127.0.0.1:9/verdict.txt", sha256=CONTENT_SHA)  # nothing listens there
    start = time.monotonic()
    with pytest.raises(DataUnavailableError, match=r"http://127.0.0.1:9 cannot be reached"):
        get_data_file("the-verdict.txt")
    assert time.monotonic() - start < 3


def _interrupt_after(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


@pytest.mark.skipif(sys.platform == "win32", reason="Windows delivers Ctrl-C only once a blocking "
                    "socket call returns, and os.kill(SIGINT) would end the test process")
def test_ctrl_c_while_a_server_keeps_us_waiting_is_one_line(dirs, monkeypatch, capsys):
    _, cache = dirs
    with StallingServer() as server:
        use_spec(monkeypatch, url=f"{server.url}/verdict.txt", sha256=CONTENT_SHA)
        start = time.monotonic()
        _interrupt_after(0.5)
        assert run(lambda: get_data_file("the-verdict.txt")) == 130
    assert time.monotonic() - start < 5
    assert capsys.readouterr().err == "\ninterrupted\n"
    assert leftovers(cache) == []


def test_relative_mirror_and_cache_paths_are_refused(monkeypatch, tmp_path):
    from llmfs.errors import InvalidInput

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMFS_CACHE_DIR", "cache")
    with pytest.raises(InvalidInput, match=re.escape(f"LLMFS_CACHE_DIR={tmp_path / 'cache'}")):
        cache_dir()
    monkeypatch.setenv("LLMFS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMFS_DATA_MIRROR", "data")
    with pytest.raises(InvalidInput, match="LLMFS_DATA_MIRROR=data is a relative path"):
        get_data_file("the-verdict.txt", download=False)
