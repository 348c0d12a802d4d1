"""ch07.other_families: instruction fine-tuning of tiny Llama 3 / Qwen3 / Gemma 3 folders (with and without LoRA),
saved as Hugging Face folders that transformers loads to our logits; the family's template, end token and masking."""

import json

import pytest
import torch

import ch07.cli as ft
from appendix_e.lora import LinearWithLoRA
from ch05.llama.generate_llm import load_llm
from ch07.gpt_instruction_finetuning import IGNORE_INDEX, custom_collate_fn, load_instruction_data
from ch07.other_families.family_finetuning import (
    FamilyInstructionDataset,
    chat_message,
    count_lora_modules,
    create_family_loaders,
    encode_example,
    end_token_id,
    family_of,
    finetune_family,
)
from hf_tiny import model_dir_fixture

SETTINGS = {**ft.DEFAULT_SETTINGS, "learning_rate": 5e-3, "batch_size": 4, "num_train": 16, "num_epochs": 2,
            "eval_freq": 2, "eval_iter": 1, "num_test": 2, "max_new_tokens": 4}
RECORD = {"instruction": "Name a color.", "input": "Pick a warm one.", "output": "Red, like a ripe tomato in the sun."}


@pytest.fixture(scope="module")
def instruction_data():
    from llmfs.download import get_data_file

    return load_instruction_data(get_data_file("instruction-data.json", download=False))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return model_dir_fixture(tmp_path_factory, "qwen3")[0]


def _same_logits_in_transformers(model, folder):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, model.cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids), atol=1e-4, rtol=0)


def test_qwen3_lora_fine_tune_merges_saves_and_loads_in_transformers(qwen_dir, tmp_path, instruction_data):
    """The acceptance test: fine-tune tiny Qwen3 with chapter 7 + LoRA, merge, save, load with transformers."""
    source = load_llm(qwen_dir, dtype=torch.float32, decoding_layout=False).model
    result = finetune_family(SETTINGS, qwen_dir, tmp_path, lora_rank=4, lora_alpha=8, lora_targets=("q", "v", "down"),
                             data=instruction_data[:40], device="cpu", progress=False)
    model = result["model"]
    assert count_lora_modules(model) == 0  # merged: plain nn.Linear layers, our names
    assert set(model.state_dict()) == set(source.state_dict())
    changed = {n for n, p in model.state_dict().items() if not torch.equal(p, source.state_dict()[n])}
    # only the LoRA targets moved: W_query, W_value, fc3 of each block
    assert changed == {f"trf_blocks.{i}.{m}.weight" for i in range(2) for m in ("att.W_query", "att.W_value", "ff.fc3")}
    assert result["train_losses"][-1] < result["train_losses"][0]
    folder = result["model_path"]
    assert folder.name == f"{qwen_dir.name}-sft"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "finetuning.json").read_text())["lora_targets"] == ["q", "v", "down"]
    _same_logits_in_transformers(model, folder)
    records = json.loads(result["responses_path"].read_text())
    assert len(records) == 2 and all(isinstance(r["model_response"], str) for r in records)


@pytest.mark.parametrize("family, extra", [
    ("llama", []),
    ("gemma3_text", ["--prompt-style", "alpaca"]),
    ("qwen3_moe", ["--lora-rank", "2", "--lora-targets", "up,down", "--gradient-checkpointing"]),
])
def test_command_fine_tunes_a_family_folder(family, extra, tmp_path_factory, capsys):
    src, _ = model_dir_fixture(tmp_path_factory, family)
    out = tmp_path_factory.mktemp("out")
    argv = ["--model", str(src), "--num-train", "8", "--num-test", "1", "--max-new-tokens", "3", "--epochs", "1",
            "--batch-size", "4", "--eval-iter", "1", "--lr", "1e-3", "--output-dir", str(out), "--no-progress",
            *extra, "--overwrite"]
    assert ft.main(argv) == 0
    style = "alpaca" if "alpaca" in extra else "chat"
    printed = capsys.readouterr().out
    assert f"prompt style {style}" in printed and f"{family} from {src}" in printed
    meta = json.loads((out / f"{src.name}-sft" / "finetuning.json").read_text())
    assert meta["style"] == style and meta["mask_instructions"] is True
    assert meta["lora_rank"] == (2 if "--lora-rank" in extra else None)
    model = load_llm(out / f"{src.name}-sft", dtype=torch.float32, decoding_layout=False).model
    _same_logits_in_transformers(model, out / f"{src.name}-sft")
    # a second run into the same folder is refused without --overwrite, before any work
    assert ft.main(argv[:-1]) == 2
    assert "already holds a trained model" in capsys.readouterr().err


@pytest.mark.parametrize("family, style, end", [("qwen3", "chat", "<|im_end|>"), ("qwen3", "alpaca", "<|endoftext|>"),
                                                ("llama", "chat", "<|eot_id|>"),
                                                ("gemma3_text", "chat", "<end_of_turn>")])
def test_prompt_masked_response_and_end_token_counted(family, style, end, tmp_path_factory):
    src, _ = model_dir_fixture(tmp_path_factory, family)
    tok = load_llm(src, decoding_layout=False).tokenizer
    prompt_ids, response_ids = encode_example(RECORD, tok, style)
    if style == "chat":
        assert prompt_ids == tok.encode(chat_message(RECORD), chat=True)
        assert chat_message(RECORD) == "Name a color.\n\nPick a warm one."
    else:
        assert "### Instruction:\nName a color." in tok.decode(prompt_ids) and "### Response:" in tok.decode(response_ids)
    end_id = end_token_id(tok, style)
    assert end_id == tok.token_id(end)
    short = {**RECORD, "output": "Ok."}
    dataset = FamilyInstructionDataset([RECORD, short], tok, mask_instructions=True, style=style)
    inputs, targets = custom_collate_fn([dataset[0], dataset[1]], pad_token_id=end_id)
    n_prompt, n_response = len(prompt_ids), len(response_ids)
    # row 0: prompt targets hidden, then the response and one end token count, nothing after
    assert (targets[0, :n_prompt - 1] == IGNORE_INDEX).all()
    assert targets[0, n_prompt - 1:n_prompt - 1 + n_response].tolist() == response_ids
    assert targets[0, n_prompt - 1 + n_response].item() == end_id
    assert (targets[0, n_prompt + n_response:] == IGNORE_INDEX).all()
    # the shorter row is padded with the end token in its inputs
    assert inputs[1, -1].item() == end_id and (targets[1] != IGNORE_INDEX).sum() < (targets[0] != IGNORE_INDEX).sum()
    unmasked = FamilyInstructionDataset([RECORD], tok, mask_instructions=False, style=style)
    assert unmasked[0] == prompt_ids + response_ids


def test_loaders_refuse_too_few_records(qwen_dir):
    tok = load_llm(qwen_dir, decoding_layout=False).tokenizer
    train_loader, val_loader = create_family_loaders([RECORD] * 5, [RECORD], tok, batch_size=2)
    assert len(train_loader) == 2 and len(val_loader) == 1
    with pytest.raises(Exception, match="no full batch"):
        create_family_loaders([RECORD], [RECORD], tok, batch_size=2)


def test_family_of(qwen_dir, tmp_path):
    assert family_of(qwen_dir) == "qwen3"
    assert family_of("gpt2-medium") is None and family_of(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert family_of(tmp_path) is None


@pytest.mark.parametrize("extra, message", [
    (["--lora-alpha", "4"], "error: --lora-alpha and --lora-targets only apply with --lora-rank\n"),
    (["--lora-rank", "2", "--lora-targets", "q,x"], "error: --lora-targets: unknown LoRA target(s) ['x']"),
    (["--from-scratch"], "error: --from-scratch build a GPT model"),
    (["--prompt-style", "phi3"], "error: --prompt-style phi3 is for GPT models"),
])
def test_bad_family_options_are_one_line_errors_before_any_work(extra, message, qwen_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert ft.main(["--model", str(qwen_dir), "--output-dir", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


def test_gpt_has_no_chat_template(tmp_path, capsys):
    assert ft.main(["--quick", "--prompt-style", "chat", "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: --prompt-style chat uses a model's own chat template")


def test_gpt_lora_fine_tune_saves_a_plain_gpt_model(tmp_path, instruction_data):
    from ch07.gpt_instruction_finetuning import load_finetuned_model

    tiny = {**ft.QUICK_CONFIG, "context_length": 128, "emb_dim": 16, "n_heads": 2, "n_layers": 1}
    settings = {**ft.QUICK_SETTINGS, "batch_size": 4, "num_train": 8, "num_epochs": 1, "eval_freq": 1,
                "eval_iter": 1, "num_test": 1, "max_new_tokens": 2}
    result = ft.finetune(settings, tmp_path, cfg=tiny, data=instruction_data[:20], device="cpu", progress=False,
                         lora_rank=2, lora_targets=("q", "up"), gradient_checkpointing=True)
    assert not any(isinstance(m, LinearWithLoRA) for m in result["model"].modules())
    model, meta = load_finetuned_model(result["model_path"])  # a plain GPTModel file: no LoRA names in it
    assert meta["settings"]["style"] == "alpaca"
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), result["model"].eval()(ids))


def test_notebook_stored_outputs_agree_with_the_code(tmp_path, instruction_data):
    """other-families.ipynb's stored (quick-mode) outputs: recompute the prompt and the masking with the same
    tokenizer (hf_tiny trains it exactly as the notebook does) and check the reported comparisons."""
    import re
    from pathlib import Path

    from ch05.llama.qwen3 import Qwen3Tokenizer
    from hf_tiny import QWEN_SPECIAL, train_tokenizer, verdict

    nb = json.loads((Path(ft.__file__).parent / "other_families" / "other-families.ipynb").read_text())
    assert nb["metadata"]["llmfs"]["mode"] == "quick"
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c.get("outputs", []))
    train_tokenizer(tmp_path, QWEN_SPECIAL, verdict())
    tok = Qwen3Tokenizer(tmp_path)
    record = instruction_data[0]
    prompt_ids, response_ids = encode_example(record, tok, "chat")
    assert f"prompt text: {json.dumps(tok.decode(prompt_ids, skip_special_tokens=False))}\n" in text
    dataset = FamilyInstructionDataset([record, {"instruction": "Say yes.", "input": "", "output": "Yes."}], tok)
    inputs, targets = custom_collate_fn([dataset[0], dataset[1]], pad_token_id=end_token_id(tok, "chat"))
    for row in range(2):
        counted = int((targets[row] != IGNORE_INDEX).sum())
        assert f"record {row}: {inputs.shape[1]} positions, {counted} targets counted " \
               f"({inputs.shape[1] - counted} masked)" in text
    assert counted == len(tok.tokenizer.encode("Yes.", add_special_tokens=False).ids) + 1  # answer + end token
    assert "LoRA modules left after merging: 0" in text and "same greedy tokens as transformers: True" in text
    assert float(re.search(r"max \|logits difference\| = (\S+)", text).group(1)) < 1e-4
    before, after = map(float, re.search(r"train loss (\S+) -> (\S+);", text).groups())
    assert after < before
    a, b = re.search(r"loss without / with checkpointing: (\S+) / (\S+);", text).groups()
    assert a == b and float(re.search(r"max \|gradient difference\|: (\S+)", text).group(1)) < 1e-5
    kept = [float(v.replace(",", "")) for v in re.findall(r"([\d,]+) KiB", text)]
    assert len(kept) == 2 and kept[1] < kept[0] / 2
