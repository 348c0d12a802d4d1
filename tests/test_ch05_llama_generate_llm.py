"""python -m ch05.llama (ch05/llama/generate_llm.py): one command for Llama 3, Qwen3, GPT-2 folders and our checkpoints."""

import json
import os
import shutil
import signal
import sys
import threading
import time

import pytest
import torch

from ch05.llama import generate_llm
from ch05.llama.generate_llm import generate_text, load_llm, main
from hf_tiny import model_dir_fixture
from stalling_server import COMMIT, StallingServer, answer, hub_files, stall_body, use_hub_endpoint

PROMPT = "I had always thought Jack Gisburn rather a cheap genius"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return model_dir_fixture(tmp_path_factory, "qwen3")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return model_dir_fixture(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return model_dir_fixture(tmp_path_factory, "gemma3_text")


def _hf_continuation(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("fixture", ["qwen_dir", "llama_dir", "gemma_dir"])
def test_cli_prints_the_same_greedy_text_as_transformers(fixture, request, capsys):
    path, hf = request.getfixturevalue(fixture)
    assert main(["--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "12", "--device", "cpu"]) == 0
    llm = load_llm(path)
    expected = llm.tokenizer.decode(_hf_continuation(hf, llm.tokenizer.encode(PROMPT), 12))
    assert capsys.readouterr().out == PROMPT + expected + "\n"


def test_gemma3_chat_prompt_and_end_of_turn(gemma_dir, tmp_path, capsys):
    """A Gemma 3 folder (gemma3_text) through the same loader: its chat format, stopped at <end_of_turn>;
    the multimodal model_type 'gemma3' is refused in one line."""
    path, hf = gemma_dir
    llm = load_llm(path)
    assert llm.family == "gemma3_text" and llm.description.startswith("gemma3_text from ")
    ids = llm.tokenizer.encode("Hello", chat=True, system="Be brief.")
    expected = _hf_continuation(hf, ids, 8)
    _, new = generate_text(llm, "Hello", max_new_tokens=8, chat=True, system="Be brief.")
    assert new == expected
    end_id = llm.tokenizer.token_id("<end_of_turn>")
    llm.model.out_head.register_forward_hook(lambda module, inputs, out: out.index_fill_(-1, torch.tensor([end_id]),
                                                                                         1e4))
    assert generate_text(llm, "Hello", max_new_tokens=8, chat=True) == ("", [])
    other = tmp_path / "multimodal"
    shutil.copytree(path, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma3"}))
    assert main(["--model", str(other), "--prompt", "Hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "multimodal 'gemma3' model" in err and "\n" not in err


def test_chat_stops_before_the_end_of_turn_token(qwen_dir):
    path, _ = qwen_dir
    llm = load_llm(path)
    free_text, free_ids = generate_text(llm, "Hello", max_new_tokens=10, chat=True)
    assert len(free_ids) == 10
    end_id, calls = llm.tokenizer.token_id("<|im_end|>"), []

    def force_end_at_step_4(module, inputs, out):
        calls.append(1)
        if len(calls) == 4:
            out[..., end_id] += 1e4
        return out

    llm.model.out_head.register_forward_hook(force_end_at_step_4)
    text, ids = generate_text(llm, "Hello", max_new_tokens=10, chat=True)
    assert ids == free_ids[:3] and text == llm.tokenizer.decode(free_ids[:3])
    assert len(calls) == 4  # generation ended at the end-of-turn token instead of running on


def test_chat_prompt_is_the_familys_format(qwen_dir, llama_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(generate_llm, "generate", lambda model, idx, **kw: seen.append(idx[0].tolist()) or idx)
    for path, _ in (qwen_dir, llama_dir):
        llm = load_llm(path)
        generate_text(llm, "Hi", max_new_tokens=1, chat=True)
        assert seen[-1] == llm.tokenizer.encode("Hi", chat=True)
    assert main(["--model", str(qwen_dir[0]), "--prompt", "Hi", "--chat", "--think", "--max-new-tokens", "1"]) == 0
    assert llm.tokenizer.token_id("<think>") not in seen[-1]  # thinking on: no pre-filled empty <think> block


@pytest.fixture(scope="module")
def gpt_dirs(tmp_path_factory):
    """A tiny Hugging Face GPT-2 folder and a tiny chapter-5 model.safetensors folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ch04.gpt import GPTModel
    from llmfs.checkpoint import save_model

    path = tmp_path_factory.mktemp("gpt")
    torch.manual_seed(123)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    hf.save_pretrained(path / "gpt2")
    ours = GPTModel({"vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 1,
                     "drop_rate": 0.0, "qkv_bias": False}).eval()
    save_model(ours, path / "mine" / "model.safetensors")
    return path, hf, ours


def test_gpt2_folder_and_our_checkpoint_run_through_the_same_command(gpt_dirs, capsys):
    from ch02.tokenizer import get_gpt2_tokenizer
    from ch05.gpt_generate import generate

    tmp_path, hf, ours = gpt_dirs
    ids = get_gpt2_tokenizer().encode(PROMPT)
    with torch.no_grad():
        expected_hf = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected_ours = generate(ours, torch.tensor([ids]), 8, 64)
    for where, expected in ((tmp_path / "gpt2", expected_hf), (tmp_path / "mine", expected_ours)):
        assert main(["--model", str(where), "--prompt", PROMPT, "--max-new-tokens", "8"]) == 0
        tokens = [t for t in expected[0].tolist() if t != 50256]
        assert capsys.readouterr().out == get_gpt2_tokenizer().decode(tokens) + "\n"


def _run_error(capsys, argv) -> str:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's one-line errors (llmfs.cli.Parser)
        rc = exc.code
    assert rc == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.count("error:") == 1
    return captured.err


def test_bad_inputs_exit_2_with_one_clear_message(tmp_path, qwen_dir, gpt_dirs, capsys, monkeypatch):
    path, _ = qwen_dir
    base = ["--prompt", "Hi", "--max-new-tokens", "2"]

    unknown = tmp_path / "unknown"
    shutil.copytree(path, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    assert "describes a 'mistral' model" in _run_error(capsys, ["--model", str(unknown), *base])

    no_tok = tmp_path / "no_tok"
    shutil.copytree(path, no_tok)
    (no_tok / "tokenizer.json").unlink()
    monkeypatch.setitem(generate_llm.FAMILIES, "qwen3",
                        (lambda *a, **k: pytest.fail("weights loaded before the tokenizer was checked"),
                         generate_llm.Qwen3Tokenizer))
    assert "tokenizer.json is missing" in _run_error(capsys, ["--model", str(no_tok), *base])
    monkeypatch.undo()

    shapes = tmp_path / "shapes"
    shutil.copytree(path, shapes)
    (shapes / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    assert "missing keys: ['trf_blocks.2." in _run_error(capsys, ["--model", str(shapes), *base])

    long_prompt = "the " * 200
    err = _run_error(capsys, ["--model", str(path), "--prompt", long_prompt])
    assert "the prompt is" in err and "context holds 128" in err

    assert "no chat format" in _run_error(capsys, ["--model", str(gpt_dirs[0] / "gpt2"), *base, "--chat"])
    assert "--think is for Qwen3" in _run_error(capsys, ["--model", str(gpt_dirs[0] / "mine"), *base, "--chat",
                                                         "--think"])
    assert "no model folder at" in _run_error(capsys, ["--model", str(tmp_path / "nothing.pth"), *base])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert "HF_HUB_OFFLINE=1 is set" in _run_error(capsys, ["--model", "Qwen/Qwen3-0.6B", *base])
    assert "--top-k: must be a whole number >= 1" in _run_error(capsys, ["--model", str(path), *base, "--top-k", "0"])
    # a longer context than the model has is refused, not silently run past its positions
    err = _run_error(capsys, ["--model", str(path), *base, "--context-length", "129"])
    assert "--context-length 129 is longer than the 128 positions" in err
    for gpt in (str(gpt_dirs[0] / "gpt2"), str(gpt_dirs[0] / "mine")):
        err = _run_error(capsys, ["--model", gpt, *base, "--context-length", "64"])
        assert "is a GPT model, whose positions are learned" in err


def test_bad_config_and_options_fail_before_the_weights_load(tmp_path, qwen_dir, capsys, monkeypatch):
    path, _ = qwen_dir
    base = ["--prompt", "Hi", "--max-new-tokens", "2"]
    monkeypatch.setitem(generate_llm.FAMILIES, "qwen3",
                        (lambda *a, **k: pytest.fail("weights loaded before config.json was checked"),
                         generate_llm.Qwen3Tokenizer))
    cfg = json.loads((path / "config.json").read_text())
    for name, text, message in [
        ("not_json", '{"model_type": "qwen3", ', "config.json is not valid JSON"),
        ("a_list", "[1, 2]", "config.json holds a list, not a model config (an object)"),
        ("no_layers", json.dumps({k: v for k, v in cfg.items() if k != "num_hidden_layers"}),
         "config.json lacks ['num_hidden_layers']: not a Llama or Qwen3 config.json"),
        ("sliding", json.dumps({**cfg, "use_sliding_window": True}), "config.json turns on sliding-window attention"),
    ]:
        folder = tmp_path / name
        shutil.copytree(path, folder)
        (folder / "config.json").write_text(text)
        assert message in _run_error(capsys, ["--model", str(folder), *base])
    monkeypatch.undo()
    for argv, message in [(["--system", "Be brief."], "error: --system and --think only apply with --chat"),
                          (["--context-length", "1"], "argument --context-length: must be a whole number >= 2"),
                          (["--max-new-tokens", "-3"], "argument --max-new-tokens: must be a whole number >= 0"),
                          (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
                          (["--device", "tpu"], "argument --device: ")]:
        assert message in _run_error(capsys, ["--model", str(path), *base, *argv])


def test_help_names_the_command_and_a_bug_keeps_its_traceback(qwen_dir, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m ch05.llama ")

    def broken_generate(*args, **kwargs):
        raise ValueError("a bug, not the user's mistake")

    monkeypatch.setattr(generate_llm, "generate", broken_generate)
    with pytest.raises(ValueError, match="a bug"):  # not turned into `error:` and exit code 2
        main(["--model", str(qwen_dir[0]), "--prompt", "Hi", "--max-new-tokens", "2"])


# --- a Hub id whose endpoint stalls: one line after the wait; Ctrl-C: one line at once ---------------------

QWEN = "Qwen/Qwen3-0.6B"


def _qwen_listing(file_reply):
    """A Hub endpoint that lists QWEN's two files quickly and then serves them with `file_reply`."""
    listing = json.dumps({"id": QWEN, "sha": COMMIT, "siblings": [{"rfilename": "config.json"},
                                                                 {"rfilename": "model.safetensors"}]}).encode()
    tree = json.dumps([{"type": "file", "path": name, "size": 1000, "oid": "0" * 40}
                       for name in ("config.json", "model.safetensors")]).encode()
    return [("GET", f"/api/models/{QWEN}/tree/", answer(200, tree)), ("GET", f"/api/models/{QWEN}", answer(200, listing)),
            *hub_files(QWEN, b"x" * 1000, file_reply)]


def test_a_hub_id_downloads_from_an_endpoint_that_answers(tmp_path, monkeypatch):
    """The bounds leave a working endpoint alone: the listing, the metadata and both files come through."""
    from ch05.llama.llama3 import resolve_model_dir

    with StallingServer(_qwen_listing(None)) as server:
        use_hub_endpoint(monkeypatch, server.url, tmp_path)
        folder = resolve_model_dir(QWEN, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == b"x" * 1000


def test_a_hub_id_whose_endpoint_never_answers_is_one_error_line(tmp_path, monkeypatch, capsys):
    import llmfs.download

    monkeypatch.setattr(llmfs.download, "NETWORK_WAIT_S", 1.0)
    with StallingServer() as server:
        use_hub_endpoint(monkeypatch, server.url, tmp_path)
        start = time.monotonic()
        err = _run_error(capsys, ["--model", QWEN, "--prompt", "Hi"])
        assert time.monotonic() - start < 5
    assert err.count("\n") == 1
    assert f"model '{QWEN}' is not available: not in the local Hugging Face cache, and {server.url} " \
           "(HF_ENDPOINT) did not answer within 1 s" in err


@pytest.mark.skipif(sys.platform == "win32", reason="Windows delivers Ctrl-C only once a blocking "
                    "socket call returns, and os.kill(SIGINT) would end the test process")
def test_ctrl_c_while_the_files_stall_ends_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    """The files download in huggingface_hub's threads: Ctrl-C stops them too, so the command ends now."""
    with StallingServer(_qwen_listing(stall_body(1000, b"x"))) as server:
        use_hub_endpoint(monkeypatch, server.url, tmp_path)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        assert main(["--model", QWEN, "--prompt", "Hi"]) == 130
        assert time.monotonic() - start < 6
        assert any(m == "GET" and f"/{QWEN}/resolve/{COMMIT}/" in p for m, p in server.requests)  # in the files
    err = capsys.readouterr().err
    assert err.endswith("\ninterrupted\n") and "Traceback" not in err and "error" not in err
