"""A local HTTP endpoint that stalls, for the tests of bounded network waits (no network needed).

The two ways a real endpoint hangs a client: it accepts the TCP connection and never answers
(`SILENT`), or it sends the status line and headers and then never the body (`stall_body`); and
one that is slow but never stalls (`trickle`), which must not be cut off.
`StallingServer(routes)` listens on a free port of 127.0.0.1; for each request the first route whose
(method, path prefix) matches decides what happens; a request no route matches gets `SILENT`.
Connections stay open (keep-alive) until `close()`, which also ends every stalled one; a stall itself
ends after `give_up_after` seconds (the connection is closed), so that a client without a bound fails
a test instead of hanging it.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

SILENT = None


@dataclass
class Reply:
    """An answer: status, headers, body; `stall` sends only the headers and `partial` bytes of the body;
    `interval` > 0 sends the body in `pieces` parts that far apart (slow, but never stalled)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stall: bool = False
    partial: bytes = b""
    pieces: int = 1
    interval: float = 0.0


def answer(status: int = 200, body: bytes = b"", **headers: str) -> Reply:
    return Reply(status, {k.replace("_", "-"): v for k, v in headers.items()}, body)


def trickle(body: bytes, pieces: int, interval: float, status: int = 200, **headers: str) -> Reply:
    """The whole body, in `pieces` parts `interval` seconds apart."""
    return Reply(status, {k.replace("_", "-"): v for k, v in headers.items()}, body, pieces=pieces, interval=interval)


def stall_body(length: int = 1_000_000, partial: bytes = b"", status: int = 200, **headers: str) -> Reply:
    """Headers announcing `length` bytes, then `partial` of them, then nothing."""
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    hdrs["Content-Length"] = str(length)
    return Reply(status, hdrs, stall=True, partial=partial)


class StallingServer:
    """routes: [(method or "*", path prefix, Reply or SILENT)]. `url` is the base URL; `requests`
    the (method, path) of every request received, in order."""

    def __init__(self, routes: list[tuple[str, str, Reply | None]] = (), give_up_after: float = 20.0):
        self.routes = list(routes)
        self.give_up_after = give_up_after
        self.requests: list[tuple[str, str]] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def __enter__(self) -> StallingServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        for s in [self._sock, *self._conns]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(timeout=5)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _route(self, method: str, path: str) -> Reply | None:
        for m, prefix, reply in self.routes:
            if m in ("*", method) and path.startswith(prefix):
                return reply
        return SILENT

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while not self._closed.is_set():
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                length = next((int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                               if k.strip().lower() == "content-length"), 0)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                self.requests.append((method, path))
                reply = self._route(method, path)
                if reply is None:  # accepted, read, never answered
                    self._closed.wait(self.give_up_after)
                    return
                headers = {"Content-Length": str(len(reply.body)), **reply.headers}
                text = f"HTTP/1.1 {reply.status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                conn.sendall(text.encode("latin-1") + b"\r\n")
                if reply.stall:
                    conn.sendall(reply.partial)
                    self._closed.wait(self.give_up_after)
                    return
                if method != "HEAD" and reply.body:
                    size = -(-len(reply.body) // reply.pieces)
                    for start in range(0, len(reply.body), size):
                        if start and self._closed.wait(reply.interval):
                            return
                        conn.sendall(reply.body[start:start + size])
        except OSError:
            return
        finally:
            conn.close()


# --- a fake Hugging Face endpoint ----------------------------------------------------------------

COMMIT = "a" * 40


def hub_files(repo: str, body: bytes, reply: Reply | None = None) -> list[tuple[str, str, Reply]]:
    """Routes for the files of a Hub repository (each `body` long): the metadata HEAD answered at once, then
    `reply` for the GET (None: the body at once), with the headers huggingface_hub needs."""
    meta = {"X-Repo-Commit": COMMIT, "ETag": '"0123abcd"'}
    head = Reply(200, {**meta, "Content-Length": str(len(body))})
    reply = Reply(200, {}, body) if reply is None else reply
    get = Reply(reply.status, {**meta, **reply.headers}, reply.body, reply.stall, reply.partial, reply.pieces,
                reply.interval)
    return [("HEAD", f"/{repo}/resolve/", head), ("GET", f"/{repo}/resolve/", get)]


def use_hub_endpoint(monkeypatch, url: str, home) -> None:
    """huggingface_hub, online, talks to `url` only (HF_ENDPOINT, and its own constants read at import) and
    keeps its files under `home`; no proxy for 127.0.0.1."""
    import huggingface_hub.constants as constants

    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)  # as if imported with HF_ENDPOINT set: its own requests too
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agent-harnesses.json"), raising=False)
    try:  # huggingface_hub >= 2 asks the endpoint for a registry of AI agents once per process: not here
        from huggingface_hub.utils import _detect_agent
    except ImportError:
        return
    monkeypatch.setattr(_detect_agent, "_registry", {}, raising=False)
