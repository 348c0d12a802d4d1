"""llmfs.generate_stream yields exactly the tokens of ch05.gpt_generate.generate."""

import pytest
import torch

from ch04.gpt import GPTModel
from ch05.gpt_generate import generate
from llmfs.generate_stream import generate_stream

CFG = {"vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": False}


@pytest.fixture
def model():
    torch.manual_seed(123)
    return GPTModel(CFG).eval()


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, 20, None), (0.8, None, 0.9)])
def test_stream_equals_generate(model, use_cache, temperature, top_k, top_p):
    idx = torch.tensor([[5, 17, 3]])
    # 20 new tokens with a 16-token context: the window slides and the cache is rebuilt.
    full = generate(model, idx, 20, 16, temperature=temperature, top_k=top_k, top_p=top_p,
                    use_cache=use_cache, generator=torch.Generator().manual_seed(7))
    streamed = list(generate_stream(model, idx, 20, 16, temperature=temperature, top_k=top_k, top_p=top_p,
                                    use_cache=use_cache, generator=torch.Generator().manual_seed(7)))
    assert streamed == full[0, idx.shape[1]:].tolist()


def test_stream_stops_before_eos(model):
    idx = torch.tensor([[5, 17, 3]])
    greedy = list(generate_stream(model, idx, 10, 16))
    eos = greedy[4]
    first = greedy.index(eos)
    assert list(generate_stream(model, idx, 10, 16, eos_id=eos)) == greedy[:first]


def test_closing_early_resets_cache_and_mode(model):
    model.train()
    stream = generate_stream(model, torch.tensor([[1, 2]]), 10, 16)
    next(stream)
    stream.close()
    assert model.training
    assert all(b.att.cache_k is None for b in model.trf_blocks)


def test_rejects_a_batch(model):
    with pytest.raises(ValueError, match="one sequence"):
        next(generate_stream(model, torch.zeros(2, 3, dtype=torch.long), 5, 16))


def test_a_negative_max_new_tokens_is_a_users_value(model):
    """A request's num_predict or an app's slider: InvalidInput, one line from a command (still a ValueError)."""
    from llmfs.errors import InvalidInput

    with pytest.raises(InvalidInput, match="max_new_tokens must be >= 0"):
        next(generate_stream(model, torch.tensor([[1, 2]]), -1, 16))
    with pytest.raises(InvalidInput, match="temperature"):
        next(generate_stream(model, torch.tensor([[1, 2]]), 3, 16, temperature=-1.0))
    with pytest.raises(ValueError) as info:  # the calling code's mistake stays a plain ValueError
        next(generate_stream(model, torch.tensor([[1, 2]]), 3, 0))
    assert not isinstance(info.value, InvalidInput)
