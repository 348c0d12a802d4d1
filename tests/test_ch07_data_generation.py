"""Tests for ch07/data_generation (generate_instruction_data.py, reflection.py): the validation rules and
the section parsing; against a small fake Ollama server started here (what is sent, malformed replies --
empty, echoed, unparseable, not JSON -- counted, not kept and asked again on a rerun, a server that dies
part-way, Ctrl-C, one-line errors before any work, files of another kind left as they were); against
chapter 7's own server (in process, to see the exact prompt text it receives, and as
`python -m ch07.serve`); and the notebook's stored outputs."""

import ast
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ch04.gpt import GPTModel
from ch07 import ollama_evaluate as ev
from ch07.data_generation import generate_instruction_data as gen
from ch07.data_generation import reflection as refl
from ch07.gpt_instruction_finetuning import save_finetuned_model
from test_ch07_ollama_evaluate import _no_proxy_for_localhost, closed_port  # noqa: F401 (fixtures)
from test_llmfs_serve import SFT_CFG, serving

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "ch07" / "data_generation" / "dataset-generation.ipynb"
NOT_JSON = object()  # a reply: HTTP 200 with a body that is not JSON
WRONG_JSON = object()  # a reply: HTTP 200 with JSON of another shape
DIE = object()  # the server goes away at this request

DATA = [
    {"instruction": "Convert 45 kilometers to meters.", "input": "", "output": "45 kilometers is 45000 meters."},
    {"instruction": "Edit the sentence.", "input": "He go home.", "output": "He goes home."},
    {"instruction": "Name a primary color.", "input": "", "output": "Blue."},
]


class FakeOllama:
    """Ollama's /api/version, /api/tags, /api/generate and /api/chat on a free port; the replies to
    /api/generate and /api/chat come from two queues, in order; every request body is kept."""

    def __init__(self, generate=(), chat=(), models=("llama3:latest",)):
        self.queues = {"/api/generate": list(generate), "/api/chat": list(chat)}
        self.models = list(models)
        self.requests = {"/api/generate": [], "/api/chat": []}
        self.paths = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status, body: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                fake.paths.append(("GET", self.path))
                if self.path == "/api/version":
                    self._send(200, b'{"version": "0.0.test"}')
                elif self.path == "/api/tags":
                    self._send(200, json.dumps({"models": [{"name": m} for m in fake.models]}).encode())
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self):
                fake.paths.append(("POST", self.path))
                if self.path not in fake.queues:
                    self._send(404, b'{"error": "not found"}')
                    return
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests[self.path].append(request)
                queue = fake.queues[self.path]
                reply = queue.pop(0) if queue else "no more replies"
                if reply is DIE:
                    self.close_connection = True
                    threading.Thread(target=lambda: (fake.server.shutdown(), fake.server.server_close()),
                                     daemon=True).start()
                    return
                if reply is NOT_JSON:
                    self._send(200, b"<html>hello</html>")
                elif reply is WRONG_JSON:
                    self._send(200, json.dumps({"text": "a field Ollama does not send", "done": True}).encode())
                elif self.path == "/api/generate":
                    self._send(200, json.dumps({"model": request["model"], "response": reply, "done": True}).encode())
                else:
                    self._send(200, json.dumps({"model": request["model"], "done": True,
                                                "message": {"role": "assistant", "content": reply}}).encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        try:
            self.server.shutdown()
            self.server.server_close()
        except OSError:
            pass
        self.thread.join(timeout=5)


def read_records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def last_line(text):
    return [line for line in text.splitlines() if line.strip()][-1]


def counts(summary_line):
    """(written, there before, rejected) from a command's summary line."""
    match = re.match(r"(\d+) records written, (\d+) were there before, (\d+) ", summary_line)
    assert match, summary_line
    return tuple(map(int, match.groups()))


def err_lines(err):
    return [line for line in err.splitlines() if line.strip() and not line.startswith("settings from the environment")]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "instruction-data.json"
    path.write_text(json.dumps(DATA))
    return path


# --- validation rules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    ("What is the capital of France?\nSome more text.", "What is the capital of France?"),
    ("\n\n  Explain photosynthesis to a child.  \n", "Explain photosynthesis to a child."),
    ("I'm looking for a way to keep my cat off the table.", "I'm looking for a way to keep my cat off the table."),
    ("My sister says the moon is cheese, is she right?", "My sister says the moon is cheese, is she right?"),
])
def test_check_instruction_keeps_questions_and_requests(reply, expected):
    assert gen.check_instruction(reply) == (expected, "")


@pytest.mark.parametrize("reply, why", [
    ("", "empty"),
    (" \n \n", "empty"),
    ("<|start_header_id|>user<|end_header_id|>", "echoes the template"),
    ("### Instruction: What is 2 + 2?", "echoes the template"),
    ("What " + "very " * 200 + "long question?", "too long"),
    ("Why?", "not text"),
    ("!!! ??? 123 456 789 ???", "not text"),
    ("The weather was nice and the birds sang.", "not a question or request"),
])
def test_check_instruction_rejects(reply, why):
    instruction, reason = gen.check_instruction(reply)
    assert instruction is None and reason.startswith(why)


def test_check_response():
    assert gen.check_response("  Paris.\n", "What is the capital of France?") == ("Paris.", "")
    assert gen.check_response("", "Q?")[1] == "empty"
    assert gen.check_response("Q?", "Q?")[1] == "repeats the instruction"
    assert gen.check_response("<|eot_id|>", "Q?")[1] == "echoes the template"
    assert gen.check_response("x" * 30, "Q?", max_chars=20)[1] == "too long"


def test_templates():
    assert gen.TEMPLATES["llama3"] == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"  # the book's
    assert gen.TEMPLATES["alpaca"].endswith("\n\n### Instruction:\n")
    assert all(gen.echoes_template(prefix) for prefix in gen.TEMPLATES.values())


# --- reflection parsing ---------------------------------------------------------------------------------

GOOD_INSTRUCTION_REPLY = ("1. The instruction is too easy.\n2. [New Instruction] Explain why the metric system "
                          "helps trade. [End]\n3. [New Answer] It gives everyone the same units. [End]")


def test_parse_instruction_reflection():
    assert refl.parse_instruction_reflection(GOOD_INSTRUCTION_REPLY, "Convert 45 kilometers to meters.") == (
        ("Explain why the metric system helps trade.", "It gives everyone the same units."), "")
    assert refl.parse_instruction_reflection("New Instruction: Explain X.\nNew Answer: Y.", "Q")[0] == ("Explain X.", "Y.")
    for reply, why in [("", "empty reply"), ("It is a fine instruction.", "no [New Instruction] section"),
                       ("[New Instruction] Explain X. [End]", "no [New Answer] section"),
                       ("[New Instruction] [End] [New Answer] Y [End]", "empty instruction"),
                       ("[New Instruction] Q [End] [New Answer] Y [End]", "instruction unchanged"),
                       ("[New Instruction] Explain X. [End] [New Answer] [End]", "empty answer")]:
        assert refl.parse_instruction_reflection(reply, "Q") == (None, why), reply


def test_parse_response_reflection():
    reply = "1. Too short.\n2. [Better Answer] Endangered species need care.\nMore. [End] trailing"
    assert refl.parse_response_reflection(reply) == ("Endangered species need care.\nMore.", "")
    assert refl.extract_response("[Better Answer] A [Better Answer] B") == ["A", "B"]
    assert refl.parse_response_reflection("[Better Answer] unterminated but whole") == ("unterminated but whole", "")
    for reply, why in [("  ", "empty reply"), ("Here is a better answer: 42", "no [Better Answer] section"),
                       ("[Better Answer]   [End]", "empty answer"), ("[Better Answer] " + "x" * 50, "answer too long")]:
        assert refl.parse_response_reflection(reply, max_chars=40) == (None, why)


def test_prompts_ask_for_the_sections():
    sys_prompt, prompt = refl.instr_prompt_no_input("Convert 45 kilometers to meters.", "45000 meters.")
    assert prompt.startswith("[Instruction]\nConvert 45 kilometers to meters.\n\n[The Start of Answer]\n45000 meters.")
    assert "[New Instruction] your instruction [End]" in prompt and "[New Answer] your answer [End]" in prompt
    _, prompt = refl.res_gen_prompt_input("Edit the sentence.", "He go home.", "He goes home.")
    assert "[The Start of Input]\nHe go home.\n\n[The End of Input]" in prompt
    assert "[Better Answer] your answer [End]" in prompt
    assert refl.local_prompt(sys_prompt, prompt, refl.RESPONSE_FORMAT).startswith(sys_prompt + "\n\n[Instruction]")


# --- generation against a fake server ---------------------------------------------------------------------

def test_generation_validates_counts_and_resumes(tmp_path, capsys):
    out = tmp_path / "generated.jsonl"
    generate = ["What is the capital of France?",          # 0: fine ...
                "",                                         # 1: empty
                "<|start_header_id|>user<|end_header_id|>", # 2: the template echoed
                NOT_JSON,                                   # 3: not JSON
                "Explain gravity in one sentence.",         # 4: fine, but its response is WRONG_JSON
                "The sky. The sea.",                        # 5: not a question or request
                "List three prime numbers."]                # 6: fine, but its response is empty
    chat = ["Paris.", WRONG_JSON, ""]
    argv = ["--num-samples", "7", "--output", str(out), "--no-progress", "--max-new-tokens", "32"]
    with FakeOllama(generate, chat) as fake:
        assert gen.main([*argv, "--host", fake.host]) == 0
    assert last_line(capsys.readouterr().out) == (
        f"1 records written, 0 were there before, 6 rejected (instruction: echoes the template: 1, instruction: "
        f"empty: 1, instruction: not Ollama's JSON: 1, instruction: not a question or request: 1, response: empty: "
        f"1, response: not Ollama's JSON: 1; a rerun asks again): {out}")
    # What was sent: the template prefix, raw, with the book's sampling and a seed per sample.
    sent = fake.requests["/api/generate"]
    assert [r["prompt"] for r in sent] == [gen.TEMPLATES["llama3"]] * 7
    assert all(r["raw"] is True and r["stream"] is False and r["model"] == "llama3" for r in sent)
    assert [r["options"] for r in sent] == [{"temperature": 1.0, "top_p": 1.0, "seed": 123 + i, "num_predict": 32}
                                            for i in range(7)]
    assert [r["messages"] for r in fake.requests["/api/chat"]] == [
        [{"role": "user", "content": q}] for q in ("What is the capital of France?", "Explain gravity in one sentence.",
                                                   "List three prime numbers.")]
    assert read_records(out) == [{"index": 0, "instruction": "What is the capital of France?", "input": "",
                                  "output": "Paris.", "template": "llama3", "model": "llama3", "seed": 123}]

    # The rerun asks again for exactly the six rejected samples, with their own seeds.
    generate = ["Name a fruit, please.", "How do magnets work?", "Write a haiku about rain.",
                "Explain gravity in one sentence.", "What is 2 + 2?", "List three prime numbers."]
    chat = ["Apple.", "Through magnetic fields.", "Rain taps the window.", "Mass attracts mass.", "4.", "2, 3, 5."]
    with FakeOllama(generate, chat) as fake:
        assert gen.main([*argv, "--host", fake.host]) == 0
    assert last_line(capsys.readouterr().out) == (
        f"6 records written, 1 were there before, 0 rejected (none; a rerun asks again): {out}")
    assert [r["options"]["seed"] for r in fake.requests["/api/generate"]] == [124, 125, 126, 127, 128, 129]
    records = read_records(out)
    assert [r["index"] for r in records] == list(range(7))
    assert [r["output"] for r in records[1:]] == chat
    # All done: nothing is asked (no server needed).
    assert gen.main([*argv, "--host", "127.0.0.1:1"]) == 0
    assert "already holds all 7 records" in capsys.readouterr().out


def test_generation_template_and_sampling_options(tmp_path):
    out = tmp_path / "generated.jsonl"
    with FakeOllama(["What is an apple?"], ["A fruit."]) as fake:
        assert gen.main(["--num-samples", "1", "--output", str(out), "--template", "alpaca", "--temperature", "0.7",
                         "--top-p", "0.9", "--seed", "7", "--host", fake.host, "--no-progress"]) == 0
    (request,) = fake.requests["/api/generate"]
    assert request["prompt"] == gen.TEMPLATES["alpaca"] and request["options"] == {"temperature": 0.7, "top_p": 0.9,
                                                                                   "seed": 7}
    assert fake.requests["/api/chat"][0]["options"]["seed"] == 7
    assert read_records(out)[0]["template"] == "alpaca"


def test_generation_server_dies_then_resumes(tmp_path, capsys):
    out = tmp_path / "generated.jsonl"
    argv = ["--num-samples", "3", "--output", str(out), "--no-progress"]
    with FakeOllama(["What is a cat?", "What is a dog?"], ["An animal.", DIE]) as fake:
        assert gen.main([*argv, "--host", fake.host]) == 1
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: the server at {fake.host} stopped answering (")
    assert err[0].endswith(f"after 1 new records; they are saved in {out}: run the same command again to continue.")
    assert [r["index"] for r in read_records(out)] == [0]
    with open(out, "a") as f:  # a line torn by a killed write: cut off by the next run
        f.write('{"index": 1, "instruction": "What is a d')
    with FakeOllama(["What is a dog?", "What is a cow?"], ["An animal.", "An animal too."]) as fake:
        assert gen.main([*argv, "--host", fake.host]) == 0
    assert [r["index"] for r in read_records(out)] == [0, 1, 2]


def test_generation_ctrl_c_keeps_what_is_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "generated.jsonl"
    real = gen.ask_chat

    def ask_chat(*args, **kwargs):
        if len(fake.requests["/api/chat"]) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "ask_chat", ask_chat)
    with FakeOllama(["What is a cat?", "What is a dog?"], ["An animal."]) as fake:
        assert gen.main(["--num-samples", "3", "--output", str(out), "--host", fake.host, "--no-progress"]) == 130
    assert err_lines(capsys.readouterr().err) == [
        f"interrupted: 1 new records (1 of 3 in all) are saved in {out}; run the same command again to continue"]
    assert [r["instruction"] for r in read_records(out)] == ["What is a cat?"]


def exit_code(main, argv):
    try:
        return main(argv)
    except SystemExit as exc:  # the parser's one-line errors
        return exc.code


def test_generation_one_line_errors_before_any_work(tmp_path, capsys, closed_port):  # noqa: F811 (fixture)
    out = tmp_path / "generated.jsonl"
    assert gen.main(["--output", str(out), "--host", f"127.0.0.1:{closed_port}"]) == 1
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: No Ollama server answers at") and not out.exists()
    with FakeOllama(models=["mistral:latest"]) as fake:
        assert gen.main(["--output", str(out), "--host", fake.host]) == 1
    assert "does not have the model 'llama3'" in capsys.readouterr().err and fake.requests["/api/generate"] == []
    for argv, message in [(["--num-samples", "0"], "argument --num-samples: must be a whole number >= 1, got 0"),
                          (["--top-p", "0"], "argument --top-p: must be a number with 0 < p <= 1, got 0"),
                          (["--temperature", "-1"], "argument --temperature"),
                          (["--template", "mistral"], "argument --template: invalid choice"),
                          (["--output", str(tmp_path)], "is a folder")]:
        assert exit_code(gen.main, argv) == 2, argv
        err = err_lines(capsys.readouterr().err)
        assert len(err) == 1 and message in err[0], err
    # A file that is not ours, or made with another template, is refused before the server is asked.
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"my notes")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"index": 0, "instruction": "Q?", "input": "", "output": "A", "template": "phi3",
                                 "model": "m", "seed": 1}) + "\n")
    with FakeOllama() as fake:
        assert gen.main(["--output", str(notes), "--host", fake.host]) == 2
        assert err_lines(capsys.readouterr().err) == [
            f"error: --output {notes} is not a generated-instructions file of this command (line 1: neither a whole "
            "record nor the start of one); it was left as it is: choose another --output file"]
        assert gen.main(["--output", str(other), "--host", fake.host]) == 2
        assert err_lines(capsys.readouterr().err) == [
            f"error: --output {other} holds records made with --template phi3 (line 1), not llama3; choose another "
            "--output file"]
    assert fake.paths == [] and notes.read_bytes() == b"my notes"


# --- reflection against a fake server ---------------------------------------------------------------------

def test_reflection_validates_counts_and_resumes(data_file, tmp_path, capsys):
    out = tmp_path / "reflected.jsonl"
    argv = ["--mode", "instruction", "--data", str(data_file), "--output", str(out), "--no-progress"]
    # Record 0: unparseable, then WRONG_JSON on the stricter retry: left out. Record 1 has an input: kept as is,
    # no request. Record 2: empty, then a good reply on the retry.
    chat = ["I think the instruction is fine.", WRONG_JSON, "", GOOD_INSTRUCTION_REPLY]
    with FakeOllama(chat=chat) as fake:
        assert refl.main([*argv, "--host", fake.host]) == 0
    assert last_line(capsys.readouterr().out) == (
        f"2 records written, 0 were there before, 1 without a usable reply (not Ollama's JSON: 1; a rerun asks "
        f"again): {out}")
    prompts = [r["messages"][0]["content"] for r in fake.requests["/api/chat"]]
    assert len(prompts) == 4 and prompts[1] == prompts[0] + refl.STRICT_SUFFIX
    assert "[Instruction]\nConvert 45 kilometers to meters.\n" in prompts[0]
    assert "[Instruction]\nName a primary color.\n" in prompts[2]
    assert all(r["options"] == ev.DEFAULT_OPTIONS for r in fake.requests["/api/chat"])  # seed 123, temperature 0
    records = read_records(out)
    assert [(r["index"], r["reflected"]) for r in records] == [(1, False), (2, True)]
    assert records[0] | {} == {"index": 1, "reflection": "instruction", **DATA[1], "reflected": False,
                               "original_instruction": DATA[1]["instruction"], "original_output": DATA[1]["output"]}
    assert (records[1]["instruction"], records[1]["output"], records[1]["input"]) == (
        "Explain why the metric system helps trade.", "It gives everyone the same units.", "")

    # The rerun asks again for record 0 only.
    with FakeOllama(chat=[GOOD_INSTRUCTION_REPLY]) as fake:
        assert refl.main([*argv, "--host", fake.host]) == 0
    assert last_line(capsys.readouterr().out).startswith("1 records written, 2 were there before, 0 without")
    assert len(fake.requests["/api/chat"]) == 1
    assert "Convert 45 kilometers to meters." in fake.requests["/api/chat"][0]["messages"][0]["content"]
    assert sorted(r["index"] for r in read_records(out)) == [0, 1, 2]


def test_response_reflection(data_file, tmp_path, capsys):
    out = tmp_path / "reflected.jsonl"
    chat = ["1. Short.\n2. [Better Answer] 45 km x 1000 m/km = 45000 m. [End]",
            "No sections at all.", "Still none.",
            "[Better Answer] Blue is a primary color. [End]"]
    with FakeOllama(chat=chat) as fake:
        assert refl.main(["--mode", "response", "--data", str(data_file), "--output", str(out), "--host", fake.host,
                          "--no-progress"]) == 0
    assert "1 without a usable reply (no [Better Answer] section: 1" in capsys.readouterr().out
    prompts = [r["messages"][0]["content"] for r in fake.requests["/api/chat"]]
    assert "[The Start of Input]\nHe go home.\n\n[The End of Input]" in prompts[1]
    assert "[The Start of Input]" not in prompts[0]
    assert [(r["index"], r["output"], r["original_output"]) for r in read_records(out)] == [
        (0, "45 km x 1000 m/km = 45000 m.", DATA[0]["output"]), (2, "Blue is a primary color.", DATA[2]["output"])]
    # The other mode's file, or another data set's, is refused before the server is asked.
    assert refl.main(["--mode", "instruction", "--data", str(data_file), "--output", str(out),
                      "--host", "127.0.0.1:1"]) == 2
    assert err_lines(capsys.readouterr().err) == [
        f"error: --output {out} holds response reflections (line 1), not instruction; choose another --output file"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(DATA[::-1]))
    assert refl.main(["--mode", "response", "--data", str(other), "--output", str(out), "--host", "127.0.0.1:1"]) == 2
    assert "record 0 does not belong to this input data" in capsys.readouterr().err


def test_reflection_one_line_errors(data_file, tmp_path, capsys, closed_port):  # noqa: F811 (fixture)
    out = tmp_path / "reflected.jsonl"
    assert refl.main(["--data", str(data_file), "--output", str(out), "--host", f"127.0.0.1:{closed_port}"]) == 1
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: No Ollama server answers at") and not out.exists()
    for argv, message in [(["--data", str(tmp_path / "none.json")], f"error: --data {tmp_path / 'none.json'} does not exist"),
                          (["--data", str(tmp_path)], "is a folder"),
                          (["--data", str(data_file), "--output", str(data_file)], "is the instruction data"),
                          (["--mode", "both"], "argument --mode: invalid choice"),
                          (["--limit", "0"], "argument --limit: must be a whole number >= 1, got 0")]:
        assert exit_code(refl.main, argv) == 2, argv
        err = err_lines(capsys.readouterr().err)
        assert len(err) == 1 and message in err[0], err
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": 3}]')
    assert refl.main(["--data", str(bad), "--output", str(out)]) == 2
    assert "record 0 has 'instruction' of type int" in capsys.readouterr().err


def test_reflection_server_dies(data_file, tmp_path, capsys):
    out = tmp_path / "reflected.jsonl"
    with FakeOllama(chat=["[Better Answer] 45000 m. [End]", DIE]) as fake:
        assert refl.main(["--mode", "response", "--data", str(data_file), "--output", str(out), "--host", fake.host,
                          "--no-progress"]) == 1
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and "stopped answering" in err[0] and "after 1 new records" in err[0]
    assert [r["index"] for r in read_records(out)] == [0]


# --- against chapter 7's own server -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    torch.manual_seed(123)
    return save_finetuned_model(GPTModel(SFT_CFG), tmp_path_factory.mktemp("ch07-gen") / "tiny-sft.pth",
                                style="alpaca")


@pytest.mark.parametrize("template", ["llama3", "alpaca"])
def test_the_server_receives_exactly_the_template_prefix(tiny_sft, tmp_path, template, capsys):
    with serving(tiny_sft, max_new_tokens=8) as (host, app):
        chat = app.state.worker.chat
        received = []
        real_encode = chat.encode
        chat.encode = lambda text, truncate=False: received.append(text) or real_encode(text, truncate)
        out = tmp_path / "generated.jsonl"
        argv = ["--num-samples", "2", "--output", str(out), "--template", template, "--model", "tiny-sft",
                "--host", host, "--no-progress"]
        assert gen.main(argv) == 0
        written, before, invalid = counts(last_line(capsys.readouterr().out))
        # The raw prompt of each sample is the prefix itself, nothing added (the response prompts, if any
        # instruction passed, are the server's Alpaca prompt around it).
        assert [text for text in received if "### Response:" not in text] == [gen.TEMPLATES[template]] * 2
        assert (written + invalid, before) == (2, 0)
        records = read_records(out) if out.exists() else []
        assert len(records) == written and all(r["template"] == template for r in records)
        received.clear()
        assert gen.main([*argv[:1], "3", *argv[2:]]) == 0  # one more sample, plus the rejected ones again
        written2, before2, invalid2 = counts(last_line(capsys.readouterr().out))
        assert (before2, written2 + invalid2) == (written, 3 - written)
        assert [text for text in received if "### Response:" not in text] == [gen.TEMPLATES[template]] * (3 - written)


def test_commands_against_python_m_ch07_serve(tiny_sft, data_file, tmp_path, closed_port):  # noqa: F811 (fixture)
    port = closed_port
    host = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ch07.serve", "--model", str(tiny_sft), "--host", "127.0.0.1",
                             "--port", str(port), "--max-new-tokens", "8"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline, models = time.monotonic() + 90, None
        while models is None:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "ch07.serve did not answer within 90 s"
            try:
                models = ev.list_models(host, timeout=2)
            except ev.OllamaUnavailable:
                time.sleep(0.5)
        for module, args, total in [
                ("generate_instruction_data", ["--num-samples", "2", "--template", "alpaca"], 2),
                ("reflection", ["--mode", "response", "--data", str(data_file), "--limit", "2"], 2)]:
            out = tmp_path / f"{module}.jsonl"
            result = subprocess.run([sys.executable, "-m", f"ch07.data_generation.{module}", *args, "--output",
                                     str(out), "--host", host, "--model", models[0], "--no-progress"], cwd=REPO,
                                    capture_output=True, text=True, timeout=120,
                                    env={**os.environ, "NO_PROXY": "127.0.0.1"})
            assert result.returncode == 0, result.stderr
            written, before, invalid = counts(last_line(result.stdout))
            assert (written + invalid, before) == (total, 0)
            assert len(read_records(out) if out.exists() else []) == written
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# --- the notebook's stored outputs ---------------------------------------------------------------------------

def notebook_cells():
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    return {c["id"]: ("".join(c["source"]),
                      "".join("".join(o.get("text") or o.get("data", {}).get("text/plain", ""))
                              for o in c.get("outputs", [])))
            for c in cells if c["cell_type"] == "code"}


def run_cell(source, **names):
    """Run a notebook cell's code with `names` defined; return what it prints."""
    printed = []
    exec(source, {**names, "print": lambda *args, **kw: printed.append(" ".join(map(str, args)))})
    return "\n".join(printed) + "\n"


def summary_dicts(text):
    return [ast.literal_eval(m) for m in re.findall(r"\{'total'[^}]*\}", text)]


def test_notebook_stored_outputs_agree_with_the_modules():
    from ch02.tokenizer import get_gpt2_tokenizer
    from ch07.gpt_instruction_finetuning import load_instruction_data

    meta = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["metadata"]["llmfs"]
    assert meta["mode"] == "quick"
    cells = notebook_cells()
    assert cells["datagen-01"][1].startswith("quick mode: True, torch ")
    assert "template alpaca" in cells["datagen-03"][1]
    # The quick server read exactly the tokens of the raw template prefix.
    match = re.search(r"prompt tokens the server read: (\d+) \| tokens of the prefix: (\d+)", cells["datagen-07"][1])
    assert match and int(match[1]) == int(match[2]) == len(get_gpt2_tokenizer().encode(gen.TEMPLATES["alpaca"]))
    # The verdicts and parses printed are what the module's checks say now.
    reply = ast.literal_eval(cells["datagen-07"][1].split("the model continues: ", 1)[1].splitlines()[0])
    assert run_cell(cells["datagen-09"][0], gen=gen, body={"response": reply}) == cells["datagen-09"][1]
    data = load_instruction_data()
    assert run_cell(cells["datagen-18"][0], refl=refl, entry=data[2]) == cells["datagen-18"][1]
    # The counts add up, and the reruns found what the first runs wrote.
    first, second = summary_dicts(cells["datagen-11"][1]) + summary_dicts(cells["datagen-13"][1])
    instruction, response = summary_dicts(cells["datagen-20"][1])
    (again,) = summary_dicts(cells["datagen-22"][1])
    for s in (first, second, instruction, response, again):
        assert s["written"] + s["invalid"] == s["total"] - s["done_before"], s
    assert second["done_before"] == first["written"] and again["done_before"] == instruction["written"]
    passed_through = [i for i, entry in enumerate(data[:instruction["total"]]) if entry["input"]]
    shown = [int(i) for i in re.findall(r"#(\d+) reflected=False", cells["datagen-20"][1])]
    assert shown == passed_through and instruction["written"] >= len(passed_through)
