"""Tests for ch06/experiments/families.py and `python -m ch06.gpt_class_finetune --model DIR`: the spam
classifier on a tiny Llama 3 and Qwen3 (transformers' random weights, saved as Hugging Face folders)
trains, reads each message at its last real token (more padding changes no logit), pads with the
family's pad id, computes accuracies; LoRA and the trainable-layer switches apply; the saved
classifier loads back; GPT-only switches are one line."""

from __future__ import annotations

import pytest
import torch

from ch05.llama.generate_llm import FAMILIES
from ch06.cli import BOOK_SETTINGS, finetune, main
from ch06.experiments.additional_experiments import Experiment, classifier_logits
from ch06.experiments.families import load_family_classifier
from ch06.gpt_class_finetune import last_token_logits, sequence_lengths
from hf_tiny import model_dir_fixture

SETTINGS = {**BOOK_SETTINGS, "learning_rate": 2e-3, "num_epochs": 2, "eval_freq": 4, "eval_iter": 2,
            "max_length": 48, "trainable": "all", "batch_size": 8}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return model_dir_fixture(tmp_path_factory, "llama")[0]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return model_dir_fixture(tmp_path_factory, "qwen3")[0]


def run(model_dir, out, trainable_layers="all", **kwargs):
    experiment = Experiment(trainable_layers=trainable_layers, train_rows=96)
    settings = {**SETTINGS, "trainable": trainable_layers}
    return finetune(settings, out, model_name=str(model_dir), experiment=experiment, progress=False, plots=False,
                    **kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_classifier_trains_on_the_familys_tokens_and_pads_with_its_pad_id(family, llama_dir, qwen_dir,
                                                                               tmp_path):
    model_dir = {"llama": llama_dir, "qwen3": qwen_dir}[family]
    result = run(model_dir, tmp_path)
    assert result["train_losses"][-1] < result["train_losses"][0]
    assert set(result["accuracies"]) == {"train", "validation", "test"}
    assert all(0.0 <= a <= 1.0 for a in result["accuracies"].values())
    assert result["accuracies"]["train"] > 0.5  # better than chance on what it trained on
    family_tok = FAMILIES[family][1](model_dir)
    pad = family_tok.token_id("<|end_of_text|>" if family == "llama" else "<|endoftext|>")
    train_loader = result["loaders"][0]
    assert train_loader.dataset.pad_token_id == pad
    inputs = train_loader.dataset._inputs
    if family == "llama":  # the begin-of-text token starts every message
        assert (inputs[:, 0] == family_tok.token_id("<|begin_of_text|>")).all()
    # Every message is its tokens, then only padding: the last real token is never the pad id.
    lengths = torch.tensor(train_loader.dataset.lengths)
    assert torch.equal(sequence_lengths(inputs, pad), lengths)
    assert not (inputs[torch.arange(len(inputs)), lengths - 1] == pad).any()
    assert result["model"].out_head.out_features == 2


def test_more_padding_changes_no_logit(llama_dir, tmp_path):
    result = run(llama_dir, tmp_path)
    model = result["model"].eval()
    dataset = result["loaders"][0].dataset
    ids, pad = dataset._inputs[:4], dataset.pad_token_id
    padded = torch.cat([ids, torch.full((4, 7), pad)], dim=1)
    with torch.no_grad():
        short = last_token_logits(model, ids, pad)
        long = last_token_logits(model, padded, pad, trim=False)  # the padding runs through the model too
        alone = torch.stack([model(ids[i:i + 1, :n])[0, -1] for i, n in enumerate(dataset.lengths[:4])])
    torch.testing.assert_close(long, short, atol=1e-5, rtol=0)
    torch.testing.assert_close(short, alone, atol=1e-5, rtol=0)  # = the message without any padding
    # Reading position -1 (the book's [:, -1, :]) would read padding and differ.
    assert not torch.allclose(model(padded)[:, -1], short, atol=1e-3)
    torch.testing.assert_close(classifier_logits(model, padded, "last", pad), short, atol=1e-5, rtol=0)


def test_lora_and_last_block_train_what_they_say(llama_dir, tmp_path):
    lora = run(llama_dir, tmp_path / "lora", trainable_layers="lora")["model"]
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".A" in n or ".B" in n for n in trainable)
    block = run(llama_dir, tmp_path / "block", trainable_layers="last_block")["model"]
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("trf") else "")
                 for n, p in block.named_parameters() if p.requires_grad}
    assert trainable == {"trf_blocks.1", "final_norm", "out_head"}


def test_the_saved_classifier_loads_back_with_its_tokenizer(llama_dir, tmp_path):
    result = run(llama_dir, tmp_path, trainable_layers="lora")  # LoRA merged into the saved weights
    model, meta, tokenizer = load_family_classifier(result["model_path"])
    assert meta["family"] == "llama" and meta["pad_token_id"] == result["loaders"][0].dataset.pad_token_id
    assert (tmp_path / "tokenizer.json").is_file()
    ids = torch.tensor([tokenizer.encode("WINNER!! Claim your free prize now")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), result["model"].eval()(ids), atol=1e-5, rtol=0)


def test_from_scratch_builds_the_folders_shape_with_random_weights(llama_dir, tmp_path):
    from ch05.llama.generate_llm import load_llm

    scratch = run(llama_dir, tmp_path, mode="scratch")["model"]
    pretrained = load_llm(llama_dir, decoding_layout=False).model
    assert scratch.cfg["emb_dim"] == pretrained.cfg["emb_dim"]
    assert not torch.equal(scratch.tok_emb.weight, pretrained.tok_emb.weight)


def test_the_command_runs_and_refuses_gpt_only_switches(llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LLMFS_QUICK", raising=False)
    args = ["--model", str(llama_dir), "--output-dir", str(tmp_path / "a"), "--no-progress"]
    assert main([*args, "--disable-causal-mask"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --disable-causal-mask") and not (tmp_path / "a" / "train.csv").exists()
    assert main([*args, "--epochs", "1", "--max-length", "16", "--batch-size", "32", "--trainable", "head"]) == 0
    out = capsys.readouterr().out
    assert "model: llama from" in out and "Test accuracy" in out
    assert (tmp_path / "a" / "review_classifier.pth").is_file()
