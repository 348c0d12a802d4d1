"""Tests for ch05/gpt_download.py, without network.

A tiny GPT-2 with random weights is built with Hugging Face `transformers` (the reference
implementation) and saved in the Hub's format; our loader must reproduce its logits and its
greedy generations exactly. Everything that would touch the network runs with
HF_HUB_OFFLINE=1 and an empty cache, and must fail with a clear PretrainedWeightsUnavailable.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ch04.gpt import GPTModel, count_parameters
from ch05 import gpt_download
from ch05.cli import download_main
from ch05.gpt_download import (
    GPT2_MODEL_NAMES,
    PretrainedWeightsUnavailable,
    assign,
    book_params_to_hf,
    canonical_model_name,
    download_and_load_gpt2,
    download_gpt2_safetensors,
    gpt2_config,
    hf_params_to_book,
    load_gpt2_params,
    load_pretrained_gpt2,
    load_weights_into_gpt,
)
from ch05.gpt_generate import generate
from stalling_server import StallingServer, hub_files, stall_body, trickle, use_hub_endpoint

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HF_DIMS = dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=300)



@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A seeded random GPT2LMHeadModel saved with save_pretrained (safetensors, 'transformer.' keys)."""
    torch.manual_seed(42)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_DIMS)).eval()
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(path)
    return path, model


@pytest.fixture
def hf_params(hf_dir):
    return load_file(str(hf_dir[0] / "model.safetensors"))


TINY_CFG = {**gpt2_config("gpt2"), "vocab_size": 300, "context_length": 32, "emb_dim": 64, "n_heads": 4,
            "n_layers": 2, "drop_rate": 0.0}


def ours_for(params, **overrides) -> GPTModel:
    return load_weights_into_gpt(GPTModel({**TINY_CFG, **overrides}), params).eval()


def test_logits_match_huggingface(hf_dir):
    path, hf = hf_dir
    ours = load_pretrained_gpt2(path)
    assert not ours.training
    idx = torch.randint(0, 300, (3, 32))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert ours.cfg["emb_dim"] == 64 and ours.cfg["n_heads"] == 4 and ours.cfg["context_length"] == 32


def test_greedy_generation_matches_huggingface(hf_dir):
    path, hf = hf_dir
    ours = load_pretrained_gpt2(path)
    for prompt_len in (1, 4, 10):
        idx = torch.randint(0, 300, (1, prompt_len))
        new = 32 - prompt_len
        theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        for use_cache in (False, True):
            mine = generate(ours, idx, max_new_tokens=new, context_size=32, use_cache=use_cache)
            assert torch.equal(mine, theirs), (prompt_len, use_cache)


def test_output_head_is_tied_to_the_token_embedding(hf_dir):
    ours = load_pretrained_gpt2(hf_dir[0])
    assert ours.out_head.weight is ours.tok_emb.weight
    assert ours.cfg["tie_weights"] is True
    assert count_parameters(ours) == sum(p.numel() for p in hf_dir[1].parameters())


def test_hub_style_keys_without_prefix_and_extra_buffers(hf_dir, hf_params, tmp_path):
    """Hub files name tensors 'h.0...' (no 'transformer.') and may carry the attn.bias mask buffers."""
    hub = {k.removeprefix("transformer."): v.contiguous() for k, v in hf_params.items()}
    hub["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    hub["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(hub, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_dir[0] / "config.json").read_text())
    a, b = load_pretrained_gpt2(tmp_path), load_pretrained_gpt2(hf_dir[0])
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    # a .safetensors file path works too (its config.json sits beside it)
    c = load_pretrained_gpt2(tmp_path / "model.safetensors")
    assert torch.equal(c.out_head.weight, b.out_head.weight)


def test_weights_file_without_config_json_guesses_heads(hf_params, tmp_path):
    save_file({k: v.contiguous() for k, v in hf_params.items()}, str(tmp_path / "bare.safetensors"))
    with pytest.warns(UserWarning, match="assuming 1 heads"):
        cfg, _ = load_gpt2_params(tmp_path / "bare.safetensors")
    assert (cfg["emb_dim"], cfg["n_layers"], cfg["context_length"], cfg["vocab_size"]) == (64, 2, 32, 300)


def test_split_of_the_fused_qkv_projection(hf_params):
    ours = ours_for(hf_params)
    c_attn_w = hf_params["transformer.h.1.attn.c_attn.weight"]  # Conv1D: (in, 3 * out)
    c_attn_b = hf_params["transformer.h.1.attn.c_attn.bias"]
    att = ours.trf_blocks[1].att
    for i, layer in enumerate((att.W_query, att.W_key, att.W_value)):
        assert torch.equal(layer.weight, c_attn_w[:, i * 64:(i + 1) * 64].T)
        assert torch.equal(layer.bias, c_attn_b[i * 64:(i + 1) * 64])
    assert torch.equal(ours.trf_blocks[0].ff.layers[0].weight, hf_params["transformer.h.0.mlp.c_fc.weight"].T)
    assert torch.equal(ours.final_norm.scale, hf_params["transformer.ln_f.weight"])


def test_wrong_shape_names_the_tensor_and_both_shapes(hf_params):
    bad = dict(hf_params)
    bad["transformer.h.1.mlp.c_fc.weight"] = bad["transformer.h.1.mlp.c_fc.weight"][:, :255]
    model = GPTModel(TINY_CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight.*\(64, 255\).*\(64, 256\)"):
        load_weights_into_gpt(model, bad)
    # nothing was copied before the check failed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_and_file_disagree(hf_dir, hf_params, tmp_path):
    """config.json says n_embd 64, but one tensor was edited to another width."""
    edited = {k: v.contiguous() for k, v in hf_params.items()}
    edited["transformer.h.0.ln_2.weight"] = torch.ones(65)
    save_file(edited, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_dir[0] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"h\.0\.ln_2\.weight.*\(65,\).*\(64,\)"):
        load_pretrained_gpt2(tmp_path)


def test_missing_and_surplus_tensors(hf_params):
    missing = {k: v for k, v in hf_params.items() if k != "transformer.h.1.ln_2.bias"}
    with pytest.raises(ValueError, match=r"h\.1\.ln_2\.bias.*missing"):
        ours_for(missing)
    surplus = {**hf_params, "transformer.h.2.ln_1.weight": torch.ones(64)}
    with pytest.raises(ValueError, match=r"h\.2\.ln_1\.weight"):
        ours_for(surplus)


def test_model_without_qkv_bias_is_refused(hf_params):
    model = GPTModel({**TINY_CFG, "qkv_bias": False})
    with pytest.raises(ValueError, match="qkv_bias=True"):
        load_weights_into_gpt(model, hf_params)


def test_unsupported_config_json(hf_dir, hf_params, tmp_path):
    save_file({k: v.contiguous() for k, v in hf_params.items()}, str(tmp_path / "model.safetensors"))
    cfg = json.loads((hf_dir[0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function"):
        load_gpt2_params(tmp_path)


# --- names, configs, downloads -----------------------------------------------------------------

def test_names_and_book_aliases():
    assert GPT2_MODEL_NAMES == ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    for alias, name in [("124M", "gpt2"), ("355M", "gpt2-medium"), ("774m", "gpt2-large"),
                        ("1558M", "gpt2-xl"), ("gpt2-small (124M)", "gpt2"), ("gpt2-xl (1558M)", "gpt2-xl"),
                        ("openai-community/gpt2-medium", "gpt2-medium"), ("gpt2", "gpt2")]:
        assert canonical_model_name(alias) == name
    with pytest.raises(ValueError, match="unknown GPT-2 model"):
        canonical_model_name("gpt3")


@pytest.mark.parametrize("name,params", [("gpt2", 124_439_808), ("355M", 354_823_168),
                                         ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_gpt2_config_sizes(name, params):
    cfg = gpt2_config(name)
    assert cfg["context_length"] == 1024 and cfg["qkv_bias"] is True and cfg["vocab_size"] == 50257
    with torch.device("meta"):  # shapes only: no memory, instant
        model = GPTModel(cfg)
    assert count_parameters(model) == params
    assert gpt2_config("gpt2", drop_rate=0.0)["drop_rate"] == 0.0


def test_offline_without_cache_raises_a_helpful_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        download_gpt2_safetensors("gpt2", cache_dir=tmp_path)
    msg = str(info.value)
    assert "HF_ENDPOINT" in msg and "HF_HUB_OFFLINE" in msg and "local path" in msg
    monkeypatch.setattr(gpt_download, "download_gpt2_safetensors",
                        lambda name, cache_dir=None: download_gpt2_safetensors(name, cache_dir=tmp_path))
    with pytest.raises(PretrainedWeightsUnavailable, match="HF_ENDPOINT"):
        load_pretrained_gpt2("124M")


def test_unreachable_endpoint_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(PretrainedWeightsUnavailable, match="cannot be reached"):
        download_gpt2_safetensors("gpt2", cache_dir=tmp_path)


def test_missing_local_path_raises(tmp_path):
    with pytest.raises(PretrainedWeightsUnavailable, match="no such file"):
        load_gpt2_params(tmp_path / "absent" / "model.safetensors")
    with pytest.raises(PretrainedWeightsUnavailable, match="model.safetensors"):
        load_gpt2_params(tmp_path)  # a folder without the weights file


def test_download_arguments(monkeypatch, hf_dir):
    """The hub call: right repository and file, the mirror from HF_ENDPOINT, cache only when offline."""
    import llmfs.download

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(hf_dir[0] / "model.safetensors")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(llmfs.download, "reachable", lambda url, timeout: True)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    path = download_gpt2_safetensors("355M", cache_dir="/somewhere")
    assert path == hf_dir[0] / "model.safetensors"
    assert calls[-1] == {"repo_id": "openai-community/gpt2-medium", "filename": "model.safetensors",
                         "cache_dir": "/somewhere", "endpoint": "https://mirror.example",
                         "local_files_only": False}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    download_gpt2_safetensors("gpt2")
    assert calls[-1]["local_files_only"] is True and calls[-1]["repo_id"] == "openai-community/gpt2"


def test_download_cli_exit_code(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download_main(["gpt2", "--cache-dir", str(tmp_path)]) == 2
    assert "HF_ENDPOINT" in capsys.readouterr().err


def test_tensorflow_is_never_imported(hf_dir):
    code = ("import sys; from ch05.gpt_download import load_pretrained_gpt2; import ch05.gpt_generate; "
            f"load_pretrained_gpt2({str(hf_dir[0])!r}); "
            "assert not any(m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras') for m in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for src in (REPO / "ch05").glob("*.py"):
        assert "tensorflow" not in src.read_text().replace("TensorFlow", "")


# --- the book's names: download_and_load_gpt2, nested params, assign ---------------------------------

@pytest.fixture
def book_models_dir(hf_dir, tmp_path):
    """A models_dir as the book's call expects it, its "124M" folder holding the tiny model's files."""
    shutil.copytree(hf_dir[0], tmp_path / "gpt2" / "124M")
    return tmp_path / "gpt2"


def book_config(settings: dict) -> dict:
    """The book's NEW_CONFIG: GPT_CONFIG_124M updated from the settings, with qkv_bias=True."""
    return {**TINY_CFG, "vocab_size": settings["n_vocab"], "context_length": settings["n_ctx"],
            "emb_dim": settings["n_embd"], "n_heads": settings["n_head"], "n_layers": settings["n_layer"],
            "qkv_bias": True, "tie_weights": False}


def test_download_and_load_gpt2_returns_the_books_settings_and_params(hf_dir, book_models_dir):
    settings, params = download_and_load_gpt2(model_size="124M", models_dir=book_models_dir)
    assert settings == {"n_vocab": 300, "n_ctx": 32, "n_embd": 64, "n_head": 4, "n_layer": 2}
    hf = hf_dir[1].transformer
    assert sorted(params) == ["b", "blocks", "g", "wpe", "wte"] and len(params["blocks"]) == 2
    assert isinstance(params["wte"], np.ndarray) and params["wte"].dtype == np.float32
    np.testing.assert_array_equal(params["wte"], hf.wte.weight.detach().numpy())
    np.testing.assert_array_equal(params["g"], hf.ln_f.weight.detach().numpy())
    block = params["blocks"][1]
    assert sorted(block) == ["attn", "ln_1", "ln_2", "mlp"]
    assert block["attn"]["c_attn"]["w"].shape == (64, 192) and block["attn"]["c_attn"]["b"].shape == (192,)
    assert block["mlp"]["c_fc"]["w"].shape == (64, 256) and block["mlp"]["c_proj"]["w"].shape == (256, 64)
    np.testing.assert_array_equal(block["ln_2"]["g"], hf.h[1].ln_2.weight.detach().numpy())
    np.testing.assert_array_equal(block["mlp"]["c_proj"]["b"], hf.h[1].mlp.c_proj.bias.detach().numpy())


def test_book_params_load_into_gpt_and_match_huggingface(hf_dir, book_models_dir):
    settings, params = download_and_load_gpt2("124M", book_models_dir)
    gpt = GPTModel(book_config(settings))
    assert load_weights_into_gpt(gpt, params) is gpt
    idx = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(gpt.eval()(idx), hf_dir[1](idx).logits, atol=1e-4, rtol=0)
    # The same model as from Hugging Face's flat names: one mapping, two layouts.
    for (name, a), b in zip(gpt.state_dict().items(), ours_for(load_file(str(book_models_dir / "124M" /
                                                                         "model.safetensors"))).state_dict().values()):
        assert torch.equal(a, b), name


def test_book_and_huggingface_layouts_convert_both_ways(hf_params):
    flat = {k.removeprefix("transformer."): v for k, v in hf_params.items()}
    flat = {k: v for k, v in flat.items() if not gpt_download._IGNORED.search(k)}  # mask buffers, lm_head
    back = book_params_to_hf(hf_params_to_book(hf_params))
    assert sorted(back) == sorted(flat)
    for name, tensor in flat.items():
        assert torch.equal(back[name], tensor), name
    broken = hf_params_to_book(hf_params)
    del broken["blocks"][1]["mlp"]["c_fc"]["b"]
    with pytest.raises(ValueError, match="mlp/c_fc/b"):
        load_weights_into_gpt(GPTModel(TINY_CFG), broken)


def test_assign_as_in_listing_5_5(hf_params):
    params = hf_params_to_book(hf_params)
    gpt = GPTModel(TINY_CFG)
    gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe"])
    q_w, k_w, v_w = np.split(params["blocks"][0]["attn"]["c_attn"]["w"], 3, axis=-1)
    gpt.trf_blocks[0].att.W_key.weight = assign(gpt.trf_blocks[0].att.W_key.weight, k_w.T)
    assert isinstance(gpt.pos_emb.weight, torch.nn.Parameter) and gpt.pos_emb.weight.requires_grad
    np.testing.assert_array_equal(gpt.pos_emb.weight.detach().numpy(), params["wpe"])
    assert torch.equal(gpt.trf_blocks[0].att.W_key.weight, ours_for(hf_params).trf_blocks[0].att.W_key.weight)
    params["wpe"][0, 0] += 1.0  # the Parameter holds its own copy
    assert gpt.pos_emb.weight[0, 0] != params["wpe"][0, 0]
    half = torch.zeros(3, 2, dtype=torch.bfloat16)
    assert assign(half, np.ones((3, 2), dtype=np.float32)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"Shape mismatch. Left: torch.Size\(\[32, 64\]\), Right: \(300, 64\)"):
        assign(gpt.pos_emb.weight, params["wte"])


def test_download_and_load_gpt2_sizes_and_offline_cache(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="Model size not in"):
        download_and_load_gpt2("gpt2", tmp_path)
    asked = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(gpt_download, "download_gpt2_safetensors",
                        lambda name, cache_dir=None: asked.append(name) or download_gpt2_safetensors(
                            name, cache_dir=tmp_path / "empty-cache"))
    with pytest.raises(PretrainedWeightsUnavailable, match="HF_HUB_OFFLINE"):
        download_and_load_gpt2("355M", tmp_path / "models")  # no local copy: the Hugging Face cache is asked
    assert asked == ["gpt2-medium"]


# --- a Hugging Face endpoint that stalls: bounded waits, one line, Ctrl-C ------------------------------

GPT2_FILE = "openai-community/gpt2"
WEIGHTS = b"not really weights, " * 100


@pytest.fixture
def short_wait(monkeypatch):
    import llmfs.download

    monkeypatch.setattr(llmfs.download, "NETWORK_WAIT_S", 1.0)


def test_an_endpoint_that_never_answers_is_given_up_on_in_bounded_time(monkeypatch, tmp_path, capsys, short_wait):
    """A server that accepts connections but never replies: a bounded wait, then one line naming it."""
    with StallingServer() as server:
        use_hub_endpoint(monkeypatch, server.url, tmp_path)
        start = time.monotonic()
        with pytest.raises(PretrainedWeightsUnavailable, match="did not answer within 1 s"):
            download_gpt2_safetensors("gpt2", cache_dir=tmp_path)
        assert time.monotonic() - start < 5
        assert download_main(["gpt2", "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and f"{server.url} (HF_ENDPOINT)" in err
    assert "HF_HUB_OFFLINE" in err and "local path" in err


def test_a_body_that_stalls_ends_in_one_line_without_retry_messages(monkeypatch, tmp_path, capsys, short_wait):
    """Headers, a few bytes, then nothing: huggingface_hub would retry six times, ten seconds each, and say so."""
    with StallingServer(hub_files(GPT2_FILE, WEIGHTS, stall_body(len(WEIGHTS), WEIGHTS[:50]))) \
            as server:
        use_hub_endpoint(monkeypatch, server.url, tmp_path)
        start = time.monotonic()
        assert download_main(["gpt2", "--cache-dir", str(tmp_path / "cache")]) == 2
        elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert elapsed < 6 and [m for m, _ in server.requests].count("GET") <= 2
    assert err.count("\n") == 1 and err.startswith("error: GPT-2 weights 'gpt2' (openai-community/gpt2) are not")
    assert f"{server.url} (HF_ENDPOINT) stopped sending data for 1 s" in err


def test_a_slow_download_that_keeps_sending_is_not_cut_off(monkeypatch, tmp_path, short_wait):
    """2 s of data with no pause of 1 s: the bound is on waiting, not on downloading."""
    with StallingServer(hub_files(GPT2_FILE, WEIGHTS, trickle(WEIGHTS, 6, 0.4))) as server:
        use_hub_endpoint(monkeypatch, server.url, tmp_path)
        start = time.monotonic()
        path = download_gpt2_safetensors("gpt2", cache_dir=tmp_path)
    assert time.monotonic() - start > 1.5 and path.read_bytes() == WEIGHTS


def test_a_cached_copy_serves_when_the_endpoint_stalls(monkeypatch, tmp_path, short_wait):
    with StallingServer(hub_files(GPT2_FILE, WEIGHTS)) as server:
        use_hub_endpoint(monkeypatch, server.url, tmp_path)
        cached = download_gpt2_safetensors("gpt2", cache_dir=tmp_path)
    with StallingServer() as silent:
        use_hub_endpoint(monkeypatch, silent.url, tmp_path)
        start = time.monotonic()
        assert download_gpt2_safetensors("gpt2", cache_dir=tmp_path) == cached
        assert time.monotonic() - start < 5 and silent.requests  # it asked, and then used the cache


@pytest.mark.skipif(sys.platform == "win32", reason="Windows delivers Ctrl-C only once a blocking "
                    "socket call returns, and os.kill(SIGINT) would end the test process")
def test_ctrl_c_during_a_stalled_download_is_one_line(monkeypatch, tmp_path, capsys):
    with StallingServer(hub_files(GPT2_FILE, WEIGHTS, stall_body(len(WEIGHTS)))) as server:
        use_hub_endpoint(monkeypatch, server.url, tmp_path)
        start = time.monotonic()
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        assert download_main(["gpt2", "--cache-dir", str(tmp_path / "cache")]) == 130
    assert time.monotonic() - start < 5
    assert capsys.readouterr().err == "\ninterrupted\n"
