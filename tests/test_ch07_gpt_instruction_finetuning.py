"""Tests for ch07/gpt_instruction_finetuning.py: the prompt format, record validation, the split,
batching (padding, -100 masking, truncation, instruction masking), response extraction, checkpoints,
the pretrained-weights-unavailable message and a tiny end-to-end fine-tune."""

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch05.checkpoint import save_checkpoint
from ch05.gpt_train import calc_loss_batch
from ch07 import gpt_instruction_finetuning as ft
from ch07.gpt_instruction_finetuning import (
    ALPACA_PREAMBLE,
    InstructionDataset,
    create_instruction_loaders,
    custom_collate_draft_1,
    custom_collate_draft_2,
    custom_collate_fn,
    download_and_load_file,
    extract_response,
    format_input,
    format_response,
    load_finetuned_model,
    load_init_checkpoint,
    load_instruction_data,
    split_data,
    validate_instruction_data,
)

P = 50256  # <|endoftext|>, the padding token
I = -100   # ignore_index

WITH_INPUT = {"instruction": "Edit the sentence.", "input": "He go home.", "output": "He goes home."}
WITHOUT_INPUT = {"instruction": "Name a color.", "input": "", "output": "Blue."}

TINY = {**GPT_CONFIG_124M, "context_length": 128, "emb_dim": 16, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0}


@pytest.fixture(scope="module")
def tokenizer():
    return get_gpt2_tokenizer()


@pytest.fixture(scope="module")
def instruction_data():
    from ch02.download import get_data_file

    return load_instruction_data(get_data_file("instruction-data.json", download=False))


# --- 7.2 format, validation, split ---------------------------------------------------------------

def test_format_input_with_input():
    assert format_input(WITH_INPUT) == (
        f"{ALPACA_PREAMBLE}\n\n### Instruction:\nEdit the sentence.\n\n### Input:\nHe go home."
    )
    assert ALPACA_PREAMBLE == ("Below is an instruction that describes a task. "
                               "Write a response that appropriately completes the request.")


def test_format_input_without_input_has_no_input_section():
    text = format_input(WITHOUT_INPUT)
    assert text == f"{ALPACA_PREAMBLE}\n\n### Instruction:\nName a color."
    assert format_input({"instruction": "Name a color.", "output": "x"}) == text  # "input" may be missing
    assert "### Input" not in text


def test_format_response():
    assert format_response(WITH_INPUT) == "\n\n### Response:\nHe goes home."


def test_phi3_style():
    assert format_input(WITH_INPUT, "phi3") == "<|user|>\nEdit the sentence.\nHe go home."
    assert format_input(WITHOUT_INPUT, "phi3") == "<|user|>\nName a color."
    assert format_response(WITH_INPUT, "phi3") == "\n<|assistant|>\nHe goes home."
    with pytest.raises(ValueError, match="unknown prompt style"):
        format_input(WITH_INPUT, "chatml")


def test_validation_accepts_good_records():
    data = [WITH_INPUT, WITHOUT_INPUT, {"instruction": "a", "output": "b"}]
    assert validate_instruction_data(data) is data


@pytest.mark.parametrize("bad, pattern", [
    ({"input": "", "output": "x"}, r"record 1 is missing the key 'instruction'"),
    ({"instruction": "x", "input": ""}, r"record 1 is missing the key 'output'"),
    ({"instruction": 3, "output": "x"}, r"record 1 has 'instruction' of type int"),
    ({"instruction": "x", "input": None, "output": "x"}, r"record 1 has 'input' of type NoneType"),
    ({"instruction": "x", "output": ["a"]}, r"record 1 has 'output' of type list"),
    ("just a string", r"record 1 is a str"),
])
def test_validation_names_index_and_key(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_instruction_data([WITH_INPUT, bad])


def test_validation_rejects_non_list():
    with pytest.raises(ValueError, match="expected a JSON list"):
        validate_instruction_data({"instruction": "x"})


def test_load_reports_bad_record_with_file_name(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([WITH_INPUT, WITHOUT_INPUT, {"instruction": "x"}]))
    with pytest.raises(ValueError, match=r"data\.json: record 2 is missing the key 'output'"):
        load_instruction_data(path)


def test_malformed_json_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "x",\n   "output": "y",}\n]')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON: .* line 3, column 18 \(char 42\)"):
        load_instruction_data(path)


def test_chapter_data_loads_and_splits_935_110_55(instruction_data):
    assert len(instruction_data) == 1100
    train, test, val = split_data(instruction_data)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train[0] is instruction_data[0] and test[0] is instruction_data[935] and val[0] is instruction_data[1045]


def test_split_sizes_and_order():
    train, test, val = split_data(list(range(20)))
    assert train == list(range(17)) and test == [17, 18] and val == [19]
    with pytest.raises(ValueError):
        split_data(list(range(10)), train_frac=0.95, test_frac=0.1)


# --- 7.3 batching -----------------------------------------------------------------------------------

def test_collate_pads_shifts_and_masks_padding():
    inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert torch.equal(inputs, torch.tensor([[0, 1, 2, 3, 4], [5, 6, P, P, P], [7, 8, 9, P, P]]))
    # The first end-of-text token stays a target (the model learns to stop); later padding is -100.
    assert torch.equal(targets, torch.tensor([[1, 2, 3, 4, P], [6, P, I, I, I], [8, 9, P, I, I]]))
    assert inputs.dtype == targets.dtype == torch.long


def test_collate_custom_pad_and_ignore_index_and_tensor_items():
    inputs, targets = custom_collate_fn([torch.tensor([3, 4]), torch.tensor([5])], pad_token_id=0, ignore_index=-1)
    assert torch.equal(inputs, torch.tensor([[3, 4], [5, 0]]))
    assert torch.equal(targets, torch.tensor([[4, 0], [0, -1]]))


def test_collate_does_not_mistake_a_real_end_of_text_in_the_text_for_padding():
    # Masking works by position: an end-of-text id inside an example is still a target.
    _, targets = custom_collate_fn([[1, P, 2], [3]])
    assert targets.tolist() == [[P, 2, P], [P, I, I]]


def test_collate_truncates_to_allowed_max_length():
    inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], allowed_max_length=3)
    assert torch.equal(inputs, torch.tensor([[0, 1, 2], [5, 6, P], [7, 8, 9]]))
    assert torch.equal(targets, torch.tensor([[1, 2, 3], [6, P, I], [8, 9, P]]))


def test_collate_masks_instruction_tokens_for_pairs():
    # (token ids, prompt length): the targets that predict prompt tokens become -100.
    inputs, targets = custom_collate_fn([([0, 1, 2, 3, 4], 2), ([5, 6, 7], 1), ([8, 9], 3)])
    assert torch.equal(inputs, torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, P, P], [8, 9, P, P, P]]))
    assert torch.equal(targets, torch.tensor([[I, 2, 3, 4, P], [6, 7, P, I, I], [I, I, I, I, I]]))


def test_collate_moves_to_device_and_rejects_empty_batch():
    inputs, targets = custom_collate_fn([[1, 2]], device="meta")
    assert inputs.device.type == targets.device.type == "meta"
    with pytest.raises(ValueError, match="empty batch"):
        custom_collate_fn([])


def test_dataset_tokenizes_prompt_plus_response(tokenizer):
    ds = InstructionDataset([WITH_INPUT, WITHOUT_INPUT], tokenizer)
    assert len(ds) == 2
    full = format_input(WITH_INPUT) + format_response(WITH_INPUT)
    assert tokenizer.decode(ds[0]) == full
    assert ds[0] == tokenizer.encode(full)
    assert ds.prompt_lengths[1] == len(tokenizer.encode(format_input(WITHOUT_INPUT)))


def test_masked_dataset_leaves_only_the_response_in_the_loss(tokenizer):
    ds = InstructionDataset([WITH_INPUT, WITHOUT_INPUT], tokenizer, mask_instructions=True)
    ids, prompt_len = ds[0]
    assert tokenizer.decode(ids[prompt_len:]) == format_response(WITH_INPUT)
    _, targets = custom_collate_fn([ds[0], ds[1]])
    kept = targets[0][targets[0] != I].tolist()
    assert kept == ids[prompt_len:] + [P]  # the response tokens and one end-of-text token
    assert (targets[0][:prompt_len - 1] == I).all() and targets[0][prompt_len - 1] == ids[prompt_len]


def test_loss_ignores_masked_targets():
    torch.manual_seed(123)
    model = GPTModel(TINY).eval()
    inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6]])
    loss = calc_loss_batch(inputs, targets, model, "cpu")
    logits = model(inputs)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, expected)


def test_loaders_batch_shapes(tokenizer):
    data = [WITH_INPUT, WITHOUT_INPUT] * 5
    train_loader, val_loader, test_loader = create_instruction_loaders(
        data[:8], data[8:], data[8:], tokenizer, batch_size=4, allowed_max_length=40)
    assert len(train_loader) == 2 and len(val_loader) == 1 and len(test_loader) == 1
    inputs, targets = next(iter(train_loader))
    assert inputs.shape == targets.shape and inputs.shape[0] == 4 and inputs.shape[1] <= 40
    with pytest.raises(ValueError, match="no full batch"):
        create_instruction_loaders(data[:3], data, None, tokenizer, batch_size=4)


# --- 7.7 responses, checkpoints ---------------------------------------------------------------------

def test_extract_response():
    prompt = format_input(WITHOUT_INPUT)
    generated = prompt + "\n\n### Response:\nBlue is a color.<|endoftext|>"
    assert extract_response(generated, prompt) == "Blue is a color."
    assert extract_response(prompt + "\n\n### Response:\n  Red.  \n", prompt) == "Red."
    assert extract_response(prompt + " no header here", prompt) == "no header here"
    assert extract_response(prompt + "\n\n### Response:\n### Response:\nRed.", prompt) == "Red."
    assert extract_response(prompt, prompt) == ""
    # Stops at the first end-of-text token, even if more text follows.
    assert extract_response(prompt + "\n### Response:\nA<|endoftext|>B", prompt) == "A"
    phi3 = format_input(WITHOUT_INPUT, "phi3")
    assert extract_response(phi3 + "\n<|assistant|>\nGreen.<|endoftext|>", phi3, "phi3") == "Green."


def test_init_checkpoint_from_chapter5_files(tmp_path, instruction_data):
    torch.manual_seed(123)
    cfg = {**TINY, "qkv_bias": True, "n_layers": 2}
    model = GPTModel(cfg).eval()
    path = save_checkpoint(tmp_path / "checkpoint.pth", model, None, config=cfg)
    loaded = load_init_checkpoint(path).eval()
    x = torch.tensor([[1, 2, 3]])
    assert loaded.cfg["n_layers"] == 2 and torch.equal(loaded(x), model(x))
    with pytest.raises(FileNotFoundError, match="ch05.gpt_train --quick"):
        load_init_checkpoint(tmp_path / "missing.pth")
    # main() starts from it: one optimizer step, one answer.
    settings = {**ft.QUICK_SETTINGS, "batch_size": 4, "num_train": 4, "num_epochs": 1, "eval_freq": 1,
                "eval_iter": 1, "num_test": 1, "max_new_tokens": 2}
    result = ft.main(settings, tmp_path / "out", init_checkpoint=path, data=instruction_data[:20], device="cpu",
                     progress=False)
    assert result["model_path"].name == "init-sft.pth" and len(result["responses"]) == 1


def test_pretrained_unavailable_gives_clear_message(monkeypatch, capsys, tmp_path):
    fake = types.ModuleType("ch05.gpt_download")

    class PretrainedWeightsUnavailable(RuntimeError):
        pass

    def load_pretrained_gpt2(name_or_path="gpt2", drop_rate=0.0, device=None):
        raise PretrainedWeightsUnavailable("no network")

    fake.PretrainedWeightsUnavailable = PretrainedWeightsUnavailable
    fake.load_pretrained_gpt2 = load_pretrained_gpt2
    monkeypatch.setitem(sys.modules, "ch05.gpt_download", fake)
    assert ft.cli(["--output-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'gpt2-medium'" in err and "no network" in err
    assert "HF_ENDPOINT" in err and "--quick" in err and "--from-scratch" in err
    assert not (tmp_path / "instruction-data-with-response.json").exists()


def test_missing_loader_module_is_reported_as_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "ch05.gpt_download", None)  # makes the import fail
    with pytest.raises(ft.PretrainedUnavailableError, match="cannot be imported"):
        ft.load_pretrained_model("gpt2")


def test_settings_from_args():
    quick = ft.settings_from_args(ft.parse_args(["--quick", "--lr", "0.01"]))
    assert quick["learning_rate"] == 0.01 and quick["num_test"] == 3 and quick["max_new_tokens"] == 32
    book = ft.settings_from_args(ft.parse_args([]))
    assert (book["learning_rate"], book["weight_decay"], book["batch_size"], book["num_epochs"]) == (5e-5, 0.1, 8, 2)
    assert (book["eval_freq"], book["eval_iter"], book["max_new_tokens"]) == (5, 5, 256)


def test_tiny_end_to_end_fine_tune(tmp_path, instruction_data):
    settings = {**ft.QUICK_SETTINGS, "learning_rate": 1e-2, "batch_size": 4, "num_train": 16, "num_epochs": 2,
                "eval_freq": 2, "eval_iter": 1, "num_test": 2, "max_new_tokens": 6}
    result = ft.main(settings, tmp_path, cfg=TINY, data=instruction_data[:40], device="cpu",
                     mask_instructions=True, progress=False)
    losses = result["train_losses"]
    assert len(losses) == 1 + 4  # before training + every 2nd of 8 steps
    assert losses[-1] < losses[0] - 1.0
    records = json.loads(result["responses_path"].read_text())
    assert [r["instruction"] for r in records] == [e["instruction"] for e in instruction_data[34:36]]
    assert all(isinstance(r["model_response"], str) for r in records)
    assert result["plot_path"].is_file()
    model, meta = load_finetuned_model(result["model_path"])
    assert meta["config"] == TINY and meta["mask_instructions"] is True
    x = torch.tensor([[1, 2, 3]])
    result["model"].eval()
    assert torch.equal(model(x), result["model"](x))


def test_use_onednn_reaches_training_evaluation_and_generation(tmp_path, instruction_data, onednn_products):
    """main(use_onednn=False) keeps PyTorch's default path everywhere; the default routes through oneDNN
    with the same losses and answers."""
    settings = {**ft.QUICK_SETTINGS, "batch_size": 4, "num_train": 8, "num_epochs": 1, "eval_freq": 1,
                "eval_iter": 1, "num_test": 2, "max_new_tokens": 4, "sample_tokens": 0}
    runs = {}
    for flag in (False, True):
        onednn_products.clear()
        result = ft.main(settings, tmp_path / str(flag), cfg=TINY, data=instruction_data[:30], device="cpu",
                         progress=False, use_onednn=flag)
        runs[flag] = (result, len(onednn_products))
    (plain, plain_count), (fast, fast_count) = runs[False], runs[True]
    per_forward = 6 * TINY["n_layers"] + 1
    assert plain_count == 0
    # the 2 starting losses, 2 training steps (forward + input gradients), 2 evaluations of 2 batches,
    # then 1-4 forward calls per answer (an answer may end at <|endoftext|>)
    assert per_forward * (2 + 2 * 2 + 2 * 2 + 2) <= fast_count <= per_forward * (2 + 2 * 2 + 2 * 2 + 2 * 4)
    assert fast["train_losses"] == pytest.approx(plain["train_losses"], rel=1e-4)
    assert [r["model_response"] for r in fast["responses"]] == [r["model_response"] for r in plain["responses"]]
    assert ft.parse_args(["--no-onednn"]).no_onednn and not ft.parse_args([]).no_onednn


# --- the book's names: listing 7.1 and the collate drafts ------------------------------------------

def test_download_and_load_file_uses_the_data_helper_for_the_chapter_url(tmp_path):
    from ch02.download import DATA_FILES

    url = DATA_FILES["instruction-data.json"].url
    file_path = tmp_path / "instruction-data.json"
    data = download_and_load_file(file_path, url)  # offline: served by the data mirror
    assert data == load_instruction_data() and len(data) == 1100
    file_path.write_text('[{"instruction": "kept", "input": "", "output": "x"}]')
    assert download_and_load_file(str(file_path), url)[0]["instruction"] == "kept"  # an existing file is read


def test_download_and_load_file_fetches_any_other_url(tmp_path, monkeypatch):
    import http.server
    import threading

    records = [{"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    www = tmp_path / "www"
    www.mkdir()
    (www / "mine.json").write_text(json.dumps(records))
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(www), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/mine.json"
        assert download_and_load_file(tmp_path / "mine.json", url) == records
        assert json.loads((tmp_path / "mine.json").read_text()) == records
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


BOOK_BATCH = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]  # the book's example batch in section 7.3
PAD = 50256


def test_custom_collate_drafts_behave_as_in_the_book():
    inputs = custom_collate_draft_1(BOOK_BATCH)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]]
    inputs2, targets = custom_collate_draft_2(BOOK_BATCH)
    assert torch.equal(inputs2, inputs)
    assert targets.tolist() == [[1, 2, 3, 4, PAD], [6, PAD, PAD, PAD, PAD], [8, 9, PAD, PAD, PAD]]
    assert inputs.dtype == targets.dtype == torch.long
    assert BOOK_BATCH == [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]  # the items are not modified

    # The final collate function is draft 2 with every pad target after the first one hidden.
    final_inputs, final_targets = custom_collate_fn(BOOK_BATCH)
    assert torch.equal(final_inputs, inputs)
    expected = targets.clone()
    for row in expected:
        pads = (row == PAD).nonzero().flatten()
        row[pads[1:]] = -100
    assert torch.equal(final_targets, expected)
    assert custom_collate_draft_1([[1]], pad_token_id=7).tolist() == [[1]]
    assert [t.tolist() for t in custom_collate_draft_2([[1], [2, 3]], pad_token_id=7)] == [[[1, 7], [2, 3]],
                                                                                            [[7, 7], [3, 7]]]
