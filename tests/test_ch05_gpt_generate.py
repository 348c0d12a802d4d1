"""Tests for ch05/gpt_generate.py: greedy decoding, temperature, top-k, top-p, the end-of-text
stop, argument checks, the KV cache (same tokens, constant work per token) and the command line.

Sampling tests draw thousands of samples in one batched call with a seeded generator, so they
are deterministic; the bounds they check hold with a wide margin.
"""

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ch04.gpt import GPTModel, generate_text_simple
from ch05.gpt_generate import generate
from llmfs.sampling import filter_logits, next_token

REPO = Path(__file__).resolve().parents[1]

TINY = {"vocab_size": 50, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}



def tiny_model(**overrides) -> GPTModel:
    torch.manual_seed(123)
    return GPTModel({**TINY, **overrides}).eval()


def sample_many(logits: torch.Tensor, n: int = 20000, **kwargs) -> torch.Tensor:
    """n samples from one row of logits, in a single batched call."""
    g = torch.Generator().manual_seed(0)
    return next_token(logits.expand(n, -1), generator=g, **kwargs).squeeze(1)


# --- decoding rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("prompt_len,new", [(1, 5), (4, 20), (16, 4), (20, 6)])
def test_greedy_equals_chapter4_generate_text_simple(prompt_len, new):
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (2, prompt_len))
    ours = generate(model, idx, max_new_tokens=new, context_size=TINY["context_length"])
    book = generate_text_simple(model, idx, max_new_tokens=new, context_size=TINY["context_length"])
    assert torch.equal(ours, book)
    assert ours.shape == (2, prompt_len + new)
    assert torch.equal(ours[:, :prompt_len], idx)


def test_greedy_is_argmax_of_logits():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    assert next_token(logits).tolist() == [[1], [0]]
    # temperature 0 ignores top-k/top-p: filtering never removes the argmax
    assert next_token(logits, temperature=0.0, top_k=1, top_p=0.1).tolist() == [[1], [0]]


def test_top_k_never_samples_outside_the_top_k():
    torch.manual_seed(1)
    logits = torch.randn(1, 100)
    top5 = set(torch.topk(logits, 5).indices[0].tolist())
    samples = sample_many(logits, temperature=1.0, top_k=5)
    seen = set(samples.tolist())
    assert seen <= top5
    assert seen == top5  # every one of the five is reachable
    # top_k=1 is greedy even when sampling
    assert set(sample_many(logits, n=500, temperature=5.0, top_k=1).tolist()) == {int(logits.argmax())}


def test_filter_logits_top_k_masks_the_rest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = filter_logits(logits, top_k=3)
    assert torch.isinf(out[0, [0, 4]]).all()
    assert torch.equal(out[0, [1, 2, 3]], logits[0, [1, 2, 3]])
    assert torch.equal(filter_logits(logits, top_k=10), logits)  # k >= vocab keeps everything


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    # sorted: 0.5 (index 1), 0.3 (3), 0.15 (2), 0.05 (0); mass before each: 0, 0.5, 0.8, 0.95
    kept = ~torch.isinf(filter_logits(logits, top_p=0.75))
    assert kept[0].tolist() == [False, True, False, True]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.9))
    assert kept[0].tolist() == [False, True, True, True]
    assert (~torch.isinf(filter_logits(logits, top_p=1.0))).all()
    assert (~torch.isinf(filter_logits(logits, top_p=0.01)))[0].tolist() == [False, True, False, False]

    samples = sample_many(logits, temperature=1.0, top_p=0.75)
    assert set(samples.tolist()) == {1, 3}
    share_of_1 = (samples == 1).float().mean().item()
    assert share_of_1 == pytest.approx(0.5 / 0.8, abs=0.02)  # renormalised within the nucleus


def test_top_p_is_applied_after_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    # at T=1 the top token has p=0.665 < 0.7, so two tokens form the nucleus; at T=0.25 it has 0.98.
    assert set(sample_many(logits, n=5000, temperature=1.0, top_p=0.7).tolist()) == {0, 1}
    assert set(sample_many(logits, n=5000, temperature=0.25, top_p=0.7).tolist()) == {0}


def test_very_low_temperature_is_greedy_and_never_nan():
    torch.manual_seed(2)
    logits = torch.randn(1, 50) * 10
    for t in (1e-3, 1e-12, 1e-40):
        samples = sample_many(logits, n=2000, temperature=t)
        assert set(samples.tolist()) == {int(logits.argmax())}


def test_high_temperature_is_near_uniform_within_top_k():
    logits = torch.tensor([[8.0, 6.0, 4.0, 2.0, 0.0, -2.0, -4.0]])
    samples = sample_many(logits, n=40000, temperature=1e4, top_k=4)
    counts = torch.bincount(samples, minlength=7).float() / samples.numel()
    assert counts[4:].sum() == 0
    assert torch.allclose(counts[:4], torch.full((4,), 0.25), atol=0.015)
    # while at temperature 1 the best token dominates
    assert (sample_many(logits, n=4000, temperature=1.0, top_k=4) == 0).float().mean() > 0.8


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    idx = torch.tensor([[1, 2, 3]])
    runs = [generate(model, idx, 10, 16, temperature=1.5, top_k=20,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*runs)


class CountingUpModel(nn.Module):
    """Scripted logits: the next token is always (last token + 1) % vocab."""

    def __init__(self, vocab: int = 10):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, use_cache=False):
        nxt = (idx + 1) % self.vocab
        return torch.nn.functional.one_hot(nxt, self.vocab).float() * 10


def test_eos_stops_generation_and_pads_finished_rows():
    model = CountingUpModel()
    out = generate(model, torch.tensor([[3]]), max_new_tokens=20, context_size=8, eos_id=6)
    assert out.tolist() == [[3, 4, 5]]  # as in the book: stops before appending the end token
    out = generate(model, torch.tensor([[3], [1]]), max_new_tokens=20, context_size=8, eos_id=6)
    # row 1 reaches eos at its 6th step; row 0 produced it at its 3rd and is padded with eos
    assert out.tolist() == [[3, 4, 5, 6, 6], [1, 2, 3, 4, 5]]
    # without an eos id all max_new_tokens are produced
    assert generate(model, torch.tensor([[3]]), 5, 8).shape == (1, 6)


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.5}, {"temperature": 1.0, "top_k": 0}, {"temperature": 1.0, "top_k": -3},
    {"temperature": 1.0, "top_p": 0.0}, {"temperature": 1.0, "top_p": 1.5}, {"temperature": 1.0, "top_p": -0.1},
])
def test_bad_sampling_arguments_raise(kwargs):
    model = tiny_model()
    with pytest.raises(ValueError):
        generate(model, torch.tensor([[1, 2]]), 3, 16, **kwargs)
    with pytest.raises(ValueError):
        next_token(torch.randn(1, 10), **kwargs)


def test_bad_lengths_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.tensor([[1]]), -1, 16)
    with pytest.raises(ValueError, match="context_size"):
        generate(model, torch.tensor([[1]]), 2, 0)


# --- KV cache --------------------------------------------------------------------------------

@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("prompt_len,new", [(1, 10), (5, 11), (5, 30), (16, 5), (23, 7)])
def test_kv_cache_gives_the_same_tokens(use_sdpa, prompt_len, new):
    """Equal with and without cache, also past context_length (16) where the window slides."""
    model = tiny_model(use_sdpa=use_sdpa)
    idx = torch.randint(0, TINY["vocab_size"], (2, prompt_len))
    plain = generate(model, idx, new, 16)
    cached = generate(model, idx, new, 16, use_cache=True)
    assert torch.equal(plain, cached)
    sampled = [generate(model, idx, new, 16, temperature=1.0, top_k=10, use_cache=c,
                        generator=torch.Generator().manual_seed(3)) for c in (False, True)]
    assert torch.equal(*sampled)


def test_kv_cache_is_cleared_and_mode_restored():
    model = tiny_model()
    model.train()
    generate(model, torch.tensor([[1, 2, 3]]), 4, 16, use_cache=True)
    assert model.training
    assert model.current_pos == 0
    assert all(block.att.cache_k is None for block in model.trf_blocks)


def tokens_fed_per_call(model, **gen_kwargs) -> list[int]:
    fed: list[int] = []
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: fed.append(args[0].shape[1]),
                                             with_kwargs=True)
    try:
        generate(model, **gen_kwargs)
    finally:
        handle.remove()
    return fed


def test_per_token_work_with_cache_is_constant():
    """Count the tokens the model processes per step (not timing): 1 per step after the prompt."""
    model = tiny_model()
    idx = torch.randint(0, 50, (1, 5))
    with_cache = tokens_fed_per_call(model, idx=idx, max_new_tokens=12, context_size=16, use_cache=True)
    without = tokens_fed_per_call(model, idx=idx, max_new_tokens=12, context_size=16)
    assert with_cache == [5] + [1] * 11
    assert without == list(range(5, 17))  # grows with the text until the window is full
    assert sum(with_cache) < sum(without) / 5

    # Past context_length the window slides; GPT-2's absolute positions force a refill per step.
    slid = tokens_fed_per_call(model, idx=idx, max_new_tokens=15, context_size=16, use_cache=True)
    assert slid == [5] + [1] * 11 + [16] * 3


def test_bf16_autocast_casts_the_weights_once_per_generation_not_per_token():
    """Under autocast, generation must let autocast cache the bfloat16 weights (inference_mode
    switches that cache off, and every token then re-casts every weight)."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model(vocab_size=97)  # the untied output head is the only (97, 32) weight
    head_shape = [97, 32]
    idx = torch.randint(0, 97, (1, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = generate(model, idx, max_new_tokens=6, context_size=16, use_cache=True)
    head_casts = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
                  and e.input_shapes[0] == head_shape]
    assert out.shape == (1, 9)
    assert len(head_casts) == 1  # 6 forward calls, one cast
