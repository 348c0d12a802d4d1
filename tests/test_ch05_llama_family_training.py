"""Tests for ch05/llama/family_training.py and `python -m ch05.gpt_train --model DIR`: pretraining a
tiny Llama 3 / Qwen3 / Qwen3-MoE / Gemma 3 shaped model on the-verdict lowers the loss, the result
is a Hugging Face folder that `ch05.llama` and transformers load with the same logits, --load-weights
starts from the folder's weights, the tokenizer adapter keeps text as text, the pad ids, the command's
one-line errors, and the notebook's stored table against a recomputation."""

from __future__ import annotations

import json

import pytest
import torch

from ch05.cli import pretrain, print_sample, train_main
from ch05.gpt_train import QUICK_SETTINGS
from ch05.llama.family_training import (
    BookTokenizer,
    build_family_model,
    family_config,
    family_of,
    pad_token_id,
    write_tiny_folder,
)
from ch05.llama.generate_llm import FAMILIES, load_llm
from hf_tiny import verdict, write_model_dir
from nbexec import REPO

SIZES = {"emb_dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_groups": 2, "hidden_dim": 64, "context_length": 64}
SETTINGS = {**QUICK_SETTINGS, "num_epochs": 5, "eval_freq": 5, "eval_iter": 2, "learning_rate": 3e-3}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny folder (config.json and a tokenizer trained on the-verdict, no weights) per family."""
    text = verdict()
    root = tmp_path_factory.mktemp("families")
    return {family: write_tiny_folder(root / family, family, text, vocab_size=300, **SIZES)
            for family in ("llama", "qwen3", "gemma3_text")}


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    """transformers' tiny Qwen3-MoE (random weights) with its tokenizer."""
    path = tmp_path_factory.mktemp("qwen3_moe")
    write_model_dir(path, "qwen3_moe", verdict())
    return path


def run(folder, out, steps=60, **kwargs):
    cfg = family_config(folder, context_length=32)
    return pretrain(cfg, SETTINGS, out, model_dir=folder, max_steps=steps, progress=False, sample_tokens=5,
                    **kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_pretraining_reduces_the_loss_and_saves_a_folder_both_loaders_read(family, folders, tmp_path, capsys):
    # Gemma 3's post-norms give every block's output unit size while the token embedding starts at
    # 0.02 * sqrt(emb_dim): at this size it learns more slowly (the notebook shows it too).
    steps, drop = (160, 0.3) if family == "gemma3_text" else (60, 0.4)
    result = run(folders[family], tmp_path / "out", steps=steps)
    losses = result["val_losses"]
    # From about ln(vocab) (random init as transformers initialises these models) clearly downwards.
    assert abs(losses[0] - torch.log(torch.tensor(300.0)).item()) < 0.3
    assert losses[-1] < losses[0] - drop and result["train_losses"][-1] < result["train_losses"][0] - drop
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", "tokenizer.json", "checkpoint.pth"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.pth").exists()
    model = result["model"].eval()
    tokenizer = BookTokenizer(FAMILIES[family][1](out))
    # The chapter's sample (greedy, KV cache) runs on the family's model and tokens.
    assert print_sample(model, tokenizer, "cpu", "Every effort moves you", 5).startswith("Every effort moves you")
    ids = torch.tensor([tokenizer.encode(verdict()[:200])[:30]])
    with torch.no_grad():
        expected = model(ids)
        loaded = load_llm(out, decoding_layout=False)
        assert loaded.family == family
        torch.testing.assert_close(loaded.model(ids), expected, atol=1e-5, rtol=0)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(hf(ids).logits, expected, atol=1e-4, rtol=0)


def test_qwen3_moe_pretrains_too(moe_folder, tmp_path):
    result = run(moe_folder, tmp_path / "out", steps=20)
    assert result["val_losses"][-1] < result["val_losses"][0] - 0.3
    assert len(result["model"].trf_blocks[0].ff.fc1) == 6  # the routed experts trained


def test_load_weights_starts_from_the_folders_weights_and_random_init_does_not(moe_folder):
    cfg = family_config(moe_folder, context_length=32)
    torch.manual_seed(0)
    loaded, _, _ = build_family_model(moe_folder, cfg, load_weights=True)
    reference = load_llm(moe_folder, dtype=torch.float32, decoding_layout=False).model
    for (name, p), q in zip(loaded.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    random, _, _ = build_family_model(moe_folder, cfg, load_weights=False)
    assert not torch.equal(random.tok_emb.weight, loaded.tok_emb.weight)
    assert random.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)  # transformers' initializer_range


def test_the_tokenizer_keeps_text_as_text_and_starts_with_bos(folders):
    for family, bos in (("llama", "<|begin_of_text|>"), ("qwen3", None), ("gemma3_text", "<bos>")):
        family_tok = FAMILIES[family][1](folders[family])
        tok = BookTokenizer(family_tok)
        ids = tok.encode("a <|endoftext|> b <pad>", allowed_special={"<|endoftext|>"})
        specials = {family_tok.token_id(t) for t in ("<|endoftext|>", "<pad>", "<|end_of_text|>")} - {None}
        assert not specials & set(ids[1 if bos else 0:]), family
        assert (ids[0] == family_tok.token_id(bos)) if bos else ids[0] != family_tok.token_id("<|endoftext|>")
        assert tok.decode(tok.encode("Every effort moves you")) == "Every effort moves you"


def test_pad_ids_are_the_familys(folders, tmp_path):
    assert pad_token_id(FAMILIES["gemma3_text"][1](folders["gemma3_text"])) == 0  # <pad>
    llama = FAMILIES["llama"][1](folders["llama"])
    assert pad_token_id(llama) == llama.token_id("<|end_of_text|>")  # no pad token: end-of-text
    qwen = FAMILIES["qwen3"][1](folders["qwen3"])
    assert pad_token_id(qwen) == qwen.token_id("<|endoftext|>")
    # tokenizer_config.json's pad_token wins
    (tmp_path / "tokenizer.json").write_bytes((folders["qwen3"] / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|im_end|>"}))
    qwen = FAMILIES["qwen3"][1](tmp_path)
    assert pad_token_id(qwen) == qwen.token_id("<|im_end|>")


def test_family_of(folders, tmp_path):
    assert family_of(folders["gemma3_text"]) == "gemma3_text"
    assert family_of(tmp_path) is None and family_of("gpt2") is None and family_of(tmp_path / "nothing") is None


def test_the_command_trains_and_writes_a_folder(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LLMFS_QUICK", raising=False)
    out = tmp_path / "run"
    code = train_main(["--model", str(folders["llama"]), "--context-length", "32", "--max-steps", "6",
                       "--output-dir", str(out), "--no-progress"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    # A second run into the same folder is refused before any work (one line, exit 2) ...
    assert train_main(["--model", str(folders["llama"]), "--output-dir", str(out), "--no-progress"]) == 2
    assert "already holds a trained model (model.safetensors)" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/missing"], "not a model folder"),
    (["--model", "{llama}", "--drop-rate", "0.1"], "--drop-rate"),
    (["--load-weights"], "--load-weights"),
    (["--model", "{llama}", "--context-length", "1000"], "longer than the 64 positions"),
])
def test_bad_input_is_one_line_before_any_work(args, message, folders, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LLMFS_QUICK", raising=False)
    args = [a.format(tmp=tmp_path, llama=folders["llama"]) for a in args]
    assert train_main([*args, "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


NOTEBOOK = REPO / "ch05" / "llama" / "pretraining-other-families.ipynb"


def test_the_notebooks_stored_table_matches_a_recomputation(tmp_path):
    """The stored quick-mode table's Qwen3 row, recomputed with the notebook's settings (same seed, tokenizer
    training text and steps): parameters exact, losses to rounding."""
    from ch05.llama.family_training import COMPARED_FAMILIES, QUICK_SIZES, measure_run

    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nb["metadata"]["llmfs"]["mode"] == "quick"
    stored = "".join("".join(o.get("text", "")) for c in nb["cells"] if c.get("id") == "families-table"
                     for o in c.get("outputs", []))
    rows = {line.split()[0]: line.split()[1:] for line in stored.splitlines()
            if line.split() and line.split()[0] in COMPARED_FAMILIES}
    assert set(rows) == set(COMPARED_FAMILIES)
    text = verdict()
    settings = {**QUICK_SETTINGS, "num_epochs": 1_000, "eval_freq": 10}
    folder = write_tiny_folder(tmp_path / "qwen3-config", "qwen3", text[:int(0.9 * len(text))], 512, **QUICK_SIZES)
    row = measure_run("qwen3", family_config(folder), settings, tmp_path / "qwen3", text, 100, model_dir=folder)
    vocab, params, non_embedding, steps, first, val, tokens_per_char, per_char = rows["qwen3"]
    assert (int(vocab), int(params), int(non_embedding), int(steps)) == (
        row["vocabulary"], row["parameters"], row["non-embedding parameters"], 100)
    assert float(first) == pytest.approx(row["first val loss"], abs=0.01)
    assert float(val) == pytest.approx(row["val loss"], abs=0.02)
    assert float(tokens_per_char) == row["tokens per char"]
    assert float(per_char) == pytest.approx(row["val loss per char"], abs=0.01)
