"""Tests for ch07/dpo/preference_data.py against a real HTTP server on 127.0.0.1 that speaks Ollama's API
(the fake from test_ch07_ollama_evaluate): the prompts it sends, reply validation and retries, a server
that dies part-way, a rerun that continues (also after a half-written line), an --output that is not a
preference-pairs file (refused, left byte for byte as it was), a server that stalls, Ctrl-C, and, where
chapter 7's own Ollama-API server `ch07.serve` exists, a run against it."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ch04.gpt import GPTModel
from ch07 import ollama_evaluate as ev
from ch07.cli import QUICK_CONFIG
from ch07.dpo import preference_data as pd
from ch07.gpt_instruction_finetuning import format_input, save_finetuned_model
from test_ch07_ollama_evaluate import (  # noqa: F401 (fixtures: the proxy switch-off and a closed port)
    SILENT,
    STALL,
    TRICKLE,
    FakeOllama,
    _no_proxy_for_localhost,
    closed_port,
    interrupt_real_run,
    stderr_lines,
)

REPO = Path(__file__).resolve().parents[1]

DATA = [
    {"instruction": "Convert 45 kilometers to meters.", "input": "", "output": "45 kilometers is 45000 meters."},
    {"instruction": "Edit the sentence.", "input": "He go home.", "output": "He goes home."},
    {"instruction": "Name a primary color.", "input": "", "output": "Blue."},
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]
DIE = object()  # in a reply queue: the server goes down at this request


class DyingReplies(list):
    """FakeOllama's reply queue; at DIE the server dies: that request gets no answer and the port closes."""

    def __init__(self, items, fake):
        super().__init__(items)
        self.fake = fake

    def pop(self, index=-1):
        item = super().pop(index)
        if item is DIE:
            server = self.fake.server
            server.handle_error = lambda *args: None  # no traceback for the request we abort
            threading.Thread(target=lambda: (server.shutdown(), server.server_close())).start()
            raise ConnectionAbortedError("the server died")
        return item


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "instruction-data.json"
    path.write_text(json.dumps(DATA))
    return path


def plan():
    return pd.politeness_plan(len(DATA), seed=123)


def expected_pair(i, rewrite):
    """(chosen, rejected) for record i when the model's rewrite is `rewrite` (the bonus notebook's rule)."""
    return (rewrite, DATA[i]["output"]) if plan()[i] == "polite" else (DATA[i]["output"], rewrite)


# --- pieces ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, cleaned", [
    ("  Sure, 45 kilometers is 45000 meters.\n", "Sure, 45 kilometers is 45000 meters."),
    ("`45 km is 45000 m, obviously.`", "45 km is 45000 m, obviously."),
    ('"Please note: 45 kilometers is 45000 meters."', "Please note: 45 kilometers is 45000 meters."),
    ("\u201c45 kilometers is 45000 meters, duh.\u201d", "45 kilometers is 45000 meters, duh."),
    ('He said "hi" and "bye"', 'He said "hi" and "bye"'),  # inner quotes stay
])
def test_clean_reply_keeps_a_usable_rewrite(reply, cleaned):
    assert pd.clean_reply(reply, DATA[0]["output"]) == (cleaned, "")


@pytest.mark.parametrize("reply, why", [
    ("", "empty"),
    ("  ``  ", "empty"),
    ("45 kilometers is 45000 meters.", "unchanged"),
    ("`45 kilometers is 45000 meters.`", "unchanged"),
    ("Given the input `Below is an instruction`...", "repeats the prompt"),
    ("x" * 400, "characters long"),
])
def test_clean_reply_refuses_bad_replies(reply, why):
    text, reason = pd.clean_reply(reply, DATA[0]["output"])
    assert text is None and why in reason


def test_prompt_is_the_bonus_notebooks_request():
    prompt = pd.make_rewrite_prompt(DATA[1], "impolite")
    assert prompt.startswith(f"Given the input `{format_input(DATA[1])}` and correct output `He goes home.`")
    assert "slightly rewrite the output to be more impolite." in prompt
    with pytest.raises(ValueError, match="politeness"):
        pd.make_rewrite_prompt(DATA[1], "rude")


def test_politeness_plan_is_seeded_and_mixed():
    assert pd.politeness_plan(20, seed=123) == pd.politeness_plan(20, seed=123)
    assert pd.politeness_plan(20, seed=123) != pd.politeness_plan(20, seed=7)
    assert set(pd.politeness_plan(20)) == {"polite", "impolite"}
    assert set(plan()) == {"polite", "impolite"}  # the tests below see both cases


def test_read_jsonl_repairs_only_an_unfinished_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}\n{"index": 2, "chos')
    with pytest.raises(ValueError, match="line 3"):
        pd.read_jsonl(path)
    assert pd.read_jsonl(path, repair=True) == [{"index": 0}, {"index": 1}]
    assert path.read_text() == '{"index": 0}\n{"index": 1}\n'
    path.write_text('{"index": 0}\n{"index": 1}')  # complete object, newline missing: kept
    assert pd.read_jsonl(path, repair=True) == [{"index": 0}, {"index": 1}]
    assert path.read_text().endswith("}\n")
    path.write_text('{"index": 0}\nnot json\n{"index": 2}\n')  # damage in the middle is never "repaired"
    with pytest.raises(ValueError, match="line 2"):
        pd.read_jsonl(path, repair=True)


# --- against a fake server -------------------------------------------------------------------------------

def test_bad_replies_server_death_and_rerun(data_file, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    replies = [
        "`Certainly! 45 kilometers is 45000 meters.`",  # record 0: fine (backticks stripped)
        "",                                             # record 1: empty ...
        "He goes home, thank you.",                     # ... the stricter retry is fine
        "Blue.",                                        # record 2: unchanged ...
        "Given the input `...` here you go",            # ... and an echo: left out
        DIE,                                            # record 3: the server dies
    ]
    fake = FakeOllama()
    fake.replies = DyingReplies(replies, fake)
    with fake:
        argv = ["--data", str(data_file), "--output", str(out), "--host", fake.host, "--no-progress"]
        assert pd.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: the server at {fake.host} stopped answering") and "after 2 new records" in err
    assert "run the same command again" in err

    prompts = [r["messages"][0]["content"] for r in fake.chat_requests]
    assert len(prompts) == 6 and all(r["model"] == "llama3" for r in fake.chat_requests)
    for prompt, i in zip(prompts, [0, 1, 1, 2, 2, 3]):
        assert format_input(DATA[i]) in prompt and f"to be more {plan()[i]}." in prompt
    assert pd.STRICT_SUFFIX not in prompts[1] and prompts[2] == prompts[1] + pd.STRICT_SUFFIX

    records = pd.read_jsonl(out)
    assert [r["index"] for r in records] == [0, 1]
    assert (records[0]["chosen"], records[0]["rejected"]) == expected_pair(0, "Certainly! 45 kilometers is 45000 meters.")
    assert (records[1]["chosen"], records[1]["rejected"]) == expected_pair(1, "He goes home, thank you.")
    assert all(records[k]["politeness"] == plan()[k] and records[k]["instruction"] == DATA[k]["instruction"]
               for k in (0, 1))

    # A crash in the middle of writing leaves half a line; the rerun drops it and continues.
    with open(out, "a") as f:
        f.write('{"instruction": "Name a primary co')
    with FakeOllama(["Blue, if you please.", "5, obviously.", "Hello there, friend!"]) as fake2:
        assert pd.main(argv[:5] + [fake2.host, "--no-progress"]) == 0
    assert "3 records written, 2 were there before, 0 without a usable reply" in capsys.readouterr().out
    assert [format_input(DATA[i]) in r["messages"][0]["content"]
            for i, r in zip([2, 3, 4], fake2.chat_requests)] == [True] * 3
    records = pd.read_jsonl(out)
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4]
    for i, rewrite in zip([2, 3, 4], ["Blue, if you please.", "5, obviously.", "Hello there, friend!"]):
        assert (records[i]["chosen"], records[i]["rejected"]) == expected_pair(i, rewrite)

    # Everything done: a third run asks nothing (no server needed).
    assert pd.main(argv) == 0
    assert "already holds all 5 records" in capsys.readouterr().out
    # The file is ready for DPO.
    from ch07.dpo.dpo import load_preference_data

    assert len(load_preference_data(out)) == 5


def test_both_rewrites(tmp_path):
    out = tmp_path / "pairs.jsonl"
    replies = ["Kindly: 45 kilometers is 45000 meters.", "45 km is 45000 m. Obviously.",
               "Could you please note: he goes home.", "He goes home. Duh."]
    with FakeOllama(replies) as fake:
        summary = pd.generate_preference_data(DATA[:2], out, host=fake.host, both=True, progress=False,
                                              options={"num_predict": 64})
    assert summary == {"total": 2, "done_before": 0, "written": 2, "invalid": 0}
    kinds = [r["messages"][0]["content"].split("to be more ")[1].split(".")[0] for r in fake.chat_requests]
    assert kinds == ["polite", "impolite", "polite", "impolite"]
    assert fake.chat_requests[0]["options"]["num_predict"] == 64
    records = pd.read_jsonl(out)
    assert [(r["chosen"], r["rejected"], r["politeness"]) for r in records] == [
        (replies[0], replies[1], "both"), (replies[2], replies[3], "both")]


def test_output_from_other_data_is_refused(data_file, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    out.write_text(json.dumps({**DATA[1], "index": 0, "chosen": "a", "rejected": "b", "politeness": "polite"}) + "\n")
    assert pd.main(["--data", str(data_file), "--output", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {out}: record 0 does not belong to this input data")


def test_server_problems_before_any_work(data_file, tmp_path, capsys, closed_port):  # noqa: F811 (fixture)
    out = tmp_path / "pairs.jsonl"
    assert pd.main(["--data", str(data_file), "--output", str(out), "--host", f"127.0.0.1:{closed_port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: No Ollama server answers at") and len(err.strip().splitlines()) == 1
    with FakeOllama(models=["mistral:latest"]) as fake:
        assert pd.main(["--data", str(data_file), "--output", str(out), "--host", fake.host]) == 1
    assert "does not have the model 'llama3'" in capsys.readouterr().err
    assert fake.chat_requests == [] and not out.exists()
    assert exit_code(["--data", str(data_file), "--limit", "0"]) == 2
    assert "error: argument --limit: must be a whole number >= 1, got 0" in capsys.readouterr().err
    assert exit_code(["--data", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err == f"error: --data {tmp_path / 'none.json'} does not exist\n"
    assert exit_code(["--data", str(data_file), "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert exit_code(["--data", str(data_file), "--max-tokens", "8"]) == 2  # the old name: --max-new-tokens now
    assert "unrecognized arguments: --max-tokens" in capsys.readouterr().err


def exit_code(argv):
    try:
        return pd.main(argv)
    except SystemExit as exc:  # the parser's one-line errors
        return exc.code


def test_max_new_tokens_is_sent_as_num_predict(data_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    with FakeOllama(["Kindly: 45 kilometers is 45000 meters."]) as fake:
        assert pd.main(["--data", str(data_file), "--limit", "1", "--output", str(out), "--host", fake.host,
                        "--max-new-tokens", "16", "--no-progress"]) == 0
    (request,) = fake.chat_requests
    assert request["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048, "num_predict": 16}
    assert [r["index"] for r in pd.read_jsonl(out)] == [0]


def test_default_output_follows_llmfs_output_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFS_OUTPUT_DIR", str(tmp_path))
    args = pd.parser().parse_args([])
    assert Path(args.output) == tmp_path / "ch07" / "instruction-data-with-preference.jsonl"


# --- against chapter 7's own Ollama-API server ----------------------------------------------------------

def test_generator_against_ch07_serve(data_file, tmp_path, capsys, closed_port):  # noqa: F811 (fixture)
    pytest.importorskip("ch07.serve")
    torch.manual_seed(123)
    model_file = save_finetuned_model(GPTModel(QUICK_CONFIG), tmp_path / "model.safetensors")
    port = closed_port  # free now: the server takes it
    host = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ch07.serve", "--model", str(model_file), "--host", "127.0.0.1",
                             "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, models = time.monotonic() + 90, None
        while models is None:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "ch07.serve did not answer GET /api/tags within 90 s"
            try:
                models = ev.list_models(host, timeout=2)
            except ev.OllamaUnavailable:
                time.sleep(0.5)
        assert models, "ch07.serve lists no model under /api/tags"
        out = tmp_path / "pairs.jsonl"
        assert pd.main(["--data", str(data_file), "--limit", "2", "--output", str(out), "--host", host,
                        "--model", models[0], "--max-new-tokens", "8", "--no-progress"]) == 0
        records = pd.read_jsonl(out) if out.exists() else []
        assert all(r["index"] in (0, 1) and r["chosen"].strip() and r["rejected"].strip() for r in records)
        summary = capsys.readouterr().out.splitlines()[-1]  # "N records written, 0 were there before, M without ..."
        written, invalid = int(summary.split()[0]), int(summary.split(", ")[2].split()[0])
        assert (written, written + invalid) == (len(records), 2)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_generator_request_is_plain_ollama_chat():
    """The request the generator sends is Ollama's documented /api/chat body, as ch07.serve expects."""
    with FakeOllama(["Of course: blue."]) as fake:
        text, why = pd.ask_rewrite(DATA[2], "polite", "quick-sft", fake.host)
    assert (text, why) == ("Of course: blue.", "")
    (request,) = fake.chat_requests
    assert set(request) == {"model", "messages", "stream", "options"}
    assert request["model"] == "quick-sft" and request["stream"] is False
    assert request["messages"] == [{"role": "user", "content": pd.make_rewrite_prompt(DATA[2], "polite")}]
    assert ("POST", "/api/chat") in fake.paths


def test_without_the_instruction_data_file(tmp_path, monkeypatch, capsys):
    import dataclasses

    from llmfs.download import DATA_FILES

    monkeypatch.setenv("LLMFS_DATA_MIRROR", str(tmp_path / "no-mirror"))
    monkeypatch.setenv("LLMFS_CACHE_DIR", str(tmp_path / "cache"))
    spec = DATA_FILES["instruction-data.json"]
    monkeypatch.setitem(DATA_FILES, spec.name, dataclasses.replace(spec, url="http://127.0.0.1:1/x"))
    assert pd.main(["--output", str(tmp_path / "pairs.jsonl")]) == 2
    err = capsys.readouterr().err
    # (pooch reports its download attempt before the error)
    assert any(line.startswith("error: Could not get 'instruction-data.json'") for line in err.splitlines())


# --- an --output file that is not ours is never changed -----------------------------------------------------

def pair_line(i, rewrite):
    """The line the command writes for record i of DATA when the model's rewrite is `rewrite`."""
    chosen, rejected = expected_pair(i, rewrite)
    return json.dumps({**DATA[i], "chosen": chosen, "rejected": rejected, "politeness": plan()[i], "index": i},
                      ensure_ascii=False) + "\n"


NOT_PAIRS = {  # name: (content, the reason the one error line gives)
    "binary, one line": (bytes(b for b in range(256) if b != 10) * 4,
                         "line 1: neither a whole record nor the start of one"),
    "binary, lines": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\n", "line 1: not UTF-8 text"),
    "csv": ("instruction,chosen,rejected\nSay hi.,Hello!,hi\n".encode(), "line 1: not JSON"),
    "json array": (json.dumps(DATA, indent=2).encode(), "line 1: not JSON"),
    "json array, one line": (json.dumps(DATA).encode() + b"\n", "line 1: a JSON array, not an object"),
    "a scores file": (b'{"index": 0, "record": "0123456789abcdef", "model": "llama3", "score": 90}\n',
                      "line 1: a JSON object without 'instruction', 'chosen', 'rejected', 'politeness'"),
    "instruction records": ((json.dumps(DATA[0]) + "\n").encode(),
                            "line 1: a JSON object without 'index', 'chosen', 'rejected', 'politeness'"),
    "someone's torn line": (b'{"name": "Bo', "line 1: neither a whole record nor the start of one"),
    "damage before the end": ((pair_line(0, "Kindly, 45 km.") + "oops\n" + pair_line(1, "Sure: he goes home."))
                              .encode(), "line 2: not JSON"),
}


@pytest.mark.parametrize("kind", NOT_PAIRS)
def test_output_of_another_kind_is_refused_and_left_as_it_was(kind, data_file, tmp_path, capsys):
    content, why = NOT_PAIRS[kind]
    out = tmp_path / "pairs.jsonl"
    out.write_bytes(content)
    with FakeOllama(["Kindly: blue."] * 8) as fake:
        rc = pd.main(["--data", str(data_file), "--output", str(out), "--host", fake.host, "--no-progress"])
    assert rc == 2
    assert capsys.readouterr().err == (f"error: --output {out} is not a preference-pairs file of this command "
                                       f"({why}); it was left as it is: choose another --output file\n")
    assert out.read_bytes() == content
    assert fake.paths == []  # refused before the server is asked anything


def test_output_that_is_the_data_file_is_refused(data_file, tmp_path, capsys, closed_port):  # noqa: F811
    content = data_file.read_bytes()
    link = tmp_path / "link.json"
    link.symlink_to(data_file)
    for out in (data_file, link):
        assert pd.main(["--data", str(data_file), "--output", str(out), "--host", f"127.0.0.1:{closed_port}"]) == 2
        assert capsys.readouterr().err == (f"error: --output {out} is the instruction data (--data); the pairs go "
                                           "to a .jsonl file of their own, e.g. instruction-data-with-preference.jsonl\n")
    assert data_file.read_bytes() == content


def test_the_reported_truncation(data_file, tmp_path, capsys, closed_port):  # noqa: F811 (fixture)
    """The issue: a file given as --output was cut to 0 bytes, and then the server was not there."""
    out = tmp_path / "notes.txt"
    content = b"my notes, without a newline at the end"
    out.write_bytes(content)
    assert pd.main(["--data", str(data_file), "--output", str(out), "--host", f"127.0.0.1:{closed_port}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --output {out} is not a preference-pairs file")
    assert out.read_bytes() == content


def test_output_is_repaired_only_after_the_server_was_checked(data_file, tmp_path, capsys, closed_port):  # noqa: F811
    out = tmp_path / "pairs.jsonl"
    content = (pair_line(0, "Kindly, 45 km is 45000 m.") + pair_line(1, "Sure: he goes home.")[:30]).encode()
    out.write_bytes(content)
    argv = ["--data", str(data_file), "--output", str(out), "--limit", "2", "--no-progress"]
    assert pd.main([*argv, "--host", f"127.0.0.1:{closed_port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: No Ollama server answers at") and len(err.splitlines()) == 1
    assert out.read_bytes() == content
    with FakeOllama(["Sure: he goes home."]) as fake:
        assert pd.main([*argv, "--host", fake.host]) == 0
    assert len(fake.chat_requests) == 1
    assert out.read_text() == pair_line(0, "Kindly, 45 km is 45000 m.") + pair_line(1, "Sure: he goes home.")


def test_read_jsonl_never_cuts_a_file_that_is_not_jsonl(tmp_path):
    path = tmp_path / "data.bin"
    content = b"\x00\x01binary without a newline"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="line 1"):
        pd.read_jsonl(path, repair=True)
    path.write_bytes(content := b'{"name": "a lone line, not after records"')
    with pytest.raises(ValueError, match="line 1"):
        pd.read_jsonl(path, repair=True)
    assert path.read_bytes() == content


# --- a server that stalls; Ctrl-C -----------------------------------------------------------------------------

@pytest.mark.parametrize("hang", [SILENT, STALL, TRICKLE], ids=["silent", "headers-then-stall", "trickle"])
def test_a_reply_that_never_ends_stops_at_the_timeout(hang, data_file, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    with FakeOllama(["Kindly: 45 kilometers is 45000 meters.", hang]) as fake:
        start = time.monotonic()
        rc = pd.main(["--data", str(data_file), "--output", str(out), "--host", fake.host, "--timeout", "1",
                      "--no-progress"])
        seconds = time.monotonic() - start
    assert rc == 1 and seconds < 5, seconds
    assert capsys.readouterr().err == (f"error: the server at {fake.host} stopped answering (no complete reply "
                                       f"within 1 s) after 1 new records; they are saved in {out}: run the same "
                                       "command again to continue.\n")
    assert out.read_text() == pair_line(0, "Kindly: 45 kilometers is 45000 meters.")


def test_ctrl_c_says_what_is_kept_in_one_line(data_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pairs.jsonl"
    real_query = pd.query_model

    def query(*args, **kwargs):
        if len(fake.chat_requests) == 2:
            raise KeyboardInterrupt
        return real_query(*args, **kwargs)

    monkeypatch.setattr(pd, "query_model", query)
    with FakeOllama(["Kindly: 45 kilometers is 45000 meters.", "Sure: he goes home."]) as fake:
        rc = pd.main(["--data", str(data_file), "--output", str(out), "--host", fake.host, "--no-progress"])
    assert rc == 130
    assert capsys.readouterr().err == (f"\ninterrupted: 2 new records (2 of 5 in all) are saved in {out}; run the "
                                       "same command again to continue\n")
    assert out.read_text() == pair_line(0, "Kindly: 45 kilometers is 45000 meters.") + pair_line(1, "Sure: he goes home.")


def test_ctrl_c_in_a_real_run(data_file, tmp_path):
    """`python -m ch07.dpo.preference_data`, interrupted by SIGINT while the model works on record 2."""
    out = tmp_path / "pairs.jsonl"
    out.write_text(pair_line(0, "Kindly: 45 kilometers is 45000 meters."))  # from an earlier run
    with FakeOllama(["Sure: he goes home.", SILENT]) as fake:
        returncode, err = interrupt_real_run("ch07.dpo.preference_data", ["--data", str(data_file), "--output",
                                                                          str(out)], fake, 2)
    assert returncode == 130, err
    assert stderr_lines(err) == [f"interrupted: 1 new records (2 of 5 in all) are saved in {out}; run the same "
                                 "command again to continue"]
    assert out.read_text() == pair_line(0, "Kindly: 45 kilometers is 45000 meters.") + pair_line(1, "Sure: he goes home.")
