"""Tests for ch07/gpt_instruction_finetuning.py: the prompt format, record validation, the split,
batching (padding, -100 masking, truncation, instruction masking), response extraction, checkpoints,
the pretrained-weights-unavailable message and a tiny end-to-end fine-tune."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch05.gpt_train import calc_loss_batch
from ch07.gpt_instruction_finetuning import (
    ALPACA_PREAMBLE,
    InstructionDataset,
    create_instruction_loaders,
    custom_collate_draft_1,
    custom_collate_draft_2,
    custom_collate_fn,
    download_and_load_file,
    format_input,
    format_response,
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
def instruction_data():
    from llmfs.download import get_data_file

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
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON: ") as info:
        load_instruction_data(path)
    # What the project controls: the file, the line and a column at the error. The wording is
    # the interpreter's, and so is the exact column: Python <= 3.12 points at the `}` (18),
    # 3.13 at the trailing comma before it (17).
    found = re.search(r"at line (\d+), column (\d+) \(char (\d+)\)", str(info.value))
    assert found, str(info.value)
    line, column, char = map(int, found.groups())
    assert line == 3 and column in (17, 18)
    assert path.read_text()[char] in ",}" and char == 25 + column - 1  # line 3 starts at offset 25


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


def test_download_and_load_file_uses_the_data_helper_for_the_chapter_url(tmp_path):
    from llmfs.download import DATA_FILES

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


