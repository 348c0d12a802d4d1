"""ch02/dataloader.py: sliding-window input/target pairs (section 2.6)."""

import pytest
import torch

from ch02.dataloader import GPTDatasetV1, create_dataloader_v1
from ch02.tokenizer import get_gpt2_tokenizer


def test_first_batch_of_the_verdict(verdict_text):
    loader = create_dataloader_v1(verdict_text, batch_size=1, max_length=4, stride=1, shuffle=False)
    it = iter(loader)
    inputs, targets = next(it)
    assert inputs.tolist() == [[40, 367, 2885, 1464]]
    assert targets.tolist() == [[367, 2885, 1464, 1807]]
    inputs2, _ = next(it)
    assert inputs2.tolist() == [[367, 2885, 1464, 1807]]


@pytest.mark.parametrize("batch_size,max_length,stride", [(8, 4, 4), (2, 16, 8), (4, 256, 128)])
def test_shapes_and_one_token_shift(verdict_text, batch_size, max_length, stride):
    loader = create_dataloader_v1(verdict_text, batch_size=batch_size, max_length=max_length,
                                  stride=stride, shuffle=False)
    inputs, targets = next(iter(loader))
    assert inputs.shape == targets.shape == (batch_size, max_length)
    assert inputs.dtype == targets.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_number_of_windows(verdict_text):
    n_tokens = 5145
    for max_length, stride in [(4, 4), (4, 1), (256, 128), (256, 256)]:
        ds = GPTDatasetV1(verdict_text, get_gpt2_tokenizer(), max_length, stride)
        # Window starts 0, stride, 2*stride, ... while a full target window still fits.
        assert len(ds) == len(range(0, n_tokens - max_length, stride))


def test_stride_smaller_than_max_length_overlaps(verdict_text):
    ds = GPTDatasetV1(verdict_text, get_gpt2_tokenizer(), max_length=8, stride=3)
    first, second = ds[0][0], ds[1][0]
    assert torch.equal(first[3:], second[:5])


def test_stride_equal_to_max_length_does_not_overlap(verdict_text):
    ds = GPTDatasetV1(verdict_text, get_gpt2_tokenizer(), max_length=4, stride=4)
    windows = ds.input_ids[:10]
    # Consecutive windows tile the token stream exactly: no token appears twice.
    ids = get_gpt2_tokenizer().encode(verdict_text)
    assert windows.flatten().tolist() == ids[:40]


def test_shuffle_is_reproducible_with_a_generator(verdict_text):
    def first_batch(seed):
        g = torch.Generator().manual_seed(seed)
        loader = create_dataloader_v1(verdict_text, batch_size=4, max_length=8, stride=8, generator=g)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_drop_last(verdict_text):
    # 5145 tokens, max_length=256, stride=256 -> 20 windows; batches of 3 -> 6 full batches + 2 left over.
    kept = create_dataloader_v1(verdict_text, batch_size=3, max_length=256, stride=256, shuffle=False)
    every = create_dataloader_v1(verdict_text, batch_size=3, max_length=256, stride=256, shuffle=False,
                                 drop_last=False)
    assert len(kept.dataset) == 20
    assert len(kept) == 6 and len(every) == 7


def test_text_too_short_says_how_many_tokens():
    # 4 tokens ("Hello", ",", " world", "!") fill one input window but leave no room for the target.
    with pytest.raises(ValueError, match=r"has 4 tokens.*max_length=4.*at least 5"):
        create_dataloader_v1("Hello, world!", max_length=4, stride=1)


def test_text_just_long_enough_gives_one_window():
    text = "one two three four five"  # 5 GPT-2 tokens
    ds = GPTDatasetV1(text, get_gpt2_tokenizer(), max_length=4, stride=1)
    assert len(ds) == 1


@pytest.mark.parametrize("max_length,stride", [(0, 1), (-1, 1), (4, 0), (4, -2)])
def test_non_positive_sizes_are_rejected(max_length, stride):
    with pytest.raises(ValueError, match="must be positive"):
        create_dataloader_v1("some text " * 50, max_length=max_length, stride=stride)
