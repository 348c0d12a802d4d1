"""Tests for ch06/ui/app.py, driven in a headless Chromium: a quick-mode classifier, trained here with
chapter 6's own `main` (two epochs, ~10 s), labels a known spam and a known ham message of the
test split correctly in the page, with the probabilities `class_probabilities` gives and the label
`classify_review` gives; an empty text and a classifier file that is not one get a message.
"""

import pytest

import webapp
from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch06.cli import QUICK_SETTINGS
from ch06.cli import finetune as main
from ch06.gpt_class_finetune import CLASS_NAMES, classify_review, load_classifier, read_labeled_csv
from ch06.ui import app as ch06_app
from llmfs.apps import EMPTY_INPUT_MESSAGE
from llmfs.checkpoint import save_model

# Gradio's queue calls a pandas option that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(classifier path, test split) from two quick epochs (of --quick's four): ~94% test accuracy."""
    out = tmp_path_factory.mktemp("ch06")
    result = main({**QUICK_SETTINGS, "num_epochs": 2, "eval_freq": 10_000, "eval_iter": 1}, out, mode="quick",
                  device="cpu", progress=False)
    return result["model_path"], read_labeled_csv(out / "test.csv")


def test_class_probabilities_agree_with_classify_review(trained):
    model_path, test = trained
    model, meta = load_classifier(model_path)
    tokenizer = get_gpt2_tokenizer()
    for text in test["Text"][:20]:
        probas = ch06_app.class_probabilities(text, model, tokenizer, meta["max_length"])
        assert sum(probas.values()) == pytest.approx(1.0)
        assert max(probas, key=probas.get) == classify_review(text, model, tokenizer, "cpu", meta["max_length"])


def test_command_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        ch06_app.main(["--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m ch06.ui ")
    with pytest.raises(SystemExit) as exc:
        ch06_app.main(["--model", str(tmp_path / "missing.pth"), "--port", "http"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err == "error: argument --port: must be a whole number from 1 to 65535, got http (see --help)\n"


@webapp.requires_chromium
def test_page_labels_known_spam_and_ham(trained):
    model_path, test = trained
    model, meta = load_classifier(model_path)
    tokenizer = get_gpt2_tokenizer()
    with webapp.app_page(ch06_app.build_demo(str(model_path))) as page:
        for label in (0, 1):  # the first ham and the first spam message of the test split
            text = test.loc[test["Label"] == label, "Text"].iloc[0]
            expected = ch06_app.class_probabilities(text, model, tokenizer, meta["max_length"])
            page.fill("#text textarea", text)
            page.click("#classify")
            webapp.wait_for_text(page, "#verdict h2", CLASS_NAMES[label], prop="innerText")
            assert classify_review(text, model, tokenizer, "cpu", meta["max_length"]) == CLASS_NAMES[label]
            shown = float(page.get_attribute("#verdict meter[aria-label='spam']", "value"))
            assert shown == pytest.approx(expected["spam"], abs=1e-6)
            webapp.screenshot(page, "ch06-app")  # kept: the last one, spam
        page.fill("#text textarea", "")
        page.click("#classify")
        assert webapp.message_text(page) == EMPTY_INPUT_MESSAGE


@webapp.requires_chromium
def test_page_says_when_the_file_is_not_a_classifier(tmp_path):
    lm = tmp_path / "model.pth"  # a chapter-5 language model has no classifier metadata beside it
    save_model(GPTModel({**GPT_CONFIG_124M, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 1}), lm)
    with webapp.app_page(ch06_app.build_demo(str(lm))) as page:
        text = webapp.message_text(page)
        assert text.startswith(f"Could not load {lm}") and "model.json" in text
        assert "python -m ch06.gpt_class_finetune" in text


@pytest.fixture(scope="module")
def family_classifier(tmp_path_factory):
    """A spam classifier chapter 6 trained on a tiny Llama folder (`--model DIR`), saved with its tokenizer."""
    from hf_tiny import model_dir_fixture
    from test_ch06_experiments_families import run

    llama_dir = model_dir_fixture(tmp_path_factory, "llama")[0]
    return run(llama_dir, tmp_path_factory.mktemp("ch06-llama"))["model_path"]


def test_a_family_classifier_reads_the_message_with_its_own_tokenizer(family_classifier):
    import torch

    from ch06.experiments.families import load_family_classifier

    model, info = ch06_app.load_any_classifier(str(family_classifier), "cpu")
    assert info["family"] == "llama"
    reference, meta, tokenizer = load_family_classifier(family_classifier)
    for text in ["WINNER!! Claim your free prize now", "See you at dinner <|end_of_text|> tonight?"]:
        probas = ch06_app.class_probabilities(text, model, info["tokenizer"], info.get("max_length"))
        ids = tokenizer.encode(text)  # the family's tokens, begin-of-text first; a special token's text is text
        assert ids[0] == tokenizer.bos_id and tokenizer.pad_token_id not in ids[1:]
        with torch.no_grad():
            expected = torch.softmax(reference(torch.tensor([ids]))[0, -1], dim=-1)
        assert [probas[CLASS_NAMES[i]] for i in range(len(expected))] == pytest.approx(expected.tolist(), abs=1e-6)


@webapp.requires_chromium
def test_page_classifies_with_a_family_classifier(family_classifier):
    model, info = ch06_app.load_any_classifier(str(family_classifier), "cpu")
    text = "WINNER!! Claim your free prize now"
    expected = ch06_app.class_probabilities(text, model, info["tokenizer"], info.get("max_length"))
    with webapp.app_page(ch06_app.build_demo(str(family_classifier))) as page:
        page.fill("#text textarea", text)
        page.click("#classify")
        webapp.wait_for_text(page, "#verdict h2", max(expected, key=expected.get), prop="innerText")
        shown = float(page.get_attribute("#verdict meter[aria-label='spam']", "value"))
        assert shown == pytest.approx(expected["spam"], abs=1e-6)
