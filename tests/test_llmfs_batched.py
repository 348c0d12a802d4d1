"""llmfs.batched: every row of a batch gets exactly the tokens `generate_stream` gives its prompt alone.

Tiny random GPT-2-shaped models (chapter 4's GPTModel and GPTModelFast) and tiny ch05.llama models (Llama 3,
Qwen3 dense and MoE, Gemma 3 with a sliding window shorter than the prompts); prompts of mixed lengths, mixed
max_new_tokens, rows that join late, leave early or slide past the context.
"""

import pytest
import torch

from ch04.gpt import GPTModel, GPTModelFast
from ch05.llama.gemma3 import GEMMA3_CONFIGS, Gemma3Model
from ch05.llama.llama3 import LLAMA32_CONFIG_1B, Llama3Model
from ch05.llama.qwen3 import QWEN3_CONFIG_06B, QWEN3_CONFIGS, Qwen3Model
from llmfs.batched import BatchedGeneration, generate_batch, supports_batching
from llmfs.decoding_layout import layout_for_decoding
from llmfs.errors import InvalidInput
from llmfs.generate_stream import generate_stream
from llmfs.int8 import dynamic_kernel_available, quantize_int8

CFG = {"vocab_size": 512, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": False}
LENGTHS = (1, 5, 12, 30, 3, 7)           # 30 + 20 new tokens slides past the context of 32
LIMITS = (10, 3, 25, 20, 0, 16)          # 0: a row with nothing to do
SAMPLINGS = [dict(temperature=0.0), dict(temperature=1.0, top_k=50), dict(temperature=0.8, top_p=0.9)]


def model_of(cls=GPTModel, **changes) -> torch.nn.Module:
    torch.manual_seed(123)
    return cls({**CFG, **changes}).eval()


# Tiny ch05.llama models: two query heads per key/value head, and the context of CFG.
_SMALL = {"vocab_size": CFG["vocab_size"], "context_length": CFG["context_length"], "emb_dim": 16, "n_heads": 4,
          "n_kv_groups": 2, "head_dim": 8, "n_layers": 2, "hidden_dim": 32, "dtype": torch.float32}
FAMILIES = {
    "llama3": (Llama3Model, {**LLAMA32_CONFIG_1B, **_SMALL}),
    "qwen3": (Qwen3Model, {**QWEN3_CONFIG_06B, **_SMALL}),
    "qwen3-moe": (Qwen3Model, {**QWEN3_CONFIGS["30B-A3B"], **_SMALL, "num_experts": 4, "num_experts_per_tok": 2,
                               "moe_intermediate_size": 8}),
    # A window of 4 positions in the first layer, every position in the second.
    "gemma3": (Gemma3Model, {**GEMMA3_CONFIGS["1B"], **_SMALL, "sliding_window": 4, "query_pre_attn_scalar": 2,
                             "layer_types": ["sliding_attention", "full_attention"]}),
}


def family_model(name: str) -> torch.nn.Module:
    cls, cfg = FAMILIES[name]
    torch.manual_seed(123)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms away from their initial values, so QK-norm and Gemma's norms matter
                p.add_(0.3 * torch.randn_like(p))
            elif "W_query" in name or "W_key" in name:  # sharp attention: a wrong position or mask changes tokens
                p.mul_(4.0)
    return model


def prompts(lengths=LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, CFG["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, limit, seed=0, eos_id=None, **sampling) -> list[int]:
    """The unbatched reference: generate_stream for this prompt alone, its own generator."""
    return list(generate_stream(model, torch.tensor([prompt]), limit, CFG["context_length"], eos_id=eos_id,
                                generator=torch.Generator().manual_seed(seed), **sampling))


@pytest.mark.parametrize("cls", [GPTModel, GPTModelFast])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "top_k", "top_p"])
def test_every_row_equals_its_unbatched_generation(cls, sampling):
    model = model_of(cls)
    ps = prompts()
    want = [alone(model, p, n, seed=i, **sampling) for i, (p, n) in enumerate(zip(ps, LIMITS))]
    got = generate_batch(model, ps, LIMITS, CFG["context_length"], generators=[
        torch.Generator().manual_seed(i) for i in range(len(ps))], **sampling)
    assert got == want
    assert [len(w) for w in want] == list(LIMITS)  # no end-of-text token: each ran to its limit
    assert model.current_pos == 0 and all(b.att.cache_k is None for b in model.trf_blocks)  # its own cache: clean


def test_prompts_of_one_length_start_together():
    """New rows whose prompts have the same length share their first forward pass; still each row's own tokens."""
    model = model_of()
    ps = prompts((6, 6, 6, 2, 2))
    want = [alone(model, p, 12, seed=i, temperature=1.0, top_k=50) for i, p in enumerate(ps)]
    assert generate_batch(model, ps, 12, CFG["context_length"], temperature=1.0, top_k=50,
                          generators=[torch.Generator().manual_seed(i) for i in range(5)]) == want


def test_eos_ends_a_row_alone():
    model = model_of()
    ps = prompts()
    eos = alone(model, ps[2], 25)[6]  # row 2's seventh token ends it there; the others go on past it
    want = [alone(model, p, n, eos_id=eos) for p, n in zip(ps, LIMITS)]
    assert len(want[2]) == 6 and any(len(w) == n for w, n in zip(want, LIMITS) if n)
    assert generate_batch(model, ps, LIMITS, CFG["context_length"], eos_id=eos) == want


def test_rows_that_join_late_and_leave_early():
    """Continuous batching: a row added between steps, a row closed mid-way; the others' tokens are unchanged."""
    model = model_of()
    ps = prompts()
    seeds = range(len(ps))
    want = [alone(model, p, 16, seed=s, temperature=1.0, top_k=50) for p, s in zip(ps, seeds)]
    batch = BatchedGeneration(model, CFG["context_length"])
    rows, got = {}, {i: [] for i in seeds}
    joins = {0: [0, 1], 3: [2], 4: [3, 4], 9: [5]}  # step -> rows that join before it
    for step in range(40):
        for i in joins.get(step, []):
            rows[i] = batch.add(ps[i], 16, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(i))
        if step == 5:
            rows[1].close()  # a client gone after 5 tokens
            assert rows[1].finished and list(rows[1]) == []
        batch.step()
        for i, row in rows.items():
            got[i].extend(row.drain())
        if not len(batch) and step > 9:
            break
    assert got[1] == want[1][:5]
    assert {i: t for i, t in got.items() if i != 1} == {i: w for i, w in enumerate(want) if i != 1}
    assert len(batch) == 0 and all(k is None for k in batch.keys)  # every cache row freed


def test_a_row_iterates_like_generate_stream():
    model = model_of()
    batch = BatchedGeneration(model, CFG["context_length"])
    row = batch.add(prompts()[1], 3)
    with pytest.raises(RuntimeError, match="step"):
        next(row)  # no token before a step
    tokens = []
    while not row.finished:
        batch.step()
        tokens.append(next(row))
    assert tokens == alone(model, prompts()[1], 3) and list(row) == []


def test_decoding_layout_bfloat16_and_training_mode():
    """The faster CPU weight layout changes no token; a bfloat16 model's cache is bfloat16; the model's
    training mode is given back."""
    ps = prompts((4, 9, 2))
    model = layout_for_decoding(model_of())
    want = [alone(model, p, 8) for p in ps]
    model.train()
    assert generate_batch(model, ps, 8, CFG["context_length"]) == want and model.training
    half = model_of().to(torch.bfloat16)
    batch = BatchedGeneration(half, CFG["context_length"])
    rows = [batch.add(p, 8) for p in ps]
    batch.step()
    batch.step()
    assert batch.keys[0].dtype == torch.bfloat16 and all(len(r.drain()) == 2 for r in rows)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampling", SAMPLINGS[:2], ids=["greedy", "top_k"])
def test_every_row_of_a_rope_model_equals_its_unbatched_generation(family, sampling):
    """Each row rotated at its own position, the grouped heads, QK-norm, experts, Gemma's window: its own tokens."""
    model = family_model(family)
    ps = prompts()
    want = [alone(model, p, n, seed=i, **sampling) for i, (p, n) in enumerate(zip(ps, LIMITS))]
    got = generate_batch(model, ps, LIMITS, CFG["context_length"], generators=[
        torch.Generator().manual_seed(i) for i in range(len(ps))], **sampling)
    assert got == want
    assert model.current_pos == 0 and all(b.att.cache_k is None for b in model.trf_blocks)
    assert all("forward" not in vars(b.att) for b in model.trf_blocks)  # the attention's own forward is back


@pytest.mark.skipif(not dynamic_kernel_available(), reason="--int8 dynamic needs fbgemm (x86 builds of PyTorch)")
@pytest.mark.parametrize("name", ["gpt", "qwen3", "qwen3-moe"])
def test_dynamic_int8_rows_equal_their_unbatched_generation(name):
    """`--int8 dynamic` rounds each single-token row's activations alone, and each prompt token on a grid of its
    own, so batching changes no token."""
    model = quantize_int8(model_of() if name == "gpt" else family_model(name), "dynamic")
    ps = prompts((*LENGTHS, 5, 12))  # two pairs of prompts of one length: their windows fill together
    limits = (*LIMITS, 6, 9)
    want = [alone(model, p, n) for p, n in zip(ps, limits)]
    shapes = []
    model.out_head.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    assert generate_batch(model, ps, limits, CFG["context_length"]) == want
    assert any(s[0] > 1 and s[-2] == 1 for s in shapes)  # batched steps: several single-token rows at once
    assert any(s[0] > 1 and s[-2] > 1 for s in shapes)  # several prompts in one call


@pytest.mark.parametrize("name", ["gpt", *FAMILIES])
def test_each_rows_logits_equal_the_models_own_forward_pass(name):
    """Stronger than equal tokens: every decoding step's logits of every row equal the model's logits for
    that row's whole sequence in one pass without a cache (positions, rotation, masks, window)."""
    model = model_of() if name == "gpt" else family_model(name)
    ps = prompts((1, 5, 12, 20, 3))
    new = 10  # the longest row ends at 30 tokens: inside the context of 32
    batch = BatchedGeneration(model, CFG["context_length"])
    rows = [batch.add(p, new, temperature=1.0, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(ps)]
    batch.step()  # the prompts' forward passes
    seen = []
    handle = model.out_head.register_forward_hook(lambda module, args, out: seen.append(out[:, -1, :]))
    try:
        while len(batch):
            batch.step()
    finally:
        handle.remove()
    assert len(seen) == new - 1 and all(len(r.ids) == len(p) + new for r, p in zip(rows, ps))
    for i, (row, prompt) in enumerate(zip(rows, ps)):
        with torch.no_grad():
            full = model(torch.tensor([row.ids[:-1]]))[0]  # (len - 1, vocab)
        got = torch.stack([step_logits[i] for step_logits in seen])
        torch.testing.assert_close(got, full[len(prompt):], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_rope_rows_that_join_late_and_leave_early(family):
    model = family_model(family)
    ps = prompts()
    want = [alone(model, p, 12, seed=i, temperature=1.0, top_k=50) for i, p in enumerate(ps)]
    batch = BatchedGeneration(model, CFG["context_length"])
    rows, got = {}, {i: [] for i in range(len(ps))}
    joins = {0: [0, 1, 2], 2: [3], 5: [4, 5]}
    for step in range(30):
        for i in joins.get(step, []):
            rows[i] = batch.add(ps[i], 12, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(i))
        if step == 4:
            rows[0].close()
        batch.step()
        for i, row in rows.items():
            got[i].extend(row.drain())
    assert got[0] == want[0][:4]
    assert {i: t for i, t in got.items() if i} == {i: w for i, w in enumerate(want) if i}
    assert len(batch) == 0


def test_a_bfloat16_rope_model_batches_with_its_own_tokens():
    model = family_model("qwen3").to(torch.bfloat16)
    ps = prompts((4, 9, 2))
    assert generate_batch(model, ps, 6, CFG["context_length"]) == [alone(model, p, 6) for p in ps]


def test_other_layouts_are_not_batched_and_bad_settings_are_refused():
    assert supports_batching(model_of()) and supports_batching(model_of(GPTModelFast))
    assert all(supports_batching(family_model(name)) for name in FAMILIES)
    odd = family_model("llama3")
    del odd.trf_blocks[0].att.num_kv_groups  # an attention this module does not know
    assert not supports_batching(odd) and not supports_batching(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="one sequence at a time"):
        BatchedGeneration(odd, 32)
    batch = BatchedGeneration(model_of(), 32)
    for kwargs, words in [(dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
                          (dict(max_new_tokens=3, temperature=-1.0), "temperature"),
                          (dict(max_new_tokens=3, top_p=1.5), "top_p")]:
        with pytest.raises(InvalidInput, match=words):
            batch.add([1, 2], **kwargs)
    with pytest.raises(ValueError, match="empty"):
        batch.add([], 3)
    assert len(batch) == 0
    with pytest.raises(ValueError, match="2 prompts, 3 max_new_tokens"):
        generate_batch(model_of(), [[1], [2]], [1, 2, 3], 32)
