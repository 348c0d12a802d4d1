"""ch05/extend-tokenizers/extend-tokenizers.ipynb: new tokens for GPT-2's tokenizer and rows for them in the model.

Recomputes the notebook's claims with the project's code (fast, tiny configs, no network):
* tiktoken's GPT-2 encoding extended with two special tokens and two ordinary words (ids 50257-50260), built
  here independently: the ids before (pieces) and after (one id each), old texts keeping their ids, the variants
  that stay in pieces; our `BPETokenizerSimple` loading the same ranks gives the same ids;
* the notebook's own `grow_vocab` / `init_new_rows` / `ChatTokenizer` / `new_token_hits` (its definition-only
  cells, executed here): old rows bit-identical, new rows the means, the weight tie kept (also through an
  optimizer step), the old vocabulary's logits unchanged, each new token at most as likely as its sources on
  average, and a short fine-tuning lowering the loss;
and reads the stored outputs (quick mode) to check that what the notebook shows agrees.
"""

from __future__ import annotations

import ast
import base64
import json
import re

import pytest
import tiktoken
import tiktoken.load
import torch
import torch.nn as nn

from ch02.bpe.bpe import BPETokenizerSimple
from ch02.dataloader import create_dataloader_v1
from ch02.tokenizer import END_OF_TEXT, GPT2_PATTERN, GPT2_RANKS_FILE, get_gpt2_tokenizer
from ch04.gpt import QUICK_CONFIG, GPTModel
from ch05.gpt_train import calc_loss_batch
from llmfs.download import get_data_file
from nbexec import REPO

NOTEBOOK = REPO / "ch05" / "extend-tokenizers" / "extend-tokenizers.ipynb"
N_OLD = 50257
NEW_SPECIALS = {"<|user|>": 50257, "<|assistant|>": 50258}
NEW_WORDS = {" MyNewToken": 50259, " 词元": 50260}
SPECIAL_TOKENS = {END_OF_TEXT: 50256, **NEW_SPECIALS}
TEXT = ("<|user|> What is MyNewToken?<|assistant|> MyNewToken is a new word; in Chinese, a token is 词元."
        + END_OF_TEXT)
TINY = {**QUICK_CONFIG, "emb_dim": 32, "n_heads": 2, "n_layers": 1, "context_length": 32, "drop_rate": 0.0}


# --- the notebook ---------------------------------------------------------------------------------------

def cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def outputs(cell: dict) -> str:
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []))


def output_of(line: str) -> str:
    """The stored output of the one code cell whose source contains `line`."""
    found = [c for c in cells() if c["cell_type"] == "code" and line in source(c)]
    assert len(found) == 1, f"{len(found)} code cells contain {line!r}"
    return outputs(found[0])


@pytest.fixture(scope="module")
def nb() -> dict:
    """The notebook's definition-only code cells, executed: its functions and classes, not copies.

    `new_token_hits` reads the notebook's globals `device` and `n_old`; they are set here."""
    namespace = {"torch": torch, "nn": nn, "GPTModel": GPTModel, "tiktoken": tiktoken, "device": "cpu",
                 "n_old": N_OLD}
    for cell in cells():
        if cell["cell_type"] != "code":
            continue
        tree = ast.parse(source(cell))
        if tree.body and all(isinstance(node, (ast.FunctionDef, ast.ClassDef)) for node in tree.body):
            exec(compile(tree, cell["id"], "exec"), namespace)
    assert {"init_new_rows", "grow_vocab", "ChatTokenizer", "new_token_hits"} <= namespace.keys()
    return namespace


# --- the tokenizers, built here -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2() -> tiktoken.Encoding:
    return get_gpt2_tokenizer()


@pytest.fixture(scope="module")
def new_ranks() -> dict[bytes, int]:
    return {word.encode("utf-8"): i for word, i in NEW_WORDS.items()}


@pytest.fixture(scope="module")
def extended(new_ranks) -> tiktoken.Encoding:
    ranks = tiktoken.load.load_tiktoken_bpe(str(GPT2_RANKS_FILE))
    return tiktoken.Encoding(name="gpt2-extended", pat_str=GPT2_PATTERN, mergeable_ranks={**ranks, **new_ranks},
                             special_tokens=SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def ours(tmp_path_factory, new_ranks) -> BPETokenizerSimple:
    path = tmp_path_factory.mktemp("ranks") / "gpt2-extended.tiktoken"
    lines = "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in new_ranks.items())
    path.write_text(GPT2_RANKS_FILE.read_text(encoding="ascii") + lines, encoding="ascii")
    tokenizer = BPETokenizerSimple()
    tokenizer.load_tiktoken_ranks(path, special_tokens=SPECIAL_TOKENS)
    return tokenizer


def test_gpt2_splits_the_new_markers_and_words_into_pieces(gpt2):
    counts = {new: len(gpt2.encode(new)) for new in [*NEW_SPECIALS, *NEW_WORDS]}
    assert counts == {"<|user|>": 5, "<|assistant|>": 6, " MyNewToken": 3, " 词元": 5}
    before = gpt2.encode(TEXT, allowed_special={END_OF_TEXT})
    assert not any(i > 50256 for i in before) and before[:5] == gpt2.encode("<|user|>")


def test_the_extended_encoding_gives_one_id_each(gpt2, extended):
    allowed = set(SPECIAL_TOKENS)
    assert extended.n_vocab == N_OLD + 4
    for new, i in {**NEW_SPECIALS, **NEW_WORDS}.items():
        assert extended.encode(new, allowed_special=allowed) == [i]
    before = gpt2.encode(TEXT, allowed_special={END_OF_TEXT})
    after = extended.encode(TEXT, allowed_special=allowed)
    # Each marker and word in the text collapses from its pieces to one id; nothing else changes.
    saved = (5 - 1) + (6 - 1) + 2 * (3 - 1) + (5 - 1)  # <|user|>, <|assistant|>, 2x MyNewToken, 词元
    assert len(before) - len(after) == saved
    assert [i for i in after if i >= N_OLD] == [50257, 50259, 50258, 50259, 50260]
    assert extended.decode(after) == TEXT


def test_no_two_gpt2_tokens_spell_a_new_word_so_old_texts_keep_their_ids(gpt2, extended):
    ranks = tiktoken.load.load_tiktoken_bpe(str(GPT2_RANKS_FILE))
    for word in NEW_WORDS:
        b = word.encode("utf-8")
        assert not [k for k in range(1, len(b)) if b[:k] in ranks and b[k:] in ranks]
    verdict = get_data_file("the-verdict.txt", download=False).read_text(encoding="utf-8")
    for text in [verdict, "MyNewTokens, and myNewToken", "分词器把词元变成整数", "词元", "Every effort moves you"]:
        assert extended.encode(text) == gpt2.encode(text)
    typed = "I typed <|assistant|> myself"
    with pytest.raises(ValueError):
        extended.encode(typed)
    assert extended.encode(typed, disallowed_special=()) == gpt2.encode(typed)


def test_variants_of_the_new_words_stay_in_pieces(gpt2, extended):
    for variant in [" MyNewTokens", "MyNewToken", " 词元是"]:
        assert extended.encode(variant) == gpt2.encode(variant)
        assert all(i < N_OLD for i in extended.encode(variant))


def test_our_bpe_gives_tiktokens_ids_before_and_after(gpt2, extended, ours):
    plain = BPETokenizerSimple()
    plain.load_tiktoken_ranks()
    assert plain.encode(TEXT, allowed_special={END_OF_TEXT}) == gpt2.encode(TEXT, allowed_special={END_OF_TEXT})
    allowed = set(SPECIAL_TOKENS)
    for text in [TEXT, " MyNewToken 词元 MyNewTokens 词元是", "<|user|> 词元<|assistant|> MyNewToken", "Hello"]:
        ids = ours.encode(text, allowed_special=allowed)
        assert ids == extended.encode(text, allowed_special=allowed)
        assert ours.decode(ids) == text
    assert len(ours.vocab) == N_OLD + 4
    with pytest.raises(ValueError):
        ours.encode("<|user|> hi")  # not allowed: a user's text cannot inject it


# --- the model ------------------------------------------------------------------------------------------

def sources(gpt2) -> list[list[int]]:
    return [list(range(N_OLD))] * 2 + [gpt2.encode(word) for word in NEW_WORDS]


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_growing_keeps_old_rows_logits_and_the_tie(nb, gpt2, tie):
    torch.manual_seed(123)
    model = GPTModel({**TINY, "tie_weights": tie}).eval()
    probe = torch.tensor([gpt2.encode(TEXT, allowed_special={END_OF_TEXT})[:TINY["context_length"]]])
    old_emb, old_head = model.tok_emb.weight.detach().clone(), model.out_head.weight.detach().clone()
    with torch.no_grad():
        old_logits = model(probe)
    src = sources(gpt2)
    nb["grow_vocab"](model, src)
    emb, head = model.tok_emb.weight, model.out_head.weight
    assert (head is emb) == tie
    assert emb.shape == head.shape == (N_OLD + 4, TINY["emb_dim"]) and model.cfg["vocab_size"] == N_OLD + 4
    assert torch.equal(emb[:N_OLD], old_emb) and torch.equal(head[:N_OLD], old_head)
    for row, ids in enumerate(src):
        assert torch.allclose(emb[N_OLD + row], old_emb[ids].mean(dim=0), atol=1e-7)
        assert torch.allclose(head[N_OLD + row], old_head[ids].mean(dim=0), atol=1e-7)
    with torch.no_grad():
        new_logits = model(probe)
        model(torch.tensor([[50260, 50257]]))  # the new ids are accepted
    assert new_logits.shape[-1] == N_OLD + 4
    assert torch.allclose(new_logits[..., :N_OLD], old_logits, atol=1e-6)
    # exp is convex: each new token is at most as likely as its sources on average.
    probs = torch.softmax(new_logits, dim=-1)
    average = torch.stack([probs[..., ids].mean(dim=-1) for ids in src], dim=-1)
    assert bool((probs[..., N_OLD:] <= average * (1 + 1e-5)).all())


def test_the_tie_survives_an_optimizer_step(nb, gpt2):
    torch.manual_seed(123)
    model = nb["grow_vocab"](GPTModel({**TINY, "tie_weights": True}), sources(gpt2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.tok_emb.weight.detach().clone()
    probe = torch.tensor([[50257, 1867, 318, 50259, 30, 50258, 50260, 13]])
    calc_loss_batch(probe[:, :-1], probe[:, 1:], model, "cpu").backward()
    optimizer.step()
    assert model.out_head.weight is model.tok_emb.weight
    assert not torch.equal(model.tok_emb.weight[N_OLD:], before[N_OLD:])  # the new rows learn


def test_fine_tuning_lowers_the_loss_on_text_with_the_new_tokens(nb, gpt2, extended):
    tokenizer = nb["ChatTokenizer"](extended, set(SPECIAL_TOKENS))
    text = "".join(f"<|user|> What is{w}?<|assistant|>{w} is new.{END_OF_TEXT}" for w in NEW_WORDS) * 16
    assert set(tokenizer.encode(text)) >= {50257, 50258, 50259, 50260}
    window = {"batch_size": 4, "max_length": 16, "stride": 16, "tokenizer": tokenizer}
    loader = create_dataloader_v1(text, generator=torch.Generator().manual_seed(123), **window)
    every_window = create_dataloader_v1(text, shuffle=False, drop_last=False, **window)
    torch.manual_seed(123)
    model = nb["grow_vocab"](GPTModel(TINY), sources(gpt2))
    hits_before, total = nb["new_token_hits"](model, every_window)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(6):
        for inputs, targets in loader:
            model.train()
            optimizer.zero_grad()
            loss = calc_loss_batch(inputs, targets, model, "cpu")
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 5
    hits_after, total_after = nb["new_token_hits"](model, every_window)
    assert total == total_after > 0 and hits_before < total / 10 < total / 2 < hits_after


# --- the stored outputs ---------------------------------------------------------------------------------

def ids_after(label: str, text: str) -> list[int]:
    m = re.search(rf"^{re.escape(label)}\s*\((\d+) ids\): (\[[\d, ]*\])$", text, re.M)
    assert m, f"no '{label} (N ids): [...]' line"
    ids = json.loads(m.group(2))
    assert int(m.group(1)) == len(ids)
    return ids


def test_the_stored_outputs_are_from_quick_mode_and_show_the_ids(gpt2, extended):
    nbjson = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nbjson["metadata"]["llmfs"]["mode"] == "quick"
    assert "Stored outputs: quick mode" in source(cells()[0])
    shown = output_of("extended = tiktoken.Encoding(")
    assert ids_after("GPT-2", shown) == gpt2.encode(TEXT, allowed_special={END_OF_TEXT})
    assert ids_after("extended", shown) == extended.encode(TEXT, allowed_special=set(SPECIAL_TOKENS))
    assert "vocabulary: 50,257 -> 50,261 tokens" in shown
    assert f"new ids: {({**NEW_SPECIALS, **NEW_WORDS})}" in shown
    pieces = output_of("def pieces(")
    for new, n in {"<|user|>": 5, "<|assistant|>": 6, " MyNewToken": 3, " 词元": 5}.items():
        assert re.search(rf"^{re.escape(repr(new))}\s+{n} tokens:", pieces, re.M), new


def test_the_stored_checks_print_true():
    assert output_of("for word in NEW_WORDS:").count("0 ways to spell it with two GPT-2 tokens") == 2
    old = output_of("old_texts = [")
    assert "old texts, old ids: True" in old and "typed marker as plain text, old ids: True" in old
    assert "ValueError" in old
    ours = output_of("ours = BPETokenizerSimple()")
    for line in ["before, same ids as tiktoken: True", "after, same ids as tiktoken:  True",
                 "same ids on 7 texts: True", "decodes back: True", "our BPE: 50,257 -> 50,261 tokens"]:
        assert line in ours
    grown = output_of("grow_vocab(m, sources)")
    assert grown.count("old rows bit-identical: True") == 2 and grown.count("new rows are the means: True") == 2
    assert grown.count("old-vocabulary logits unchanged (allclose, atol=1e-06): True") == 2
    assert re.search(r"^GPTModel:.*\n  tied: False$", grown, re.M)
    assert re.search(r"^tied GPTModel:.*\n  tied: True$", grown, re.M)
    # Parameters grow by 4 new rows in each matrix (one matrix when tied).
    emb = QUICK_CONFIG["emb_dim"]
    for name, matrices in [("GPTModel", 2), ("tied GPTModel", 1)]:
        m = re.search(rf"^{name}:.*parameters ([\d,]+) -> ([\d,]+)$", grown, re.M)
        old, new = (int(x.replace(",", "")) for x in m.groups())
        assert new - old == 4 * emb * matrices
    assert "after a step: tied True | matrix changed True" in output_of("optimizer = torch.optim.AdamW(tied.")
    share = output_of("def new_token_share(")
    assert "at most as likely as its sources on average (relative tolerance 1e-5): True" in share
    m = re.search(r"mean rows ([\d.e+-]+), N\(0, 1\) rows ([\d.]+)%", share)
    assert float(m.group(1)) < 1e-3 < 0.1 < float(m.group(2)) / 100


def test_the_stored_fine_tuning_lowers_the_loss_and_predicts_new_tokens():
    log = output_of("train_model_simple(")
    steps = [(float(a), float(b)) for a, b in re.findall(r"Train loss ([\d.]+), Val loss ([\d.]+)", log)]
    assert len(steps) >= 3 and steps[-1][0] < steps[0][0] - 5 and steps[-1][1] < steps[0][1] - 5
    m = re.search(r"training loss ([\d.]+) -> ([\d.]+), validation loss ([\d.]+) -> ([\d.]+)", log)
    assert [float(x) for x in m.groups()] == [steps[0][0], steps[-1][0], steps[0][1], steps[-1][1]]
    assert re.search(r"s on .+ \(threads: \d+\), torch \d", log), "the time is printed with the CPU and torch"
    before = re.search(r"new tokens predicted (\d+) of (\d+)", output_of("before fine-tuning: validation"))
    after_text = output_of('print("after fine-tuning: new tokens')
    after = re.search(r"new tokens predicted (\d+) of (\d+)", after_text)
    assert before.group(1) == "0" and before.group(2) == after.group(2) and int(after.group(1)) > 0
    starred = [int(i) for i in re.findall(r"'(\d+)\*'", after_text)]
    assert starred and all(i in {50257, 50258, 50259, 50260} for i in starred)
