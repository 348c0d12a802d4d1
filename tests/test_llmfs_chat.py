"""llmfs.chat: options, prompt formats, streamed text (UTF-8, stop strings) and model loading, without a server."""

import json

import pytest
import torch

from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPTModel
from ch05.gpt_generate import generate
from ch07.cli import load_chat_model
from ch07.gpt_instruction_finetuning import format_input, format_response, save_finetuned_model
from llmfs import chat as chat_module
from llmfs.chat import GenerationOptions, PromptTooLong, parse_options
from llmfs.checkpoint import save_model

CFG = {"vocab_size": 50257, "context_length": 24, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": False}
TOKENIZER = get_gpt2_tokenizer()


@pytest.fixture
def sft(tmp_path):
    torch.manual_seed(123)
    save_finetuned_model(GPTModel({**CFG, "context_length": 64}), tmp_path / "tiny-sft.pth", style="alpaca")
    return load_chat_model(tmp_path / "tiny-sft.pth", device="cpu")


@pytest.fixture
def base(tmp_path):
    torch.manual_seed(123)
    folder = tmp_path / "pretrained"
    folder.mkdir()
    save_model(GPTModel(CFG), folder / "model.pth")
    (folder / "config.json").write_text(json.dumps(CFG))
    return load_chat_model(folder, device="cpu")


def test_parse_options_defaults_and_conversions():
    assert parse_options(None) == GenerationOptions()
    assert parse_options({}).temperature == 0.8 and parse_options({}).max_new_tokens == 128  # Ollama's, capped
    opts = parse_options({"temperature": 0, "top_k": 0, "top_p": 1, "seed": 5, "num_predict": 7.0, "stop": "###",
                          "num_ctx": 2048})
    assert opts == GenerationOptions(temperature=0.0, top_k=None, top_p=None, seed=5, max_new_tokens=7,
                                     stop=("###",))
    assert opts.as_ollama() == {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "num_predict": 7}


def test_a_request_changes_only_what_it_sets():
    server = GenerationOptions(max_new_tokens=3, stop=("###",))  # e.g. `--max-new-tokens 3`
    assert parse_options({}, server) == server
    assert parse_options({"num_predict": None, "temperature": None}, server) == server  # null: the default
    assert parse_options({"top_k": 5}, server) == GenerationOptions(top_k=5, max_new_tokens=3, stop=("###",))
    assert parse_options({"num_predict": 9, "stop": []}, server).max_new_tokens == 9
    assert parse_options({"stop": []}, server).stop == ()


@pytest.mark.parametrize("options, word", [
    ({"num_predict": -1}, "num_predict"), ({"num_predict": 1.5}, "integer"), ({"temperature": -1}, "temperature"),
    ({"top_k": -2}, "top_k"), ({"top_p": 1.5}, "top_p"), ({"seed": "x"}, "seed"), ({"stop": [1]}, "stop"),
    ({"truncate": "yes"}, "truncate"), ({"repeat_penalty": 1.1}, "repeat_penalty"), ({"temperature": True}, "number"),
])
def test_parse_options_rejects(options, word):
    with pytest.raises(ValueError, match=word):
        parse_options(options)


@pytest.mark.parametrize("options, message", [
    ({"temperature": float("inf")}, "'temperature' must be a finite number, got Infinity"),  # JSON's 1e999
    ({"top_p": 10**400}, "'top_p' must be a finite number"),
    ({"top_k": float("-inf")}, "'top_k' must be an integer, got -Infinity"),
    ({"seed": 2**64}, "'seed' must fit in 64 bits"),
    ({"stop": [[[[["deep"]]]]]}, r"got \[\[\[\.\.\.\]\]\]$"),  # a client's value, shortened in the message
    ({"stop": "x" * 10_000}, "at most 32 strings of at most 256 characters"),
    ({"num_ctx": "2048"}, "'num_ctx' must be an integer"),  # ignored, but checked as Ollama checks it
    ({"num_ctx": 0}, "'num_ctx' must be >= 1"),
    ({"low_vram": 1}, "'low_vram' must be true or false"),
    ({"num_predict": 25}, "'num_predict' is 25, more than this server's ceiling of 24 tokens"),
    ({"num_predict": -3}, r"'num_predict' must be >= 0 or -1 \(as many as allowed\) or -2"),
])
def test_parse_options_refuses_with_short_messages(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options(options, ceiling=24)


def test_num_predict_ceiling_and_ollamas_negative_values():
    assert parse_options({"num_predict": 24}, ceiling=24).max_new_tokens == 24
    assert parse_options({"num_predict": -1}, ceiling=24) == GenerationOptions(max_new_tokens=24)
    assert parse_options({"num_predict": -2}, ceiling=24) == GenerationOptions(max_new_tokens=24, fill_context=True)
    with pytest.raises(ValueError, match="num_predict"):  # without a ceiling, "no limit" has no meaning here
        parse_options({"num_predict": -1})


def test_fill_context_stops_when_prompt_and_answer_fill_it(base):
    ids = TOKENIZER.encode("Every effort moves you")  # 4 tokens; the context is 24
    gen = base.generation(ids, parse_options({"num_predict": -2, "temperature": 0}, ceiling=24))
    text = "".join(gen)
    assert gen.eval_count == 20 and gen.done_reason == "length"
    assert text == "".join(base.generation(ids, parse_options({"num_predict": 20, "temperature": 0})))
    gen = base.generation(ids, parse_options({"num_predict": -2, "temperature": 0}, ceiling=5))
    assert len(list(gen)) == 6 and gen.eval_count == 5  # the ceiling is lower than the room left


def test_alpaca_chat_prompt(sft):
    one = sft.chat_prompt([{"role": "user", "content": "Name a color."}])
    assert one == format_input({"instruction": "Name a color."}) + "\n\n### Response:\n"
    assert sft.generate_prompt("Name a color.") == one and sft.generate_prompt("x", raw=True) == "x"
    two = sft.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                           {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                           {"role": "user", "content": "more"}])
    first = {"instruction": "Q1", "output": "A1"}
    assert two == ("Be brief.\n\n" + format_input(first) + format_response(first) + "\n\n"
                   + format_input({"instruction": "Q2\n\nmore"}) + "\n\n### Response:\n")
    # A final assistant message is continued, not answered.
    assert sft.chat_prompt([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The"}]).endswith(
        "### Response:\nThe")
    with pytest.raises(ValueError, match="message 0"):
        sft.chat_prompt([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="message 1"):
        sft.chat_prompt([{"role": "user", "content": "x"}, {"role": "user", "content": 3}])


def test_base_model_prompt_is_the_plain_text(base):
    assert base.style is None and base.template() == "{{ .Prompt }}"
    assert base.chat_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "a\n\nb"
    assert base.generate_prompt("Every effort", system="Be brief.") == "Be brief.\n\nEvery effort"


def test_loading_names_and_styles(sft, base, tmp_path):
    assert sft.style == "alpaca" and sft.name == "tiny-sft:latest" and sft.matches("tiny-sft")
    assert sft.matches("TINY-SFT:latest") and not sft.matches("tiny-sft:7b") and not sft.matches("llama3")
    assert base.name == "pretrained:latest" and base.style is None
    # The folder of a fine-tuned model, a forced style and a chosen name.
    other = load_chat_model(tmp_path, device="cpu", name="judge", style="phi3")
    assert other.name == "judge:latest" and other.style == "phi3"
    assert other.chat_prompt([{"role": "user", "content": "hi"}]) == "<|user|>\nhi\n<|assistant|>\n"
    assert load_chat_model(tmp_path / "pretrained" / "model.pth", device="cpu").name == "pretrained-model:latest"
    save_finetuned_model(sft.model, tmp_path / "second-sft.pth")
    with pytest.raises(ValueError, match="several fine-tuned models"):
        load_chat_model(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="prompt style"):
        load_chat_model(tmp_path / "tiny-sft.pth", style="chatml")
    with pytest.raises(ValueError, match="model name"):
        load_chat_model(tmp_path / "tiny-sft.pth", name="bad name")


def test_encode_refuses_or_truncates_long_prompts(base):
    text = " ".join(["word"] * 30)
    ids = TOKENIZER.encode(text)
    with pytest.raises(PromptTooLong, match="30 tokens, longer than the model's context of 24"):
        base.encode(text)
    assert base.encode(text, truncate=True) == ids[-24:]
    with pytest.raises(ValueError, match="empty"):
        base.generation([], GenerationOptions())


def test_generation_equals_generate_and_reports_why_it_stopped(base):
    ids = TOKENIZER.encode("Every effort moves you")
    opts = GenerationOptions(temperature=1.0, top_k=40, top_p=None, seed=9, max_new_tokens=30)
    gen = base.generation(ids, opts)
    pieces = list(gen)
    want = generate(base.model, torch.tensor([ids]), 30, 24, temperature=1.0, top_k=40, use_cache=True,
                    generator=torch.Generator().manual_seed(9))[0, len(ids):].tolist()
    assert "".join(pieces) == TOKENIZER.decode(want)
    assert len(pieces) == 31 and gen.eval_count == 30 and gen.done_reason == "length"  # one piece per token + flush
    # A stop string across a token boundary cuts there; a string that never completes loses nothing.
    text = TOKENIZER.decode(want)
    first_len = len(TOKENIZER.decode(want[:3]))
    stop = text[first_len - 1:first_len + 1]
    gen = base.generation(ids, GenerationOptions(**{**opts.__dict__, "stop": (stop,)}))
    assert "".join(gen) == text[:text.index(stop)] and gen.done_reason == "stop" and gen.eval_count <= 4
    gen = base.generation(ids, GenerationOptions(**{**opts.__dict__, "stop": (text[-2:] + "\x00",)}))
    assert "".join(gen) == text and gen.done_reason == "length"


def test_characters_split_over_tokens_come_out_whole(base, monkeypatch):
    text = "héllo 😀 wörld ✓"
    ids = TOKENIZER.encode(text)
    assert any("\ufffd" in TOKENIZER.decode([i]) for i in ids)  # some tokens hold part of a character

    def fake_stream(*args, **kwargs):
        yield from ids

    monkeypatch.setattr(chat_module, "generate_stream", fake_stream)
    pieces = list(base.generation([1], GenerationOptions(max_new_tokens=len(ids) + 5)))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_respond_and_closing_early(sft):
    ids = sft.encode(sft.chat_prompt([{"role": "user", "content": "Hi"}]))
    want = generate(sft.model, torch.tensor([ids]), 5, 64, use_cache=True)[0, len(ids):].tolist()
    assert sft.respond([{"role": "user", "content": "Hi"}], parse_options({"temperature": 0, "num_predict": 5})) == (
        TOKENIZER.decode(want))
    gen = sft.generation(ids, parse_options({"temperature": 0, "num_predict": 1000}))
    next(gen), next(gen)
    gen.close()
    assert gen.eval_count == 2
    with pytest.raises(StopIteration):
        next(gen)
