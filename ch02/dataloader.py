"""Sliding-window input/target pairs for next-token prediction (section 2.6).

Each sample is a window of `max_length` token ids and the same window shifted
one token to the right; `stride` sets how far consecutive windows move.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from ch02.tokenizer import END_OF_TEXT, get_gpt2_tokenizer


class GPTDatasetV1(Dataset):
    """All (input, target) windows of a text, pre-tokenized once."""

    def __init__(self, txt: str, tokenizer, max_length: int, stride: int):
        # New: clear errors for sizes that would give no (or endless) windows.
        if max_length <= 0 or stride <= 0:
            raise ValueError(f"max_length and stride must be positive, got max_length={max_length}, stride={stride}")
        token_ids = tokenizer.encode(txt, allowed_special={END_OF_TEXT})
        if len(token_ids) < max_length + 1:
            raise ValueError(
                f"the text has {len(token_ids)} tokens, but a window of max_length={max_length} needs at least "
                f"{max_length + 1} (inputs plus the one-token-shifted target); use a longer text or a smaller max_length"
            )
        # New: one (num_windows, max_length) tensor instead of a list of small tensors (one copy, fast indexing).
        ids = torch.tensor(token_ids, dtype=torch.long)
        starts = range(0, len(token_ids) - max_length, stride)
        # (num_windows, max_length): targets are the inputs shifted by one token.
        self.input_ids = torch.stack([ids[i:i + max_length] for i in starts])
        self.target_ids = torch.stack([ids[i + 1:i + max_length + 1] for i in starts])

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader_v1(
    txt: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    tokenizer=None,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader of GPT-2-tokenized sliding windows over `txt`."""
    # New: the offline GPT-2 tokenizer (or any other one passed in), and a seeded `generator` for the shuffling.
    tokenizer = tokenizer or get_gpt2_tokenizer()
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                            num_workers=num_workers, generator=generator)
    return dataloader
