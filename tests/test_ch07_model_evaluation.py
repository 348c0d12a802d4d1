"""The judge of ch07/ollama_evaluate.py through either API (`--api ollama|openai`), and the bonus notebook
ch07/model_evaluation/llm-instruction-eval.ipynb.

Our own server (`llmfs.serve` with a tiny chapter-7 model, as in tests/test_llmfs_serve.py) answers both
APIs, so the two judges must give the same replies and scores. A tiny model whose output head only
favours number tokens ("0" to "100") makes the scores readable ones. A fake OpenAI server on
127.0.0.1 checks what the official client sends and how malformed or failing answers end (one line).
"""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import test_llmfs_serve as served_side
from ch04.gpt import GPTModel
from ch07 import ollama_evaluate as ev
from ch07.gpt_instruction_finetuning import save_finetuned_model
from test_ch07_ollama_evaluate import ENTRIES, FakeOllama, closed_port  # noqa: F401 (a fixture)
from test_llmfs_serve import SFT_CFG, TOKENIZER, serving

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "ch07" / "model_evaluation" / "llm-instruction-eval.ipynb"
_no_proxy_for_localhost, sft_path = served_side._no_proxy_for_localhost, served_side.sft_path
sft_server = served_side.sft_server

MORE = [{"instruction": f"Spell the number {n}.", "input": "", "output": str(n), "model_response": w}
        for n, w in [(1, "one"), (2, "two"), (3, "tree"), (4, "four")]]
RESPONSES = ENTRIES + MORE


@pytest.fixture(autouse=True)
def _no_openai_settings(monkeypatch):
    """The machine's OpenAI settings must not leak into a test."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OLLAMA_HOST"):
        monkeypatch.delenv(name, raising=False)


def number_token_ids() -> list[int]:
    """GPT-2's single tokens "0" ... "100" (a reply of one of them is a score parse_score reads)."""
    return [ids[0] for n in range(101) if len(ids := TOKENIZER.encode(str(n))) == 1]


@pytest.fixture(scope="module")
def number_path(tmp_path_factory) -> Path:
    """A tiny chapter-7 model whose output head favours number tokens: its first reply token is a number
    (which one depends on the prompt), so a one-token reply is a score."""
    torch.manual_seed(123)
    model = GPTModel(SFT_CFG)
    with torch.no_grad():
        model.final_norm.scale[0], model.final_norm.shift[0] = 0.0, 10.0  # feature 0 is always 10
        model.out_head.weight[:, 0] = -1.0
        model.out_head.weight[number_token_ids(), 0] = 1.0  # number tokens: +10, all others: -10
    return save_finetuned_model(model, tmp_path_factory.mktemp("judge") / "number-judge.pth", style="alpaca")


@pytest.fixture(scope="module")
def number_server(number_path):
    with serving(number_path) as running:
        yield running


@pytest.fixture
def responses_file(tmp_path):
    path = tmp_path / "instruction-data-with-response.json"
    path.write_text(json.dumps(RESPONSES))
    return path


def judge_args(api: str, host: str) -> list[str]:
    return ["--api", "ollama", "--host", host] if api == "ollama" else ["--api", "openai", "--base-url", f"{host}/v1"]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the same server, both APIs --------------------------------------------------------------------------

def test_both_apis_give_the_same_replies(sft_server):
    """A free-text judge (the tiny random chapter-7 model): the same prompt gives the same reply either way."""
    host, app = sft_server
    for entry in RESPONSES[:3]:
        prompt = ev.make_score_prompt(entry)
        via_ollama = ev.query_judge(prompt, "tiny-sft", api="ollama", host=host, timeout=60)
        via_openai = ev.query_judge(prompt, "tiny-sft", api="openai", base_url=f"{host}/v1", timeout=60)
        assert via_ollama == via_openai and via_ollama.strip()
    short = ev.query_judge("Name a color.", "tiny-sft", api="openai", base_url=f"{host}/v1", options={"num_predict": 2})
    assert short == ev.query_judge("Name a color.", "tiny-sft", host=host, options={"num_predict": 2})
    assert len(TOKENIZER.encode(short)) <= 2  # num_predict travels as max_tokens


def test_both_apis_give_the_same_scores(number_server, responses_file, capsys):
    host, app = number_server
    name = app.state.worker.chat.name
    outputs = {}
    for api in ev.APIS:
        assert ev.main(["--file", str(responses_file), "--model", name, *judge_args(api, host), "--max-new-tokens", "1",
                        "--no-progress"]) == 0
        outputs[api] = capsys.readouterr().out
    ollama_rows = rows(ev.default_scores_path(responses_file, name))
    openai_rows = rows(ev.default_scores_path(responses_file, name, "openai"))
    assert ev.default_scores_path(responses_file, name, "openai").name == \
        f"instruction-data-with-response.scores-openai-{name.replace(':', '_')}.jsonl"
    scores = [r["score"] for r in ollama_rows]
    assert scores == [r["score"] for r in openai_rows] and len(scores) == len(RESPONSES)
    assert all(isinstance(s, int) for s in scores) and len(set(scores)) > 1  # readable, and not all alike
    assert {r["api"] for r in openai_rows} == {"openai"} and all("api" not in r for r in ollama_rows)
    average = f"Average score: {sum(scores) / len(scores):.2f}"
    assert average in outputs["ollama"] and average in outputs["openai"]
    assert f"OpenAI API at {host}/v1; judge: {name}; {len(RESPONSES)} entries" in outputs["openai"]


def test_an_openai_run_resumes_and_the_other_apis_file_is_refused(number_server, responses_file, tmp_path, capsys):
    host, app = number_server
    name, stats = app.state.worker.chat.name, app.state.worker.stats
    scores = tmp_path / "scores.jsonl"
    argv = ["--file", str(responses_file), "--model", name, "--max-new-tokens", "1", "--no-progress",
            "--scores", str(scores)]
    assert ev.main([*argv, *judge_args("openai", host)]) == 0
    complete = scores.read_bytes()
    lines = complete.decode().splitlines(keepends=True)
    scores.write_text("".join(lines[:3]) + lines[3][:20])  # stopped during the fourth line
    before = stats["requests"]
    assert ev.main([*argv, *judge_args("openai", host)]) == 0
    assert stats["requests"] - before == len(RESPONSES) - 3  # only the records not yet scored
    assert scores.read_bytes() == complete
    assert f"3 already scored in {scores}" in capsys.readouterr().out
    # The same model through the other API is another judge: refused, the file left as it is.
    assert ev.main([*argv, *judge_args("ollama", host)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {scores} holds scores of another judge ({name} through the openai API, line 1; "
                          f"this run asks {name} through the ollama API)") and len(err.splitlines()) == 1
    assert scores.read_bytes() == complete
    ollama_scores = tmp_path / "ollama.jsonl"
    assert ev.main([*argv[:-1], str(ollama_scores), *judge_args("ollama", host)]) == 0
    assert ev.main([*argv[:-1], str(ollama_scores), *judge_args("openai", host)]) == 2
    assert "holds scores of another judge" in capsys.readouterr().err
    assert [r["score"] for r in rows(ollama_scores)] == [r["score"] for r in rows(scores)]


def test_a_scores_line_with_an_unknown_api_is_not_ours(responses_file, tmp_path, capsys):
    scores = tmp_path / "scores.jsonl"
    line = json.dumps({**ev.score_row(0, RESPONSES[0], "model_response", "llama3", 90), "api": "claude"}) + "\n"
    scores.write_text(line)
    assert ev.main(["--file", str(responses_file), "--scores", str(scores), "--api", "openai", "--base-url",
                    "http://127.0.0.1:1/v1"]) == 2
    assert "line 1: 'api' is 'claude', not one of ollama, openai" in capsys.readouterr().err
    assert scores.read_text() == line


# --- one line for a wrong address, a missing model, a server that is not there ------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--api", "openai", "--base-url", "ftp://127.0.0.1/v1"], "argument --base-url: invalid OpenAI base URL"),
    (["--api", "openai", "--base-url", "127.0.0.1:11435/v1"], "give http(s)://host:port/v1"),
    (["--api", "openai", "--base-url", "http://localhost:99999/v1"], "the port is not a number"),
    (["--api", "openai", "--host", "127.0.0.1:11434"], "argument --host: is Ollama's server; with --api openai"),
    (["--base-url", "http://127.0.0.1:11435/v1"], "argument --base-url: is for --api openai"),
    (["--api", "anthropic"], "argument --api: invalid choice"),
])
def test_bad_switches_get_one_line(argv, words, responses_file, capsys):
    with pytest.raises(SystemExit) as info:
        ev.main(["--file", str(responses_file), *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and words in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_the_base_url_is_checked_and_the_environment_does_not_move_it(monkeypatch, responses_file, capsys):
    """--base-url defaults to our own server; $OPENAI_BASE_URL (the openai client's own variable) does not
    change where the judge goes: the URL is always the one given or ours."""
    with pytest.raises(SystemExit):
        ev.main(["--file", str(responses_file), "--api", "openai", "--base-url", "localhost:11435"])
    assert "localhost:11435" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_BASE_URL", "http://10.0.0.5:8000/v1/")
    assert ev.openai_base_url() == ev.DEFAULT_BASE_URL == "http://127.0.0.1:11435/v1"
    assert ev.openai_base_url("http://a:1/v1/") == "http://a:1/v1"
    with ev.openai_client(ev.openai_base_url(), 5.0) as client:
        assert str(client.base_url).rstrip("/") == ev.DEFAULT_BASE_URL and client.api_key == ev.NO_KEY
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    with ev.openai_client(ev.openai_base_url(), 5.0) as client:
        assert client.api_key == "sk-from-env"


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("settings from")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_server_down_unknown_model_and_a_url_without_v1(number_server, responses_file, closed_port, tmp_path,  # noqa: F811
                                                        capsys):
    host, app = number_server
    scores = tmp_path / "scores.jsonl"
    base = ["--file", str(responses_file), "--api", "openai", "--scores", str(scores)]
    assert ev.main([*base, "--base-url", f"http://127.0.0.1:{closed_port}/v1"]) == 1
    assert one_error_line(capsys.readouterr().err).startswith(
        f"error: No OpenAI-compatible server answers at http://127.0.0.1:{closed_port}/v1/models (connection refused)")
    assert ev.main([*base, "--base-url", f"{host}/v1", "--model", "gpt-4-turbo"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"does not list the model 'gpt-4-turbo' (models: {app.state.worker.chat.name})" in line
    assert ev.main([*base, "--base-url", host]) == 1  # the server's root, not its OpenAI API
    assert "not OpenAI's list of models. Is --base-url an OpenAI-compatible API (its base URL usually ends in /v1)?" \
        in one_error_line(capsys.readouterr().err)
    assert not scores.exists()  # nothing written before the checks pass


# --- a fake OpenAI server: what the client sends, and odd answers ----------------------------------------------

HANG = object()


class FakeOpenAI:
    """GET /v1/models lists `models`; POST /v1/chat/completions answers from `replies`, in order: a string
    is a normal answer's content, (status, body) a reply as it is (body: bytes or JSON), HANG says nothing."""

    def __init__(self, replies=(), models=("gpt-4-turbo",), models_status=200):
        self.replies, self.models, self.models_status = list(replies), list(models), models_status
        self.requests, self.headers = [], []
        self.stop = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status, body):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                if self.path == "/v1/models":
                    self._send(fake.models_status, {"object": "list", "data": [{"id": m, "object": "model"}
                                                                                for m in fake.models]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                fake.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                reply = fake.replies.pop(0) if fake.replies else "no more replies"
                if reply is HANG:
                    fake.stop.wait(10)
                    self.close_connection = True
                elif isinstance(reply, tuple):
                    self._send(*reply)
                else:
                    self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                                     "model": fake.requests[-1]["model"],
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": reply}}]})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def test_the_request_is_the_books_and_the_key_travels(monkeypatch, responses_file, capsys):
    """The book's run_chatgpt: one user message, temperature 0, seed 123; the key from OPENAI_API_KEY."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    with FakeOpenAI(["90", "Score: 8/10", "No idea.", "70", "60", "50", "40", "30", "20"]) as fake:
        assert ev.main(["--file", str(responses_file), "--api", "openai", "--base-url", fake.base_url,
                        "--model", "gpt-4-turbo", "--no-progress"]) == 0
    first = fake.requests[0]
    assert first == {"model": "gpt-4-turbo", "messages": [{"role": "user", "content": ev.make_score_prompt(RESPONSES[0])}],
                     "temperature": 0, "seed": 123}
    assert fake.requests[3]["messages"][0]["content"].endswith(ev.STRICT_SUFFIX)  # the retry after "No idea."
    assert {h.get("authorization") for h in fake.headers} == {"Bearer sk-test-123"}
    assert "Average score: " in capsys.readouterr().out
    scores_path = ev.default_scores_path(responses_file, "gpt-4-turbo", "openai")
    assert [r["score"] for r in rows(scores_path)] == [90, 80, 70, 60, 50, 40, 30, 20]


def test_without_a_key_a_server_that_wants_one_says_so(responses_file, capsys):
    with FakeOpenAI(models_status=401) as fake:
        assert ev.main(["--file", str(responses_file), "--api", "openai", "--base-url", fake.base_url,
                        "--model", "gpt-4-turbo"]) == 1
    assert one_error_line(capsys.readouterr().err).endswith("set OPENAI_API_KEY to a key this server accepts")
    assert fake.requests == [] and "authorization" not in fake.headers[0]


MALFORMED = {  # a chat reply -> words of the one-line error
    "not JSON": ((200, b"<html>busy</html>"), "without a chat message"),
    "no choices": ((200, {"id": "x", "object": "chat.completion"}), "without a chat message"),
    "empty choices": ((200, {"id": "x", "object": "chat.completion", "choices": []}), "without a chat message"),
    "choice without a message": ((200, {"choices": [{"index": 0, "finish_reason": "stop"}]}),
                                 "without a chat message"),
    "content not text": ((200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": 85}}]}),
                         "without a chat message"),
    "a JSON list": ((200, [1, 2, 3]), "without a chat message"),
    "server error": ((500, {"error": {"message": "the judge fell over", "type": "server_error"}}),
                     "HTTP 500 without a chat message: the judge fell over"),
    "rate limit": ((429, {"error": {"message": "slow down", "type": "rate_limit"}}), "HTTP 429"),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_answer_ends_in_one_line_and_the_scores_so_far_are_kept(kind, responses_file, tmp_path, capsys):
    reply, words = MALFORMED[kind]
    scores = tmp_path / "scores.jsonl"
    with FakeOpenAI([reply]) as fake:
        with pytest.raises(ev.OllamaUnavailable, match=re.escape(words)):
            ev.query_judge("x", "gpt-4-turbo", api="openai", base_url=fake.base_url, timeout=10)
    with FakeOpenAI(["90", reply, "80"]) as fake:
        rc = ev.main(["--file", str(responses_file), "--api", "openai", "--base-url", fake.base_url,
                      "--model", "gpt-4-turbo", "--scores", str(scores), "--no-progress"])
    assert rc == 1
    line = one_error_line(capsys.readouterr().err)
    assert words in line and line.endswith(f"1 of {len(RESPONSES)} scores are kept in {scores}: rerun the same "
                                           "command to continue")
    assert len(fake.requests) == 2  # no retries by the client: the odd answer was asked for once
    assert [r["score"] for r in rows(scores)] == [90]


def test_a_null_content_is_an_unreadable_reply_and_asked_again(responses_file):
    null = (200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]})
    with FakeOpenAI([null, "75"]) as fake:
        assert ev.score_entry(RESPONSES[0], model="gpt-4-turbo", api="openai", base_url=fake.base_url) == 75
    assert len(fake.requests) == 2


def test_a_judge_that_never_answers_stops_at_the_timeout(responses_file, tmp_path, capsys):
    scores = tmp_path / "scores.jsonl"
    with FakeOpenAI(["90", HANG]) as fake:
        start = time.monotonic()
        rc = ev.main(["--file", str(responses_file), "--api", "openai", "--base-url", fake.base_url,
                      "--model", "gpt-4-turbo", "--scores", str(scores), "--timeout", "1", "--no-progress"])
        seconds = time.monotonic() - start
    assert rc == 1 and seconds < 6, seconds
    assert one_error_line(capsys.readouterr().err) == (
        f"error: The OpenAI-compatible server at {fake.base_url} stopped answering (no complete reply within 1 s); "
        f"1 of {len(RESPONSES)} scores are kept in {scores}: rerun the same command to continue")


def test_query_judge_with_ollama_is_query_model():
    with FakeOllama(["42"]) as server:
        assert ev.query_judge("Hello?", "judge", host=server.host) == "42"
    assert server.chat_requests[0]["options"] == ev.DEFAULT_OPTIONS
    with pytest.raises(ValueError, match="api must be one of"):
        ev.query_judge("Hello?", api="claude")


# --- the notebook's stored outputs (quick mode) --------------------------------------------------------------

def stored_outputs() -> dict[str, str]:
    """{cell id: the text its stored outputs printed}."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    return {c["id"]: "".join("".join(o.get("text", "")) for o in c.get("outputs", []))
            for c in nb["cells"] if c["cell_type"] == "code"}


def test_the_notebooks_stored_outputs_agree_with_the_code(tmp_path):
    out = stored_outputs()
    assert out["eval-01"].startswith("quick mode: True; CPU: ")
    # The prompt it prints is make_score_prompt's, for the first short record of the test split.
    from ch07 import gpt_instruction_finetuning as ft

    _, test_data, _ = ft.split_data(ft.load_instruction_data())
    first = next(e for e in test_data
                 if len(TOKENIZER.encode(ev.make_score_prompt({**e, "model_response": e["output"]}))) < 150)
    assert ev.make_score_prompt({**first, "model_response": "<the model's answer>"}) in out["eval-04"]
    assert f"settings of every request: {ev.DEFAULT_OPTIONS}" in out["eval-04"]
    # Both APIs: one reply, the replies to every record, the scores, the command's scores.
    assert "the same reply: True" in out["eval-10"]
    same = re.search(r"the same reply through both APIs for (\d+) of (\d+) records", out["eval-21"])
    assert same and same.group(1) == same.group(2) != "0"
    listed = dict(re.findall(r"(ollama|openai) *: scores (\[.*?\]);", out["eval-12"]))
    assert listed["ollama"] == listed["openai"] and "the two APIs agree: True" in out["eval-12"]
    assert "the command's scores are the ones above: True" in out["eval-16"]
    # The scores line it prints is one read_scores accepts for the openai judge and refuses for the ollama one,
    # with the message the notebook printed.
    line = json.loads(out["eval-12"].strip().splitlines()[-1])
    assert line["api"] == "openai" and ev.score_row_problem(line) is None
    refused = re.search(r"refused: (\S+) holds (.*)", out["eval-14"]).group(2)
    scores = tmp_path / "openai.jsonl"
    scores.write_text(json.dumps(line) + "\n")
    entry = {"instruction": "x", "input": "", "output": "y", "model_response": ""}
    with pytest.raises(ev.InvalidInput, match=re.escape(refused)):
        ev.read_scores(scores, [entry], "model_response", line["model"], "ollama")
    assert f"default scores file: {ev.default_scores_path('sample-with-response.json', line['model'], 'openai').name}" \
        in out["eval-16"]
    assert "quick mode: the book's judges are skipped" in out["eval-19"]
