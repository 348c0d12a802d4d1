"""Tests for ch07/ollama_evaluate.py against a real HTTP server on 127.0.0.1 that speaks the parts of
Ollama's API the evaluator uses (/api/version, /api/tags, /api/chat): the requests it sends, score
parsing with a retry, the average, the messages for an unreachable server and a missing model, a
server that stalls or trickles (the deadline), Ctrl-C, and a --scores file that is not a scores file
(refused, left byte for byte as it was)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from ch07 import ollama_evaluate as ev
from ch07.gpt_instruction_finetuning import format_input
from ch07.ollama_evaluate import (
    OllamaUnavailable,
    check_ollama,
    check_server,
    generate_model_scores,
    model_available,
    ollama_host,
    parse_score,
    query_model,
    summarize_scores,
)

ENTRIES = [
    {"instruction": "Name a color.", "input": "", "output": "Blue.", "model_response": "Blue."},
    {"instruction": "Edit the sentence.", "input": "He go home.", "output": "He goes home.",
     "model_response": "He goes home."},
    {"instruction": "Add 2 and 3.", "input": "", "output": "5", "model_response": "6"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!", "model_response": "Hello"},
]


REPO = Path(__file__).resolve().parents[1]
DIE = object()  # a reply that makes FakeOllama drop the connection and stop
# Replies (or a `version`) that make FakeOllama hang: until the test ends, it says nothing at all
# (SILENT), sends the headers of a 1,000-byte reply and then nothing (STALL), or sends those headers
# and then a byte every 50 ms (TRICKLE: each read is quick, the reply never ends).
SILENT, STALL, TRICKLE = object(), object(), object()


class FakeOllama:
    """A threaded HTTP server on a free port; replies to /api/chat come from a queue, in order."""

    def __init__(self, replies=(), models=("llama3:latest",), version=(200, {"version": "0.0.test"})):
        self.replies = list(replies)
        self.version = version
        self.models = list(models)
        self.chat_requests = []
        self.paths = []
        self.stop = threading.Event()  # set when the test ends: hanging replies give up
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _hang(self, how):
                if how is not SILENT:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.flush()
                try:
                    while not fake.stop.wait(0.05):
                        if how is TRICKLE:
                            self.wfile.write(b" ")
                            self.wfile.flush()
                except OSError:  # the client gave up and closed the connection
                    pass
                self.close_connection = True

            def _send(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                fake.paths.append(("GET", self.path))
                if self.path == "/api/version" and fake.version in (SILENT, STALL, TRICKLE):
                    self._hang(fake.version)
                elif self.path == "/api/version":
                    self._send(*fake.version)
                elif self.path == "/api/tags":
                    self._send(200, {"models": [{"name": m, "model": m} for m in fake.models]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                fake.paths.append(("POST", self.path))
                if self.path != "/api/chat":
                    self._send(404, {"error": "not found"})
                    return
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.chat_requests.append(request)
                reply = fake.replies.pop(0) if fake.replies else "no more replies"
                if reply in (SILENT, STALL, TRICKLE):
                    self._hang(reply)
                    return
                if reply is DIE:  # the server goes away mid-run: drop this connection, stop serving
                    self.close_connection = True
                    threading.Thread(target=fake.server.shutdown, daemon=True).start()
                    return
                if isinstance(reply, tuple):  # (HTTP status, JSON payload): an error reply
                    self._send(*reply)
                    return
                self._send(200, {"model": request["model"], "done": True,
                                 "message": {"role": "assistant", "content": reply}})

            def log_message(self, *args):  # keep the test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch):
    """A proxy configured on the machine must not intercept requests to the local test server."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return port


@pytest.fixture
def responses_file(tmp_path):
    path = tmp_path / "instruction-data-with-response.json"
    path.write_text(json.dumps(ENTRIES))
    return path


# --- parsing -----------------------------------------------------------------------------------------

# (reply, score on 0-100 or None for unparsed). A score is read only on a scale that is known.
PARSE_TABLE = [
    # a whole number 0-100 (the scale the prompt asks for), alone or labelled
    ("85", 85),
    ("  100\n", 100),
    ("0", 0),
    ("Score: 0", 0),
    ("Score:85", 85),
    (" score = 77 ", 77),
    ("rated 60", 60),
    ("**Score: 45**", 45),
    ("The score is 60. It has 2 errors.", 60),
    ("On a scale from 0 to 100, I would give this response 70.", 70),
    ("On a scale from 0 to 100, I'd say 70.", 70),
    ("I'd give it 85 points", 85),
    ("Score (0-100): 85", 85),
    ("GPT-4 would give it 85", 85),  # "-4" is part of a name, not a negative number
    ("Score: 85. Final score: 85", 85),  # the same score twice counts once
    ("It scored 80. Llama-3 would give it 80", 80),
    # fractions on their stated scale, rounded half up
    ("I'd give it 85 out of 100", 85),
    ("Score: 92/100", 92),
    ("Score: 92/100\n\nThe response is accurate.", 92),
    ("I would rate this response 75 out of 100 because it covers 3 points.", 75),
    ("Rating: 8/10", 80),
    ("Score: 8.5/10", 85),
    ("Rating: 7.5/10", 75),
    ("I would give it 4.5 out of 5", 90),
    ("4 out of 5", 80),
    ("3/5", 60),
    ("Score: 9.5 out of 10.", 95),
    ("I'd say 99.5/100", 100),
    ("Score: 3/4", 75),
    ("Score: 40/50", 80),
    ("1/2", 50),
    ("0/10", 0),
    ("10/10", 100),
    ("a score of 8 out of 10", 80),
    ("85 out of 100 points", 85),
    ("Score: 85 (out of 100).", 85),
    ("The response scores 2 points out of 3", 67),
    ("9/10 - 2 minor errors", 90),
    ("I'd give this 9/10 because 3 of 4 facts are right", 90),
    # stars with their scale
    ("4/5 stars", 80),
    ("4 out of 5 stars", 80),
    ("3.5 stars out of 5", 70),
    ("Score: 7 out of 10 stars", 70),
    # percentages
    ("85%", 85),
    ("Score: 85%", 85),
    ("75%!", 75),
    ("100%", 100),
    ("Score: 82.5%", 83),
    ("Score: 9/10 (90%)", 90),  # two ways of writing one score
    ("Score: 85% (8.5/10)", 85),
    # a scale the reply states
    ("On a scale of 1 to 10, I'd give it 8", 80),
    ("On a scale of 1-10: 8.5", 85),
    ("On a 10-point scale: 7", 70),
    # unparsed: no number, no known scale, out of range, negative, ambiguous
    ("great answer!", None),
    ("A good answer!", None),
    ("", None),
    ("150", None),
    ("120", None),
    ("Score: 101", None),
    ("-5", None),
    ("\u22125", None),  # a minus sign
    ("Score: \u20135", None),  # an en dash used as one
    ("Score: -10/10", None),
    ("-3 out of 5", None),
    ("-5%", None),
    ("Score: 8/-10", None),
    ("11/10", None),
    ("6/5", None),
    ("120%", None),
    ("8/0", None),
    ("3 stars", None),
    ("I'd give it 4 stars", None),
    ("0.85", None),
    ("87.6", None),
    ("Score: 8.5", None),
    ("Score: 85.0", None),
    ("Score: 1e2", None),
    ("On a scale of 5 to 10: 7", None),  # a scale that does not start at 0 or 1
    ("8/10, or maybe 9/10", None),
    ("The answer gets 85/100, I'd say 9/10", None),
    ("somewhere between 60 and 70", None),
    ("between 60 and 70", None),
    ("60-70", None),
    ("60-70%", None),
    ("7-8/10", None),
    ("8/10-9/10", None),
    ("Score: 85 - 90/100", None),
    ("3/4/2024", None),  # a date
    ("85/100/2", None),
    ("1. Accuracy 2. Clarity", None),
]


def test_parse_table_is_large_and_covers_the_issue():
    texts = [text for text, _ in PARSE_TABLE]
    assert len(texts) >= 60 and len(set(texts)) == len(texts)
    # the misreadings reported in the issue are all in the table
    assert {"Score: -10/10", "-3 out of 5", "3 stars", "0.85", "Score: 8.5",
            "The response scores 2 points out of 3"} <= set(texts)


@pytest.mark.parametrize("text, expected", PARSE_TABLE)
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_ollama_host_forms(monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert ollama_host() == "http://localhost:11434"
    assert ollama_host("127.0.0.1:11434") == "http://127.0.0.1:11434"
    assert ollama_host("localhost") == "http://localhost:11434"
    assert ollama_host("http://example.org:8080/") == "http://example.org:8080"
    assert ollama_host("0.0.0.0") == "http://127.0.0.1:11434"
    monkeypatch.setenv("OLLAMA_HOST", "10.0.0.5:9000")
    assert ollama_host() == "http://10.0.0.5:9000"
    assert ollama_host("127.0.0.1:1") == "http://127.0.0.1:1"  # an explicit host wins over the variable


def test_model_available_matches_latest_tag():
    assert model_available("llama3", ["llama3:latest"])
    assert model_available("llama3:latest", ["llama3:latest"])
    assert model_available("llama3:8b", ["mistral:latest", "llama3:8b"])
    assert not model_available("llama3", ["llama3:8b"])
    assert not model_available("llama3:8b", ["llama3:latest"])
    assert not model_available("llama3", [])


# --- talking to a server ----------------------------------------------------------------------------

def test_query_model_sends_deterministic_chat_request():
    with FakeOllama(["42"]) as server:
        assert query_model("Hello?", model="judge", host=server.host) == "42"
    (request,) = server.chat_requests
    assert request["model"] == "judge"
    assert request["messages"] == [{"role": "user", "content": "Hello?"}]
    assert request["stream"] is False
    assert request["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}


def test_check_ollama_uses_env_host_without_scheme(monkeypatch):
    with FakeOllama() as server:
        monkeypatch.setenv("OLLAMA_HOST", server.host.removeprefix("http://"))
        assert check_ollama("llama3") == "0.0.test"
    assert ("GET", "/api/version") in server.paths and ("GET", "/api/tags") in server.paths


def test_scores_with_retry_and_unparsed_count():
    replies = ["85", "I'd give it 70 out of 100.", "What a lovely answer!", "Score: 92/100",
               "Hard to say.", "Still cannot decide."]
    with FakeOllama(replies) as server:
        scores = generate_model_scores(ENTRIES, model="llama3", host=server.host, progress=False)
    assert scores == [85, 70, 92, None]
    prompts = [r["messages"][0]["content"] for r in server.chat_requests]
    assert len(prompts) == 6  # one retry each for the two chatty replies
    assert all(r["model"] == "llama3" and r["stream"] is False for r in server.chat_requests)
    # The first prompt carries the record; the retry repeats it and insists on a bare integer.
    assert format_input(ENTRIES[0]) in prompts[0] and "`Blue.`" in prompts[0]
    assert "Respond with the integer only" not in prompts[2]
    assert prompts[3].startswith(prompts[2]) and "Respond with the integer only" in prompts[3]
    assert "Respond with the integer only" in prompts[5]
    summary = summarize_scores(scores)
    assert summary == {"average": pytest.approx((85 + 70 + 92) / 3), "num_scored": 3, "num_unparsed": 1,
                       "num_entries": 4}


def test_summarize_scores_with_nothing_parsed():
    assert summarize_scores([None, None]) == {"average": None, "num_scored": 0, "num_unparsed": 2,
                                              "num_entries": 2}


def test_cli_prints_average_and_unparsed(responses_file, capsys):
    with FakeOllama(["90", "80", "junk", "also junk", "Score: 70"]) as server:
        rc = ev.main(["--file", str(responses_file), "--host", server.host, "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Number of scores: 3 of 4" in out
    assert "Average score: 80.00" in out
    assert "Replies that could not be parsed: 1" in out


def test_max_new_tokens_caps_the_judge_as_num_predict(responses_file):
    with FakeOllama(["90", "80", "70", "60"]) as server:
        assert ev.main(["--file", str(responses_file), "--host", server.host, "--no-progress"]) == 0
        assert "num_predict" not in server.chat_requests[0]["options"]  # by default the server decides
        server.replies[:] = ["90", "80", "70", "60"]
        assert ev.main(["--file", str(responses_file), "--host", server.host, "--no-progress", "--scores",
                        str(responses_file.with_suffix(".capped.jsonl")), "--max-new-tokens", "4"]) == 0
    assert [r["options"].get("num_predict") for r in server.chat_requests] == [None] * 4 + [4] * 4


def test_unreachable_server_message(closed_port, responses_file, capsys):
    host = f"127.0.0.1:{closed_port}"
    with pytest.raises(OllamaUnavailable, match=f"No Ollama server answers at http://127.0.0.1:{closed_port}"):
        check_server(host, timeout=2)
    assert ev.main(["--file", str(responses_file), "--host", host]) == 1
    err = capsys.readouterr().err
    assert "ollama serve" in err and "ollama pull llama3" in err and "OLLAMA_HOST" in err


def test_missing_model_message(responses_file, capsys):
    with FakeOllama(["99", "98", "97", "96"], models=["mistral:latest"]) as server:
        with pytest.raises(OllamaUnavailable, match=r"does not have the model 'llama3'.*mistral:latest"):
            check_ollama("llama3", server.host)
        assert ev.main(["--file", str(responses_file), "--host", server.host]) == 1
        assert ev.main(["--file", str(responses_file), "--host", server.host, "--model", "mistral",
                        "--no-progress"]) == 0
    assert "ollama pull llama3" in capsys.readouterr().err
    assert [r["model"] for r in server.chat_requests] == ["mistral"] * 4


def test_server_errors_during_scoring_are_reported(responses_file, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise requests.ConnectionError("connection reset")

    with FakeOllama() as server:
        monkeypatch.setattr(ev, "query_model", broken)
        assert ev.main(["--file", str(responses_file), "--host", server.host, "--no-progress"]) == 1
    assert "stopped answering" in capsys.readouterr().err


# --- the responses file --------------------------------------------------------------------------------

def test_responses_file_validation_names_index_and_key(tmp_path, capsys):
    bad = [ENTRIES[0], {k: v for k, v in ENTRIES[1].items() if k != "model_response"}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"record 1 is missing the key 'model_response'"):
        ev.load_responses(path)
    assert ev.main(["--file", str(path)]) == 2
    assert "record 1" in capsys.readouterr().err


def test_missing_and_malformed_files(tmp_path, capsys):
    assert ev.main(["--file", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = tmp_path / "broken.json"
    path.write_text("[{")
    assert ev.main(["--file", str(path)]) == 2
    assert "broken.json is not valid JSON" in capsys.readouterr().err


def test_other_response_key(tmp_path):
    data = [{"instruction": "x", "output": "y", "answer": "z"}]
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    assert ev.load_responses(path, json_key="answer") == data
    assert "`z`" in ev.make_score_prompt(data[0], "answer")


def test_error_reply_from_chat_is_reported(responses_file, capsys):
    with FakeOllama(["80", (404, {"error": "model 'llama3' not found"})]) as server:
        assert query_model("x", host=server.host) == "80"
        with pytest.raises(OllamaUnavailable, match=r"HTTP 404 .*model 'llama3' not found"):
            query_model("y", host=server.host)
    with FakeOllama([(500, {"unexpected": True})]) as server:
        assert ev.main(["--file", str(responses_file), "--host", server.host, "--no-progress"]) == 1
    assert "HTTP 500" in capsys.readouterr().err


# --- the book's names ------------------------------------------------------------------------------

def test_query_model_takes_the_books_url_argument(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:1")  # never used: url names the endpoint
    with FakeOllama(["17", "18", "19"]) as server:
        assert query_model("Hello?", "judge", f"{server.host}/api/chat") == "17"
        assert query_model("Hello?", model="judge", url=server.host) == "18"  # a bare server address
        with pytest.raises(OllamaUnavailable, match="HTTP 404"):
            query_model("Hello?", url=f"{server.host}/api/generate")
    assert [p for p in server.paths] == [("POST", "/api/chat")] * 2 + [("POST", "/api/generate")]
    assert server.chat_requests[0]["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    with pytest.raises(ValueError, match="not both"):
        query_model("x", url="http://127.0.0.1:1/api/chat", host="127.0.0.1:1")


def test_check_if_running_finds_this_process():
    psutil = pytest.importorskip("psutil")
    own_name = psutil.Process().name()
    assert ev.check_if_running(own_name) is True
    assert ev.check_if_running("no-such-process-\u2603-name") is False


def test_check_if_running_without_psutil_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # makes `import psutil` fail
    with pytest.raises(ImportError, match="pip install psutil"):
        ev.check_if_running("ollama")


# --- scores kept as they arrive; odd server replies -----------------------------------------------------

def test_scores_are_appended_and_a_rerun_continues_after_the_server_died(responses_file, capsys):
    scores_path = ev.default_scores_path(responses_file, "llama3")
    with FakeOllama(["90", "Score: 8/10", DIE]) as server:
        rc = ev.main(["--file", str(responses_file), "--host", server.host, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "stopped answering" in err and "2 of 4 scores are kept" in err and "rerun" in err
    rows = [json.loads(line) for line in scores_path.read_text().splitlines()]
    assert [(r["index"], r["score"]) for r in rows] == [(0, 90), (1, 80)]
    # A crash mid-line leaves a partial last line: it is dropped, not read as a score.
    with open(scores_path, "a") as f:
        f.write('{"index": 2, "rec')
    with FakeOllama(["4.5 out of 5", "70"]) as server:
        rc = ev.main(["--file", str(responses_file), "--host", server.host, "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert len(server.chat_requests) == 2  # only the two records not yet scored were asked
    assert format_input(ENTRIES[2]) in server.chat_requests[0]["messages"][0]["content"]
    assert "Number of scores: 4 of 4" in out and f"Average score: {(90 + 80 + 90 + 70) / 4:.2f}" in out
    rows = [json.loads(line) for line in scores_path.read_text().splitlines()]
    assert [(r["index"], r["score"]) for r in rows] == [(0, 90), (1, 80), (2, 90), (3, 70)]


def test_scores_file_of_other_responses_is_refused(responses_file, tmp_path, capsys):
    scores_path = tmp_path / "scores.jsonl"
    scores_path.write_text(json.dumps({"index": 0, "record": "0" * 16, "model": "llama3", "score": 50}) + "\n")
    with FakeOllama(["90"] * 4) as server:
        rc = ev.main(["--file", str(responses_file), "--host", server.host, "--scores", str(scores_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "other responses or another judge" in err
    assert server.chat_requests == []


@pytest.mark.parametrize("version, expected", [
    ((200, ["0.1.0"]), r"answered HTTP 200: \[\"0.1.0\"\], not Ollama's JSON object"),
    ((500, {"error": "boom"}), r"answered HTTP 500: \{\"error\": \"boom\"\}"),
    ((200, "just text"), r"answered HTTP 200: \"just text\""),
])
def test_odd_version_replies_say_what_the_server_answered(version, expected, responses_file, capsys):
    with FakeOllama(version=version) as server:
        with pytest.raises(OllamaUnavailable, match=expected):
            check_server(server.host)
        rc = ev.main(["--file", str(responses_file), "--host", server.host])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error:")
    assert "Traceback" not in err and server.chat_requests == []


# --- a --scores file that is not ours is never changed ----------------------------------------------------

def score_line(i, score, model="llama3"):
    """The line `generate_model_scores` writes for record i of ENTRIES."""
    return json.dumps({"index": i, "record": ev.record_id(ENTRIES[i], "model_response"), "model": model,
                       "score": score}) + "\n"


NOT_SCORES = {  # name: (content, the reason the one error line gives)
    "binary, one line": (bytes(b for b in range(256) if b != 10) * 4, "line 1: neither a whole record nor the start of one"),
    "binary, lines": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\n", "line 1: not UTF-8 text"),
    "csv": (b"index,score\n0,90\n1,80\n", "line 1: not JSON"),
    "json array": (json.dumps(ENTRIES, indent=2).encode(), "line 1: not JSON"),
    "json array, one line": (json.dumps(ENTRIES).encode() + b"\n", "line 1: a JSON array, not an object"),
    "other records": (b'{"index": 0, "instruction": "x", "chosen": "a", "rejected": "b", "politeness": "polite"}\n',
                      "line 1: a JSON object without 'record', 'model', 'score'"),
    "one object, no newline": (b'{"name": "Bob", "age": 42}', "line 1: a JSON object without 'index', 'record', "
                               "'model', 'score'"),
    "someone's torn line": (b'{"name": "Bo', "line 1: neither a whole record nor the start of one"),
    "notes": (b"my notes, no newline", "line 1: neither a whole record nor the start of one"),
    "damage before the end": (score_line(0, 90).encode() + b"not json\n" + score_line(1, 80).encode(),
                              "line 2: not JSON"),
    "a score out of range": (score_line(0, 90).replace("90", "900").encode(),
                             "line 1: 'score' is 900, not a whole number from 0 to 100 or null"),
}


@pytest.mark.parametrize("kind", NOT_SCORES)
def test_scores_file_of_another_kind_is_refused_and_left_as_it_was(kind, responses_file, tmp_path, capsys):
    content, why = NOT_SCORES[kind]
    scores = tmp_path / "scores.jsonl"
    scores.write_bytes(content)
    with FakeOllama(["90"] * 8) as server:
        rc = ev.main(["--file", str(responses_file), "--host", server.host, "--scores", str(scores),
                      "--no-progress"])
    assert rc == 2
    assert capsys.readouterr().err == (f"error: --scores {scores} is not a scores file of this command ({why}); "
                                       "it was left as it is: choose another --scores file\n")
    assert scores.read_bytes() == content
    assert server.paths == []  # refused before the server is asked anything


def test_the_reported_truncation(responses_file, tmp_path, capsys, closed_port):
    """The issue: a binary file given as --scores was cut to 0 bytes, and then the server was not there."""
    scores = tmp_path / "photo.jpg"
    content = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 16  # no newline anywhere
    scores.write_bytes(content)
    assert ev.main(["--file", str(responses_file), "--host", f"127.0.0.1:{closed_port}", "--scores",
                    str(scores)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --scores {scores} is not a scores file of this command")
    assert scores.read_bytes() == content


def test_scores_file_is_repaired_only_after_the_server_was_checked(responses_file, tmp_path, capsys, closed_port):
    """A scores file of ours with a torn last line: left as it is while the server is missing; cut when the run
    goes ahead."""
    scores = tmp_path / "scores.jsonl"
    content = (score_line(0, 90) + score_line(1, None) + score_line(2, 70)[:25]).encode()
    scores.write_bytes(content)
    argv = ["--file", str(responses_file), "--scores", str(scores), "--no-progress"]
    assert ev.main([*argv, "--host", f"127.0.0.1:{closed_port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: No Ollama server answers at http://127.0.0.1:{closed_port}/api/version")
    assert len(err.splitlines()) == 1 and scores.read_bytes() == content
    with FakeOllama(["70", "60"]) as server:
        assert ev.main([*argv, "--host", server.host]) == 0
    assert len(server.chat_requests) == 2
    assert scores.read_text() == score_line(0, 90) + score_line(1, None) + score_line(2, 70) + score_line(3, 60)


def test_a_lone_torn_scores_line_is_ours_and_a_whole_last_line_is_finished(responses_file, tmp_path):
    scores = tmp_path / "scores.jsonl"
    scores.write_text(score_line(0, 90)[:20])  # killed during the first write
    with FakeOllama(["90", "80", "70", "60"]) as server:
        assert ev.main(["--file", str(responses_file), "--host", server.host, "--scores", str(scores),
                        "--no-progress"]) == 0
    assert scores.read_text() == "".join(score_line(i, s) for i, s in enumerate([90, 80, 70, 60]))
    scores.write_text(score_line(0, 90) + score_line(1, 80).rstrip("\n"))  # whole record, newline missing
    with FakeOllama(["70", "60"]) as server:
        assert ev.main(["--file", str(responses_file), "--host", server.host, "--scores", str(scores),
                        "--no-progress"]) == 0
    assert len(server.chat_requests) == 2
    assert scores.read_text() == "".join(score_line(i, s) for i, s in enumerate([90, 80, 70, 60]))


def test_scores_that_are_the_responses_file_or_a_folder_are_refused(responses_file, tmp_path, capsys):
    content = responses_file.read_bytes()
    link = tmp_path / "link.json"
    link.symlink_to(responses_file)
    with FakeOllama(["90"] * 8) as server:
        for scores in (responses_file, link):
            assert ev.main(["--file", str(responses_file), "--host", server.host, "--scores", str(scores)]) == 2
            default = ev.default_scores_path(responses_file, "llama3")
            assert capsys.readouterr().err == (f"error: --scores {scores} is the responses file (--file); the "
                                               f"scores go to a file of their own, e.g. {default}\n")
        assert ev.main(["--file", str(responses_file), "--host", server.host, "--scores", str(tmp_path)]) == 2
        assert capsys.readouterr().err == (f"error: --scores {tmp_path} is a folder; give the .jsonl file to "
                                           "append the scores to\n")
    assert responses_file.read_bytes() == content and server.paths == []


def test_a_preference_pairs_file_is_not_a_scores_file(responses_file, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    content = json.dumps({**ENTRIES[0], "chosen": "a", "rejected": "b", "politeness": "both", "index": 0}) + "\n"
    pairs.write_text(content)
    with FakeOllama(["90"] * 8) as server:
        assert ev.main(["--file", str(responses_file), "--host", server.host, "--scores", str(pairs)]) == 2
    assert "is not a scores file of this command (line 1: a JSON object without 'record', 'model', 'score')" in \
        capsys.readouterr().err
    assert pairs.read_text() == content and server.paths == []


# --- deadlines: a server that never finishes its reply ----------------------------------------------------

@pytest.mark.parametrize("hang", [SILENT, STALL, TRICKLE], ids=["silent", "headers-then-stall", "trickle"])
def test_a_judge_reply_that_never_ends_stops_at_the_timeout(hang, responses_file, tmp_path, capsys):
    scores = tmp_path / "scores.jsonl"
    with FakeOllama(["90", hang]) as server:
        start = time.monotonic()
        rc = ev.main(["--file", str(responses_file), "--host", server.host, "--scores", str(scores),
                      "--timeout", "1", "--no-progress"])
        seconds = time.monotonic() - start
    assert rc == 1 and seconds < 5, seconds
    assert capsys.readouterr().err == (f"error: The Ollama server at {server.host} stopped answering (no complete "
                                       f"reply within 1 s); 1 of 4 scores are kept in {scores}: rerun the same "
                                       "command to continue\n")
    assert scores.read_text() == score_line(0, 90)


@pytest.mark.parametrize("hang", [SILENT, STALL, TRICKLE], ids=["silent", "headers-then-stall", "trickle"])
def test_a_server_check_that_never_ends_stops_at_the_deadline(hang, responses_file, capsys):
    with FakeOllama(version=hang) as server:
        start = time.monotonic()
        with pytest.raises(OllamaUnavailable, match=r"/api/version \(no complete reply within 0\.5 s\)"):
            check_server(server.host, timeout=0.5)
        assert time.monotonic() - start < 2.5
        start = time.monotonic()
        rc = ev.main(["--file", str(responses_file), "--host", server.host, "--timeout", "1"])
        seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 1 and seconds < 5, seconds
    assert err.startswith(f"error: No Ollama server answers at {server.host}/api/version (no complete reply "
                          "within 1 s)") and len(err.splitlines()) == 1
    assert server.chat_requests == []


def test_query_model_deadline_is_for_the_whole_reply():
    with FakeOllama([TRICKLE]) as server:
        start = time.monotonic()
        with pytest.raises(ev.NoReplyInTime, match=rf"no complete reply from {server.host}/api/chat within 0\.5 s"):
            query_model("x", host=server.host, timeout=0.5)
        assert time.monotonic() - start < 2.5


# --- Ctrl-C ---------------------------------------------------------------------------------------------------

def test_ctrl_c_says_what_is_kept_in_one_line(responses_file, tmp_path, capsys, monkeypatch):
    scores = tmp_path / "scores.jsonl"
    real_query = ev.query_model

    def query(*args, **kwargs):
        if len(server.chat_requests) == 2:
            raise KeyboardInterrupt
        return real_query(*args, **kwargs)

    monkeypatch.setattr(ev, "query_model", query)
    with FakeOllama(["90", "80"]) as server:
        rc = ev.main(["--file", str(responses_file), "--host", server.host, "--scores", str(scores),
                      "--no-progress"])
    assert rc == 130
    assert capsys.readouterr().err == (f"\ninterrupted: 2 of 4 scores are saved in {scores}; run the same command "
                                       "again to continue\n")
    assert scores.read_text() == score_line(0, 90) + score_line(1, 80)


def stderr_lines(err):
    """The lines of a command's stderr, without llmfs.cli.run's note on settings from the environment."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("settings from the environment")]


def interrupt_real_run(module: str, args: list[str], fake: FakeOllama, after_requests: int) -> tuple[int, str]:
    """Run `python -m module args` against `fake`; once it has sent `after_requests` chat requests, press
    Ctrl-C (SIGINT). Returns the exit code and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args, "--host", fake.host, "--no-progress"], cwd=REPO,
                            env={**os.environ, "NO_PROXY": "127.0.0.1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(fake.chat_requests) < after_requests and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


def test_ctrl_c_in_a_real_run(responses_file, tmp_path):
    """`python -m ch07.ollama_evaluate`, interrupted by SIGINT while the judge works on record 3."""
    scores = tmp_path / "scores.jsonl"
    with FakeOllama(["90", "Score: 8/10", SILENT]) as server:
        returncode, err = interrupt_real_run("ch07.ollama_evaluate", ["--file", str(responses_file), "--scores",
                                                                      str(scores)], server, 3)
    assert returncode == 130, err
    assert stderr_lines(err) == [f"interrupted: 2 of 4 scores are saved in {scores}; run the same command again "
                                 "to continue"]
    assert scores.read_text() == score_line(0, 90) + score_line(1, 80)
