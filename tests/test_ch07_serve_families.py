"""`python -m ch07.serve` and the chat layer with Llama 3, Qwen3 (dense and MoE) and Gemma 3 folders.

Tiny random transformers models (tests/hf_tiny.py) are served through the Ollama and OpenAI
clients; their greedy answers must be chapter 5's `generate_text(..., chat=True)` and transformers'
greedy `generate` on the prompt its `apply_chat_template` writes (the families' Jinja templates,
below, given to the tiny tokenizers). The tokenizer adapter's token-by-token bytes must decode to
what the tokenizer decodes, characters split over byte tokens included.
"""

import json
import os
import re
import subprocess
import sys
import threading

import gradio as gr
import ollama
import openai
import pytest
import torch

import webapp
from ch05.llama.generate_llm import generate_text, load_llm
from ch07.cli import family_folder, load_chat_model, serve_main
from hf_tiny import GEMMA_SPECIAL, model_dir_fixture, verdict
from llmfs.apps import load_app_model, stream_text
from llmfs.chat import GenerationOptions
from llmfs.chat_families import HFTokenizer
from test_llmfs_serve import REPO, serving

FAMILIES = ["llama", "qwen3", "qwen3_moe", "gemma3_text"]
OLLAMA_NAMES = {"llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3"}
SYSTEM, QUESTION = "Answer briefly.", "Who painted the picture of Mrs. Thwing?"
PROMPT = "I had always thought Jack Gisburn rather a cheap genius"
N = 10  # new tokens per answer
GREEDY = {"temperature": 0, "num_predict": N}

# The families' chat templates as their tokenizer_config.json writes them (Llama 3 Instruct; Qwen3's
# for plain messages, without tools or reasoning_content; Gemma 3's for text).
JINJA = {
    "llama": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
             "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
             "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
             "{{ content }}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "qwen3": "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + "
             "'<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if message.role == 'user' or "
             "(message.role == 'system' and not loop.first) %}{{- '<|im_start|>' + message.role + '\n' + "
             "message.content + '<|im_end|>' + '\n' }}{%- elif message.role == 'assistant' %}"
             "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
             "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
             "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}"
             "{%- endif %}{%- endif %}",
    "gemma3_text": "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = "
                   "messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}"
                   "{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
                   "{%- for message in loop_messages -%}{%- if (message['role'] == 'user') != "
                   "(loop.index0 % 2 == 0) -%}{{ raise_exception('Conversation roles must alternate') }}"
                   "{%- endif -%}{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
                   "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + "
                   "'\n' + (first_user_prefix if loop.first else \"\") }}{{ message['content'] | trim }}"
                   "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}"
                   "{{'<start_of_turn>model\n'}}{%- endif -%}",
}
JINJA["qwen3_moe"] = JINJA["qwen3"]
BOS = {"llama": "<|begin_of_text|>", "gemma3_text": "<bos>"}
# Gradio's queue calls a pandas option that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    """(family, folder, transformers model) of one tiny family."""
    path, hf = model_dir_fixture(tmp_path_factory, request.param)
    return request.param, path, hf


@pytest.fixture(scope="module")
def family_server(family_dir):
    family, path, hf = family_dir
    with serving(path) as (url, app):
        yield family, path, hf, url, app


def hf_tokenizer(family, path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token=BOS.get(family))
    tok.chat_template = JINJA[family]
    return tok


def hf_answer(hf, ids: list[int], stop_ids) -> list[int]:
    """transformers' greedy answer to `ids`, without the token that ended it."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, eos_token_id=sorted(stop_ids),
                          pad_token_id=0)
    return [t for t in out[0, len(ids):].tolist() if t not in stop_ids]


def test_greedy_answers_equal_chapter_5_and_transformers(family_server):
    """/api/chat, /api/generate and /v1/chat/completions, streamed and not: the chapter's and transformers' answer."""
    family, path, hf, url, app = family_server
    chat, llm = app.state.worker.chat, load_llm(path)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    # The prompt: the same text as transformers' apply_chat_template, the same ids as chapter 5's tokenizer.
    tok = hf_tokenizer(family, path)
    template = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert chat.chat_prompt(messages) == template
    ids = chat.encode(template)
    assert ids == llm.tokenizer.encode(QUESTION, chat=True, system=SYSTEM) == tok(template, add_special_tokens=False).input_ids
    expected, expected_ids = generate_text(llm, QUESTION, max_new_tokens=N, chat=True, system=SYSTEM)
    assert expected_ids == hf_answer(hf, ids, llm.tokenizer.stop_ids)
    assert expected == tok.decode(expected_ids, skip_special_tokens=True) and len(expected_ids) == N

    client = ollama.Client(host=url)
    name = chat.name
    reply = client.chat(model=name, messages=messages, options=GREEDY)
    assert reply.message.content == expected and reply.eval_count == len(expected_ids)
    assert reply.prompt_eval_count == len(ids)
    streamed = list(client.chat(model=name, messages=messages, options=GREEDY, stream=True))
    assert "".join(c.message.content for c in streamed) == expected and streamed[-1].done
    reply = client.generate(model=name, prompt=QUESTION, system=SYSTEM, options=GREEDY)
    assert reply.response == expected
    # raw: the text as written (after the begin-of-text token), as chapter 5 continues it without --chat
    plain, _ = generate_text(llm, QUESTION, max_new_tokens=N)
    assert client.generate(model=name, prompt=QUESTION, raw=True, options=GREEDY).response == plain
    pieces = client.generate(model=name, prompt=QUESTION, raw=True, options=GREEDY, stream=True)
    assert "".join(c.response for c in pieces) == plain

    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    done = oa.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=N)
    assert done.choices[0].message.content == expected and done.usage.completion_tokens == len(expected_ids)
    chunks = oa.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=N, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert oa.completions.create(model=name, prompt=QUESTION, temperature=0, max_tokens=N).choices[0].text == plain


CONCURRENT = [("Who painted the picture?", 7), ("I had always thought", 3), ("Jack", 10),
              ("Mrs. Thwing had a lovely view of the sea and", 5), ("Why", 9)]


def test_concurrent_requests_decode_together_each_with_its_own_answer(family_dir):
    """Five chats and raw continuations of different lengths at once, over both clients: they meet in
    one batch (llmfs.batched's RoPE layout), and each answer is the one chapter 5 gives it alone."""
    family, path, _ = family_dir
    llm = load_llm(path)
    expected = [generate_text(llm, q, max_new_tokens=n, chat=i % 2 == 0)[0] for i, (q, n) in enumerate(CONCURRENT)]
    with serving(path, step_delay=0.05) as (url, app):
        worker, name = app.state.worker, app.state.worker.chat.name
        assert worker.batch is not None and worker.max_batch_size == 8
        results, errors = {}, []

        def ask(i):
            question, n = CONCURRENT[i]
            try:
                if i % 2 == 0:
                    parts = ollama.Client(host=url).chat(model=name, stream=True, options={"temperature": 0,
                                                         "num_predict": n},
                                                         messages=[{"role": "user", "content": question}])
                    results[i] = "".join(p.message.content for p in parts)
                else:
                    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
                    parts = oa.completions.create(model=name, prompt=question, temperature=0, max_tokens=n,
                                                  stream=True)
                    results[i] = "".join(p.choices[0].text for p in parts)
            except Exception as exc:  # collected: an assertion in a thread would be lost
                errors.append(repr(exc))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(CONCURRENT))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert [results[i] for i in range(len(CONCURRENT))] == expected
        assert max(worker.batch_sizes) >= 3, worker.batch_sizes  # they did decode together


def test_multi_turn_conversations_follow_the_template(family_server):
    """A conversation with an earlier answer is written as apply_chat_template writes it; a final
    assistant message is an answer begun, which the model continues."""
    family, path, _, _, app = family_server
    chat, tok = app.state.worker.chat, hf_tokenizer(family, path)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there."}, {"role": "user", "content": QUESTION}]
    assert chat.chat_prompt(messages) == tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                 tokenize=False, enable_thinking=False)
    begun = chat.chat_prompt([*messages, {"role": "assistant", "content": "It was"}])
    assert begun == chat.chat_prompt(messages) + "It was"


def test_show_and_tags_report_the_family(family_server):
    family, path, hf, url, app = family_server
    client = ollama.Client(host=url)
    chat = app.state.worker.chat
    shown = client.show(chat.name)
    arch = OLLAMA_NAMES[family]
    assert shown.details.family == arch and shown.details.families == [arch]
    assert shown.details.format == "safetensors" and shown.details.quantization_level == "F32"
    info = shown.modelinfo
    assert info["general.architecture"] == arch
    assert info[f"{arch}.context_length"] == hf.config.max_position_embeddings == chat.context_length
    assert info[f"{arch}.block_count"] == hf.config.num_hidden_layers
    assert info["general.parameter_count"] == sum(p.numel() for p in chat.model.parameters())
    if family == "qwen3_moe":
        assert info["qwen3moe.expert_count"] == hf.config.num_experts and info["qwen3moe.expert_used_count"] == 2
    assert "{{ .Prompt }}" in shown.template and "{{ .Response }}" in shown.template
    assert client.list().models[0].details.family == arch


@pytest.mark.parametrize("which", [0, -1])  # the end of a turn, the end of the text
def test_an_answer_stops_at_either_stop_token(family_dir, which):
    """The model's end-of-turn and end-of-text tokens both end the answer; neither is part of it."""
    family, path, _ = family_dir
    chat, llm = load_chat_model(path, device="cpu"), load_llm(path)
    stop_id = llm.tokenizer.token_id(llm.tokenizer.stop_tokens[which])
    steps = []

    def force_stop(module, inputs, out):  # the third new token is the stop token
        steps.append(1)
        return out.index_fill(-1, torch.tensor([stop_id]), 1e4) if len(steps) == 3 else out

    chat.model.out_head.register_forward_hook(force_stop)
    gen = chat.generation(chat.encode(chat.chat_prompt([{"role": "user", "content": QUESTION}])),
                          GenerationOptions(temperature=0, max_new_tokens=N))
    text = "".join(gen)
    assert gen.done_reason == "stop" and gen.eval_count == 2
    steps.clear()
    llm.model.out_head.register_forward_hook(force_stop)
    expected, ids = generate_text(llm, QUESTION, max_new_tokens=N, chat=True)
    assert len(ids) == 2 and text == expected


def _streamed(adapter: HFTokenizer, ids: list[int]) -> str:
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return "".join(decoder.decode(adapter.decode_single_token_bytes(t)) for t in ids) + decoder.decode(b"", final=True)


TEXT = "Café ☃ naïve 中文 🙂 déjà-vu"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_byte_level_tokens_stream_to_the_decoded_text(family, tmp_path):
    """Byte-level BPE: characters split over byte tokens come out whole, special tokens as nothing."""
    from hf_tiny import write_model_dir

    write_model_dir(tmp_path, family, verdict())
    llm = load_llm(tmp_path)
    adapter = HFTokenizer(llm.tokenizer.tokenizer)
    ids = llm.tokenizer.encode(TEXT, chat=True, system="Sé breve.")
    assert any(len(adapter.decode_single_token_bytes(t)) == 1 and adapter.decode_single_token_bytes(t)[0] >= 0x80
               for t in ids)  # a lone byte of a character: the test sees a split
    assert _streamed(adapter, ids) == adapter.decode(ids) == llm.tokenizer.decode(ids)
    assert TEXT in adapter.decode(ids)


def test_sentencepiece_tokens_with_byte_fallback_stream_to_the_decoded_text(tmp_path):
    """Gemma-style pieces: "▁" is a space, <0xNN> tokens are bytes (characters the vocabulary lacks)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
    base.train_from_iterator([verdict().replace(" ", "▁")],
                             trainers.BpeTrainer(vocab_size=300, special_tokens=GEMMA_SPECIAL))
    spec = json.loads(base.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(GEMMA_SPECIAL)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    adapter = HFTokenizer(tok)
    ids = adapter.encode("<bos><start_of_turn>user\n" + TEXT + "<end_of_turn>\n")
    assert tok.token_to_id("<0xE2>") in ids  # the snowman's first byte
    assert _streamed(adapter, ids) == adapter.decode(ids) == tok.decode(ids) == "user\n" + TEXT + "\n"


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return model_dir_fixture(tmp_path_factory, "gemma3_text")[0]


def test_the_command_serves_a_family_folder(gemma_dir):
    """`python -m ch07.serve --model DIR` for a Hugging Face folder: its template, family and answer."""
    path = gemma_dir
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMFS_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "ch07.serve", "--model", str(path), "--port", "0",
                             "--name", "tiny-gemma"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        lines = []
        while not (lines and "OLLAMA_HOST=" in lines[-1]):
            lines.append(proc.stderr.readline())
            assert lines[-1], "the server stopped: " + "".join(lines)
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        assert "model: tiny-gemma:latest = gemma3_text from " in lines[-2] and "prompt style: gemma3" in lines[-2]
        client = ollama.Client(host=re.search(r"OLLAMA_HOST=(\S+)", lines[-1]).group(1))
        assert client.show("tiny-gemma").details.family == "gemma3"
        expected, _ = generate_text(load_llm(path), QUESTION, max_new_tokens=N, chat=True)
        reply = client.chat(model="tiny-gemma", messages=[{"role": "user", "content": QUESTION}], options=GREEDY)
        assert reply.message.content == expected
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_family_folders_are_recognised_and_bad_styles_refused(family_dir, tmp_path, capsys):
    family, path, _ = family_dir
    assert family_folder(path) == family and family_folder(tmp_path) is None
    assert family_folder(tmp_path / "missing") is None
    (tmp_path / "config.json").write_text("[1, 2]")
    assert family_folder(tmp_path) is None
    chat = load_chat_model(path, device="cpu", style=None)  # no template: plain text after begin-of-text
    assert chat.chat_prompt([{"role": "user", "content": "Hi"}]) == BOS.get(family, "") + "Hi"
    assert serve_main(["--model", str(path), "--port", "0", "--prompt-style", "alpaca"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: prompt style 'alpaca' is chapter 7's") and "\n" not in err


# --- The apps: chapter 7's chat page and chapter 5's text page with a family folder -------------------

def slowed_family_model(seconds: float = 0.1):
    """Each Llama-family forward pass takes `seconds` longer, so a browser sees the text grow."""
    from ch05.llama.llama3 import Llama3Model

    return webapp.slowed_generation(seconds, Llama3Model)


def test_the_chat_app_loads_a_family_folder(gemma_dir):
    """ch07.ui's loading path: the chat layer's model, answering as `python -m ch05.llama --chat` does."""
    from ch07.ui import app as ch07_app

    loaded = load_app_model(ch07_app.load_family_model, str(gemma_dir), "cpu", ch07_app.HINT)
    assert loaded.error is None and loaded.info.family == "gemma3_text"
    texts = list(ch07_app.family_answers(loaded.info, QUESTION, N))  # one per token, then the end
    expected, ids = generate_text(load_llm(gemma_dir), QUESTION, max_new_tokens=N, chat=True)
    assert len(texts) == N + 1 and len(ids) == N and texts[-1] == expected and all(expected.startswith(t) for t in texts)
    assert isinstance(ch07_app.build_demo(str(gemma_dir), "cpu", N), gr.Blocks)


def test_the_text_app_loads_a_family_folder(gemma_dir):
    """ch05.ui's loading path: the prompt continued as `python -m ch05.llama` (no --chat) continues it."""
    from ch05.ui import app as ch05_app

    assert ch05_app.is_family_folder(str(gemma_dir)) and not ch05_app.is_family_folder(str(gemma_dir / "none"))
    llm = load_llm(gemma_dir)
    texts = list(stream_text(llm.model, ch05_app.FamilyTokenizer(llm.tokenizer), PROMPT, N, 1.0, top_k=20, seed=7,
                             eos_id=llm.tokenizer.token_id("<eos>")))
    expected, _ = generate_text(llm, PROMPT, max_new_tokens=N, temperature=1.0, top_k=20, seed=7)
    assert texts[-1] == PROMPT + expected
    assert isinstance(ch05_app.build_demo(str(gemma_dir)), gr.Blocks)


@webapp.requires_chromium
def test_the_chat_page_streams_a_family_models_answer(gemma_dir):
    from ch07.ui import app as ch07_app

    expected, _ = generate_text(load_llm(gemma_dir), QUESTION, max_new_tokens=N, chat=True)
    demo = ch07_app.build_demo(str(gemma_dir), max_new_tokens=N)
    with slowed_family_model(), webapp.app_page(demo) as page:
        assert "gemma3_text chat template" in page.inner_text("body")
        page.fill("#prompt textarea", QUESTION)
        answer = "#chat .bot .message-content"
        webapp.record_changes(page, answer, prop="textContent")
        page.click("#send")
        webapp.wait_for_text(page, answer, expected, prop="textContent")
        seen = webapp.recorded(page)
    assert len(seen) >= 3 and all(expected.startswith(text) for text in seen)


@webapp.requires_chromium
def test_the_text_page_continues_with_a_family_model(gemma_dir):
    from ch05.ui import app as ch05_app

    expected, _ = generate_text(load_llm(gemma_dir), PROMPT, max_new_tokens=N, temperature=0.0)
    with slowed_family_model(), webapp.app_page(ch05_app.build_demo(str(gemma_dir))) as page:
        assert "gemma3_text from" in page.inner_text("body")
        page.fill("#prompt textarea", PROMPT)
        for control, value in (("max-new-tokens", N), ("temperature", 0)):
            page.fill(f"#{control} input[type=number]", str(value))
            page.press(f"#{control} input[type=number]", "Enter")
        page.click("#generate")
        webapp.wait_for_text(page, "#output textarea", PROMPT + expected)
