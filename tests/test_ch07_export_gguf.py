"""Tests for ch07/export_gguf and llmfs/gguf_export.py: a tiny GPTModel (GPT-2's vocabulary, so GPT-2's
tokenizer fits) written as GGUF in f32/f16/q8_0, read back with gguf's reader, run by llama.cpp
(llama-cpp-python) with the same greedy tokens and logits as ours, GPT-2's tokenizer in the file
tokenizing as tiktoken does, the Modelfile, LoRA merged before export, and the command's checks.

The llama.cpp tests skip, saying why, only where `llama_cpp` is not installed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT_CONFIG_124M, GPTModel, generate_text_simple
from ch07.export_gguf import export_gguf as ex
from ch07.gpt_instruction_finetuning import save_finetuned_model
from llmfs.checkpoint import save_checkpoint, save_model
from llmfs.gguf_export import open_llama_cpp

gguf = pytest.importorskip("gguf", reason="the GGUF export needs llama.cpp's gguf package (pip install gguf)")

try:
    import llama_cpp
except ImportError:
    if os.environ.get("LLMFS_REQUIRE_LLAMA_CPP"):  # .ci/run builds llama.cpp: there a missing one fails
        raise
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed "
                                     "(pip install llama-cpp-python; CI builds it)")

REPO = Path(__file__).resolve().parents[1]
# Tiny but GPT-2's vocabulary; emb_dim a multiple of 32 so q8_0 quantizes every matrix.
TINY = {**GPT_CONFIG_124M, "context_length": 48, "emb_dim": 64, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0,
        "qkv_bias": True}
PROMPTS = ["Every effort moves you", "The quick brown fox", "Hello, world! 123"]
NEW_TOKENS = 12
# f16 / q8_0: the share of greedy steps where llama.cpp's file picks our token, and the largest logit
# difference. Measured on the tiny model with llama-cpp-python 0.3.36: f16 36/36 steps, 0.0011;
# q8_0 34/36 steps, 0.030 (the test prints them). Floors with room, not figures.
AGREEMENT_FLOOR = {"f16": 0.9, "q8_0": 0.8}
MAX_LOGIT_DIFFERENCE = {"f16": 0.01, "q8_0": 0.1}


def tiny_model(seed: int = 123, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel({**TINY, **overrides}).eval()
    with torch.no_grad():  # biases and norm parameters away from 0 / 1, so a mix-up of them shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {t: ex.export_gguf(model, folder / f"tiny-{t}.gguf", t)[0] for t in ("f32", "f16", "q8_0")}


def our_greedy(model: GPTModel, ids: list[int], n: int) -> list[int]:
    out = generate_text_simple(model, torch.tensor([ids]), n, model.cfg["context_length"])
    return out[0, len(ids):].tolist()


# --- The tokenizer and the file ---------------------------------------------------------------------------

def test_vocab_is_gpt2s_tokens_and_merges():
    vocab = ex.gpt2_gguf_vocab()
    assert len(vocab.tokens) == 50257 and len(vocab.merges) == 50000
    assert vocab.tokens[50256] == "<|endoftext|>" and vocab.token_types[50256] == 3
    assert vocab.tokens[220] == "Ġ" and set(vocab.token_types[:50256]) == {1}
    # GPT-2's merges.txt begins so; every merge joins two tokens into a third of the vocabulary
    assert vocab.merges[:4] == ["Ġ t", "Ġ a", "h e", "i n"]
    index = {t: i for i, t in enumerate(vocab.tokens)}
    ranks = [index["".join(m.split(" "))] for m in vocab.merges]
    assert ranks == sorted(ranks) and all(a in index and b in index for a, b in (m.split(" ") for m in vocab.merges))


@pytest.fixture(scope="module")
def readers(exported):
    """gguf's reader on the f32 and q8_0 files (it parses the 100,000 vocabulary strings in Python: seconds)."""
    return {t: gguf.GGUFReader(str(exported[t])) for t in ("f32", "q8_0")}


def test_reader_gives_the_tensors_and_settings_back(model, readers):
    ours = dict(ex.gpt_gguf_tensors(model))
    for outtype, reader in readers.items():
        fields = reader.fields

        def value(key):
            f = fields[key]
            return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]][0]

        assert value("general.architecture") == "gpt2"
        assert value("gpt2.context_length") == 48 and value("gpt2.block_count") == 2
        assert value("gpt2.embedding_length") == 64 and value("gpt2.attention.head_count") == 4
        assert value("gpt2.feed_forward_length") == 256
        assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
        assert value("tokenizer.ggml.eos_token_id") == 50256
        tensors = {t.name: t for t in reader.tensors}
        assert set(tensors) == set(ours)
        for name, array in ours.items():
            t = tensors[name]
            back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(array.shape)
            if array.ndim == 1 or outtype == "f32":
                assert t.tensor_type == gguf.GGMLQuantizationType.F32
                np.testing.assert_array_equal(back, array)
            else:  # q8_0: each value within about half a step (the block's max |x| / 127, the scale in f16)
                assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
                blocks = array.reshape(-1, 32)
                step = np.abs(blocks).max(axis=1, keepdims=True) / 127
                assert np.all(np.abs(back.reshape(-1, 32) - blocks) <= 0.6 * step)
    # The fused projection: queries, keys, values one after another
    att = model.trf_blocks[1].att
    qkv = ours["blk.1.attn_qkv.weight"]
    assert qkv.shape == (192, 64)
    np.testing.assert_array_equal(qkv[64:128], att.W_key.weight.detach().numpy())
    np.testing.assert_array_equal(ours["blk.1.attn_qkv.bias"][128:], att.W_value.bias.detach().numpy())


def test_sizes_shrink_with_the_type(exported):
    sizes = {t: p.stat().st_size for t, p in exported.items()}
    assert sizes["q8_0"] < 0.6 * sizes["f16"] < 0.6 * sizes["f32"]


def test_no_qkv_bias_writes_zeros_and_rows_not_in_blocks_fall_back_to_f16(tmp_path):
    model = tiny_model(qkv_bias=False, emb_dim=48, n_heads=4)  # 48 is no multiple of q8_0's 32
    tensors = dict(ex.gpt_gguf_tensors(model))
    assert tensors["blk.0.attn_qkv.bias"].shape == (144,) and not np.any(tensors["blk.0.attn_qkv.bias"])
    kinds = gguf.GGMLQuantizationType
    from llmfs.gguf_export import tensor_type

    assert tensor_type(tensors["blk.0.attn_qkv.weight"], "q8_0") == kinds.F16   # rows of 48
    assert tensor_type(tensors["blk.0.ffn_down.weight"], "q8_0") == kinds.Q8_0  # rows of 192 = 6 x 32
    assert tensor_type(tensors["blk.0.ffn_down.bias"], "q8_0") == kinds.F32
    path, _ = ex.export_gguf(model, tmp_path / "m.gguf", "q8_0")
    assert path.stat().st_size > 0


# --- llama.cpp runs it ------------------------------------------------------------------------------------

F32 = 0  # GGML_TYPE_F32: llama.cpp's KV cache in float32 (its default is f16), to compare with ours


def llama(path: Path, n_ctx: int = 48):
    # llama.cpp's reference CPU kernels, the same on every CPU (`open_llama_cpp`: no AMX / repacked weights)
    return open_llama_cpp(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=1, type_k=F32, type_v=F32)


def llama_greedy(llm, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens from llama.cpp's own logits (argmax, no sampler), and the prompt's logits."""
    llm.reset()
    llm.eval(ids)
    prompt_logits = np.array(llm.scores[:len(ids)])
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out, prompt_logits


@needs_llama_cpp
def test_llama_cpp_f32_gives_our_greedy_tokens_and_logits(model, exported):
    tokenizer = get_gpt2_tokenizer()
    llm = llama(exported["f32"])
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        theirs, logits = llama_greedy(llm, ids, NEW_TOKENS)
        assert theirs == our_greedy(model, ids, NEW_TOKENS), prompt
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        np.testing.assert_allclose(logits, ours, atol=2e-3, rtol=0)


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_llama_cpp_f16_and_q8_0_agree_with_ours(model, exported, outtype):
    """Step by step on our own greedy text (teacher forcing, so one early difference does not change every
    later step): the share of steps where llama.cpp's smaller weights pick our token."""
    tokenizer = get_gpt2_tokenizer()
    llm = llama(exported[outtype])
    same = total = 0
    worst = 0.0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        text = ids + our_greedy(model, ids, NEW_TOKENS)
        llm.reset()
        llm.eval(text[:-1])
        theirs = np.argmax(np.array(llm.scores[len(ids) - 1:len(text) - 1]), axis=-1).tolist()
        same += sum(a == b for a, b in zip(theirs, text[len(ids):]))
        total += NEW_TOKENS
        with torch.no_grad():
            ref = model(torch.tensor([text[:-1]]))[0].numpy()
        worst = max(worst, float(np.abs(np.array(llm.scores[:len(text) - 1]) - ref).max()))
    print(f"{outtype}: llama.cpp picks our greedy token at {same}/{total} steps; largest logit difference {worst:.4f}")
    assert same / total >= AGREEMENT_FLOOR[outtype], f"{outtype} greedy agreement {same}/{total}"
    assert worst < MAX_LOGIT_DIFFERENCE[outtype]


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_tiktoken(exported):
    tokenizer = get_gpt2_tokenizer()
    llm = open_llama_cpp(exported["f16"], vocab_only=True)
    texts = ["Hello, world!", " leading space and  double  spaces", "It's 2024: don't stop—naïve café 😀",
             "def f(x):\n\treturn x**2\n\n", "Every effort moves you", "  \n  trailing   "]
    for text in texts:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tokenizer.encode(text), text
        assert llm.detokenize(tokenizer.encode(text)).decode("utf-8") == text
    eot = llm.tokenize(b"<|endoftext|>", add_bos=False, special=True)
    assert eot == [50256] and llm.token_eos() == 50256


# --- The Modelfile, LoRA, the command -----------------------------------------------------------------------

def test_modelfile_for_an_instruction_tuned_and_a_base_model(model, tmp_path):
    _, modelfile = ex.export_gguf(model, tmp_path / "sft.gguf", "f16", style="alpaca")
    text = modelfile.read_text()
    assert modelfile.name == "sft.Modelfile" and "\nFROM ./sft.gguf\n" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    from ch07.gpt_instruction_finetuning import format_input, format_response

    entry = {"instruction": "{{ .Prompt }}", "input": "", "output": "{{ .Response }}"}
    assert template.endswith(format_input(entry) + format_response(entry))
    assert 'PARAMETER stop "<|endoftext|>"' in text and 'PARAMETER stop "### Instruction:"' in text
    assert "PARAMETER num_ctx 48" in text
    _, base = ex.export_gguf(model, tmp_path / "base.gguf", "f16", style=None)
    text = base.read_text()
    assert '{{ .Prompt }}"""' in text and "### Instruction" not in text


def test_lora_adapters_are_merged_before_export(model, tmp_path):
    from appendix_e.lora import add_lora

    lora = GPTModel(model.cfg).eval()
    lora.load_state_dict(model.state_dict())
    add_lora(lora, rank=2, alpha=4)
    with torch.no_grad():
        for m in lora.modules():
            if type(m).__name__ == "LoRALayer":
                m.B.normal_(std=0.1)  # a trained adapter: B is no longer zero
    x = torch.tensor([[1, 2, 3]])
    merged = ex.merged_copy(lora)
    assert any(type(m).__name__ == "LinearWithLoRA" for m in lora.modules())  # the caller's model is kept
    assert not any(type(m).__name__ == "LinearWithLoRA" for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), lora(x), atol=1e-5, rtol=1e-5)
    tensors = dict(ex.gpt_gguf_tensors(merged))
    w_query = model.trf_blocks[0].att.W_query.weight + lora.trf_blocks[0].att.W_query.lora.delta_weight()
    np.testing.assert_allclose(tensors["blk.0.attn_qkv.weight"][:64], w_query.detach().numpy(), atol=1e-6)
    assert not np.allclose(tensors["blk.0.attn_qkv.weight"][:64], model.trf_blocks[0].att.W_query.weight.detach())
    path, modelfile = ex.export_gguf(lora, tmp_path / "lora.gguf", "f32")
    assert path.is_file() and modelfile.is_file()


def test_command_exports_a_chapter7_model(model, exported, tmp_path, capsys):
    sft = save_finetuned_model(model, tmp_path / "tiny-sft.pth", style="alpaca")
    out = tmp_path / "out" / "tiny.gguf"
    assert ex.main(["--model", str(sft), "--output", str(out), "--outtype", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "ollama create tiny-sft" in printed
    assert out.with_suffix(".Modelfile").read_text().count("### Instruction:") == 2  # template and stop
    # the same tensors and vocabulary as the fixture's q8_0 file (only general.name differs)
    assert abs(out.stat().st_size - exported["q8_0"].stat().st_size) < 64
    assert not list(out.parent.glob(".*partial*"))  # atomic: no temporary file left
    # Without --overwrite both files stay as they are; with it (or --force) they are replaced
    before = out.read_bytes()
    assert ex.main(["--model", str(sft), "--output", str(out), "--outtype", "f32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output") and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before
    assert ex.main(["--model", str(sft), "--output", str(out), "--outtype", "f32", "--force", "--style", "none"]) == 0
    assert out.stat().st_size > len(before) and "### Instruction" not in out.with_suffix(".Modelfile").read_text()


def test_default_output_goes_under_outputs(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMFS_OUTPUT_DIR", str(tmp_path / "outputs"))
    folder = tmp_path / "run"
    folder.mkdir()
    save_model(model, folder / "model.pth")
    (folder / "config.json").write_text(json.dumps(model.cfg))
    assert ex.main(["--model", str(folder / "model.pth")]) == 0
    assert (tmp_path / "outputs" / "ch07" / "run-model-f16.gguf").is_file()
    assert (tmp_path / "outputs" / "ch07" / "run-model-f16.Modelfile").is_file()
    # a chapter-5 training checkpoint (weights, optimizer state, config) exports the same tensors
    save_checkpoint(folder / "checkpoint.pth", model, torch.optim.AdamW(model.parameters()), config=model.cfg)
    assert ex.main(["--model", str(folder / "checkpoint.pth"), "--outtype", "f32"]) == 0
    assert (tmp_path / "outputs" / "ch07" / "run-checkpoint-f32.gguf").is_file()


@pytest.mark.parametrize("problem", ["missing", "empty", "not_torch", "small_vocab", "classifier", "suffix",
                                     "outtype"])
def test_bad_inputs_are_one_line_and_write_nothing(problem, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    model_file = tmp_path / "model.pth"
    if problem == "empty":
        model_file.write_bytes(b"")
    elif problem == "not_torch":
        model_file.write_text("hello")
    elif problem in ("small_vocab", "classifier"):
        cfg = {**TINY, "vocab_size": 1000} if problem == "small_vocab" else TINY
        m = GPTModel(cfg)
        if problem == "classifier":
            m.out_head = torch.nn.Linear(TINY["emb_dim"], 2)
        save_finetuned_model(m, model_file, style="alpaca")
    argv = ["--model", str(model_file), "--output", str(out)]
    if problem == "suffix":
        save_finetuned_model(GPTModel(TINY), model_file)
        argv[-1] = str(tmp_path / "out.bin")
    if problem == "outtype":
        argv += ["--outtype", "q4_0"]
    with pytest.raises(SystemExit) if problem == "outtype" else _nothing() as caught:
        code = ex.main(argv)
    code = caught.value.code if problem == "outtype" else code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "out.bin").exists() and not out.with_suffix(".Modelfile").exists()
    if problem == "small_vocab":
        assert "50,257" in err
    if problem == "classifier":
        assert "classifier" in err or "out_head" in err


class _nothing:
    value = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_module_runs_as_a_command():
    out = subprocess.run([sys.executable, "-m", "ch07.export_gguf", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0 and "--outtype" in out.stdout and "--overwrite" in out.stdout


# --- Hugging Face Llama 3 and Qwen3 folders -----------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama", "qwen3"])
def hf_export(request, tmp_path_factory):
    """(family, folder, transformers model, f32 GGUF file) of a tiny random Llama 3 (with Llama 3's rope
    scaling) or Qwen3 (QK-norm, head_dim != hidden / heads) folder."""
    from hf_tiny import model_dir_fixture

    folder, hf = model_dir_fixture(tmp_path_factory, request.param)
    path, _ = ex.export_hf_folder(folder, folder.parent / f"{request.param}.gguf", "f32")
    return request.param, folder, hf, path


def test_hf_folder_modelfile_and_tensors(hf_export):
    family, folder, hf, path = hf_export
    text = path.with_suffix(".Modelfile").read_text()
    if family == "llama":
        assert '{{ .Prompt }}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"""' in text
        assert 'PARAMETER stop "<|eot_id|>"' in text and "<|begin_of_text|>" not in text  # llama.cpp adds it
    else:
        assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n" in text
        assert 'PARAMETER stop "<|im_end|>"' in text
    tensors = dict(ex.hf_gguf_tensors(folder, family, ex.hf_family_config(folder)[1]))
    q = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    if family == "llama":  # rows of each head interleaved: 0, d/2, 1, d/2 + 1, ...
        head_dim = q.shape[0] // hf.config.num_attention_heads
        np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"][1], q[head_dim // 2])
        assert tensors["rope_freqs.weight"].shape == (head_dim // 2,)
    else:
        np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], q)
        assert "blk.1.attn_k_norm.weight" in tensors
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd


@needs_llama_cpp
def test_llama_cpp_runs_the_hf_folder_as_transformers_does(hf_export):
    from tokenizers import Tokenizer

    from hf_tiny import verdict

    family, folder, hf, path = hf_export
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    llm = llama(path, n_ctx=64)
    text = verdict()[:200]
    ids = tok.encode(text).ids[:40]
    assert llm.tokenize(text.encode(), add_bos=False, special=False)[:40] == ids
    bos = [llm.token_bos()] if family == "llama" else []
    if family == "llama":
        assert bos == [tok.token_to_id("<|begin_of_text|>")]
    llm.eval(bos + ids)
    ours = np.array(llm.scores[:len(bos + ids)])
    with torch.no_grad():
        expected = hf(torch.tensor([bos + ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)


def test_command_takes_a_hf_folder_and_refuses_other_families(hf_export, tmp_path, capsys):
    family, folder, _, path = hf_export
    out = tmp_path / f"{family}-q8_0.gguf"
    assert ex.main(["--model", str(folder), "--output", str(out), "--outtype", "q8_0"]) == 0
    assert out.is_file() and out.with_suffix(".Modelfile").is_file() and f"wrote {out}" in capsys.readouterr().out
    other = tmp_path / "gemma"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    assert ex.main(["--model", str(other), "--output", str(tmp_path / "g.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'gemma3_text'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.gguf").exists()


@needs_llama_cpp
def test_a_tied_head_is_written_once_and_llama_cpp_reuses_the_embedding(tmp_path):
    tied = tiny_model(tie_weights=True)
    assert tied.out_head.weight is tied.tok_emb.weight
    tensors = dict(ex.gpt_gguf_tensors(tied))
    assert "output.weight" not in tensors
    path, _ = ex.export_gguf(tied, tmp_path / "tied.gguf", "f32")
    ids = get_gpt2_tokenizer().encode(PROMPTS[0])
    theirs, logits = llama_greedy(llama(path), ids, NEW_TOKENS)
    assert theirs == our_greedy(tied, ids, NEW_TOKENS)
    with torch.no_grad():
        np.testing.assert_allclose(logits, tied(torch.tensor([ids]))[0].numpy(), atol=2e-3, rtol=0)


@needs_llama_cpp
def test_a_hugging_face_gpt2_folder_runs_in_llama_cpp_as_in_transformers(tmp_path, capsys):
    """GPT-2's own weights take this route: a Hugging Face GPT-2 folder (Conv1D weights, tied head) loaded
    by chapter 5, exported, run by llama.cpp: the logits of transformers' GPT2LMHeadModel."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(123)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=48, n_embd=64, n_layer=2, n_head=4)).eval()
    hf.save_pretrained(tmp_path / "gpt2-tiny")
    out = tmp_path / "gpt2-tiny.gguf"
    assert ex.main(["--model", str(tmp_path / "gpt2-tiny"), "--output", str(out), "--outtype", "f32"]) == 0
    assert "Import with" in out.with_suffix(".Modelfile").read_text()
    ids = get_gpt2_tokenizer().encode(PROMPTS[1])
    _, logits = llama_greedy(llama(out), ids, 1)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(logits, expected, atol=2e-3, rtol=0)
