"""Tests for ch06/gpt_class_finetune.py: the spam data (counts, balancing, splits, CSV checks),
SpamDataset padding/truncation, the classification head, padding invariance of the
last-real-token reading, saving/loading, the pretrained route (offline failure and a tiny
local GPT-2 checkpoint), and one real offline fine-tuning run (the slow test, ~20-60 s).

Everything but the last test uses tiny models; the data comes from the shared mirror.
"""

import pandas as pd
import pytest
import torch

from ch02.runtime import set_seed
from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch05.checkpoint import save_checkpoint, save_model
from ch06.gpt_class_finetune import (
    BOOK_SETTINGS,
    PAD_TOKEN_ID,
    QUICK_SETTINGS,
    PretrainedUnavailable,
    SpamDataset,
    build_classifier,
    calc_accuracy_loader,
    calc_loss_batch,
    classify_review,
    cli,
    count_trainable_parameters,
    create_balanced_dataset,
    create_spam_loaders,
    download_and_unzip_spam_data,
    last_token_logits,
    load_classifier,
    load_init_checkpoint,
    load_spam_data,
    main,
    make_classifier_optimizer,
    parse_args,
    prepare_classifier,
    prepare_spam_splits,
    random_split,
    save_classifier,
    sequence_lengths,
    settings_from_args,
)

TINY = {**GPT_CONFIG_124M, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0}
TEXTS = ["Hi, are we still meeting for lunch today?",
         "WINNER!! You have been selected to receive a $900 prize. Call 09061701461 now",
         "ok",
         "Sorry, I'll call later"]


@pytest.fixture(scope="module")
def tokenizer():
    return get_gpt2_tokenizer()


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return prepare_spam_splits(tmp_path_factory.mktemp("ch06"))


@pytest.fixture
def tiny_classifier():
    torch.manual_seed(123)
    return build_classifier(TINY).eval()


def write_csv(path, rows, columns=("Label", "Text")):
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


# --- data ----------------------------------------------------------------------------------------

def test_raw_counts_and_balancing():
    df = load_spam_data()
    assert df["Label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}
    balanced = create_balanced_dataset(df)
    assert balanced["Label"].value_counts().to_dict() == {"ham": 747, "spam": 747}
    # every spam row is kept; the ham sample is seeded, so it is the same every time
    assert set(balanced.index[balanced["Label"] == "spam"]) == set(df.index[df["Label"] == "spam"])
    assert balanced.index.equals(create_balanced_dataset(df).index)
    assert not balanced.index.equals(create_balanced_dataset(df, seed=1).index)


def test_split_sizes_and_files(splits, tmp_path):
    parts = random_split(pd.DataFrame({"x": range(1494)}), 0.7, 0.1)
    assert [len(p) for p in parts] == [1045, 149, 300]
    frames = {name: pd.read_csv(path) for name, path in splits.items()}
    assert {name: len(f) for name, f in frames.items()} == {"train": 1045, "validation": 149, "test": 300}
    for f in frames.values():
        assert list(f.columns) == ["Label", "Text"]
        assert set(f["Label"]) == {0, 1}
    assert sum((f["Label"] == 1).sum() for f in frames.values()) == 747
    # re-running writes identical files, with no temporary files left behind
    again = prepare_spam_splits(tmp_path)
    for name in splits:
        assert again[name].read_bytes() == splits[name].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.csv", "train.csv", "validation.csv"]


def test_random_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="train_frac"):
        random_split(pd.DataFrame({"x": range(10)}), 0.9, 0.2)


# --- SpamDataset -----------------------------------------------------------------------------------

def test_dataset_pads_to_longest_and_truncates(tmp_path, tokenizer):
    path = write_csv(tmp_path / "d.csv", [(0, t) for t in TEXTS[:2]] + [(1, t) for t in TEXTS[2:]])
    lengths = [len(tokenizer.encode(t)) for t in TEXTS]
    ds = SpamDataset(path, tokenizer)
    assert ds.max_length == max(lengths) and ds.lengths == lengths and len(ds) == 4
    for i, text in enumerate(TEXTS):
        ids, label = ds[i]
        assert ids.dtype == torch.long and ids.shape == (max(lengths),)
        assert ids[:lengths[i]].tolist() == tokenizer.encode(text)
        assert (ids[lengths[i]:] == PAD_TOKEN_ID).all()
        assert int(label) == (0 if i < 2 else 1)
    short = SpamDataset(path, tokenizer, max_length=5)
    assert short.max_length == 5 and short.lengths == [min(n, 5) for n in lengths]
    assert short[1][0].tolist() == tokenizer.encode(TEXTS[1])[:5]  # truncation keeps the first tokens
    longer = SpamDataset(path, tokenizer, max_length=40)             # e.g. a validation set at the training length
    assert longer[0][0].shape == (40,) and longer.lengths == lengths
    assert sequence_lengths(torch.stack([longer[i][0] for i in range(4)])).tolist() == lengths


def test_dataset_never_turns_text_into_the_pad_id(tmp_path, tokenizer):
    path = write_csv(tmp_path / "d.csv", [(1, "free entry <|endoftext|>")])
    ds = SpamDataset(path, tokenizer)
    assert PAD_TOKEN_ID not in ds[0][0][:ds.lengths[0]].tolist()
    with pytest.raises(ValueError, match="pad token id"):
        SpamDataset(path, tokenizer, pad_token_id=tokenizer.encode("free")[0])


def test_csv_errors_name_file_and_row(tmp_path, tokenizer):
    missing = write_csv(tmp_path / "missing.csv", [(0, "hi")], columns=("Class", "Text"))
    with pytest.raises(ValueError, match=r"missing\.csv.*missing column.*'Label'"):
        SpamDataset(missing, tokenizer)
    bad_label = write_csv(tmp_path / "bad_label.csv", [(0, "hi"), ("spam", "win"), (1, "prize")])
    with pytest.raises(ValueError, match=r"bad_label\.csv: row 2 \(line 3\): label 'spam' is not 0 or 1"):
        SpamDataset(bad_label, tokenizer)
    other_label = write_csv(tmp_path / "other.csv", [(0, "hi"), (1, "x"), (2, "y")])
    with pytest.raises(ValueError, match=r"other\.csv: row 3 .*label '2'"):
        SpamDataset(other_label, tokenizer)
    empty = write_csv(tmp_path / "empty.csv", [(0, "hi"), (1, "  ")])
    with pytest.raises(ValueError, match=r"empty\.csv: row 2 .*empty"):
        SpamDataset(empty, tokenizer)
    with pytest.raises(ValueError, match="max_length"):
        SpamDataset(bad_label, tokenizer, max_length=0)


def test_loaders_use_the_training_length(splits, tokenizer):
    train_loader, val_loader, test_loader = create_spam_loaders(splits, tokenizer, batch_size=8)
    length = train_loader.dataset.max_length
    assert val_loader.dataset.max_length == test_loader.dataset.max_length == length
    assert len(train_loader) == 1045 // 8 and len(test_loader) == 38
    inputs, targets = next(iter(test_loader))
    assert inputs.shape == (8, length) and targets.shape == (8,)


# --- the classifier -----------------------------------------------------------------------------------

def test_prepare_classifier_trainable_selection():
    model = GPTModel(TINY)
    prepare_classifier(model)
    assert model.out_head.weight.shape == (2, TINY["emb_dim"]) and model.out_head.bias is not None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("trf_blocks.1.", "final_norm.", "out_head."))}
    assert trainable == expected
    assert count_trainable_parameters(model) == sum(p.numel() for n, p in model.named_parameters() if n in expected)

    prepare_classifier(model, num_classes=3, trainable="head")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"out_head.weight", "out_head.bias"}
    assert model.out_head.out_features == 3 and model.cfg["num_classes"] == 3
    prepare_classifier(model, trainable="all")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="trainable"):
        prepare_classifier(model, trainable="everything")


def test_padding_never_changes_a_prediction(tiny_classifier, tokenizer):
    model = tiny_classifier
    encoded = [tokenizer.encode(t)[:TINY["context_length"]] for t in TEXTS]
    with torch.inference_mode():
        alone = torch.cat([model(torch.tensor([ids]))[:, -1, :] for ids in encoded])  # no padding at all
        for width in (max(map(len, encoded)), 27, TINY["context_length"]):
            batch = torch.tensor([ids + [PAD_TOKEN_ID] * (width - len(ids)) for ids in encoded])
            for trim in (False, True):
                torch.testing.assert_close(last_token_logits(model, batch, trim=trim), alone, atol=1e-5, rtol=0)
        # Sanity check that the test can fail: the book's reading of the last *position* sees padding.
        padded = torch.tensor([encoded[2] + [PAD_TOKEN_ID] * 10])
        assert not torch.allclose(model(padded)[:, -1, :], alone[2:3], atol=1e-3)
    labels = {classify_review(t, model, tokenizer, "cpu") for t in TEXTS}
    for text, ids in zip(TEXTS, encoded):
        # every max_length that keeps the whole text (padding it by 0 to 32 - len tokens) gives one answer
        answers = {classify_review(text, model, tokenizer, "cpu", max_length=m) for m in (None, len(ids), 32, 500)}
        assert len(answers) == 1
    assert labels <= {"spam", "not spam"}


def test_sequence_lengths_and_all_padding():
    batch = torch.tensor([[5, 6, PAD_TOKEN_ID], [5, PAD_TOKEN_ID, PAD_TOKEN_ID], [1, 2, 3]])
    assert sequence_lengths(batch).tolist() == [2, 1, 3]
    with pytest.raises(ValueError, match="padding only"):
        sequence_lengths(torch.full((1, 4), PAD_TOKEN_ID))


def test_classify_review_errors_and_truncation(tiny_classifier, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        classify_review("", tiny_classifier, tokenizer, "cpu")
    with pytest.raises(ValueError, match="empty"):
        classify_review(" \n", tiny_classifier, tokenizer, "cpu")
    long_text = "free prize " * 200  # 400 tokens, longer than the 32-token context
    assert classify_review(long_text, tiny_classifier, tokenizer, "cpu") in {"spam", "not spam"}
    assert classify_review(long_text, tiny_classifier, tokenizer, "cpu", max_length=1024) in {"spam", "not spam"}


def test_loss_and_accuracy_on_a_loader(splits, tokenizer, tiny_classifier):
    _, val_loader, _ = create_spam_loaders(splits, tokenizer, batch_size=8, max_length=TINY["context_length"])
    acc = calc_accuracy_loader(val_loader, tiny_classifier, "cpu", num_batches=3)
    assert 0.0 <= acc <= 1.0
    inputs, targets = next(iter(val_loader))
    loss = calc_loss_batch(inputs, targets, tiny_classifier, "cpu")
    assert loss.shape == () and 0.1 < loss.item() < 3.0  # near ln 2 for an untrained 2-class head


def test_save_load_round_trip(tmp_path, tiny_classifier, tokenizer):
    path = save_classifier(tiny_classifier, tmp_path / "clf.pth", max_length=20)
    loaded, meta = load_classifier(path)
    assert meta["max_length"] == 20 and meta["num_classes"] == 2 and meta["pad_token_id"] == PAD_TOKEN_ID
    batch = torch.tensor([tokenizer.encode(t)[:20] + [PAD_TOKEN_ID] * (20 - len(tokenizer.encode(t)[:20]))
                          for t in TEXTS])
    with torch.inference_mode():
        torch.testing.assert_close(last_token_logits(loaded, batch), last_token_logits(tiny_classifier, batch),
                                   atol=0, rtol=0)
    for text in TEXTS:
        assert classify_review(text, loaded, tokenizer, "cpu") == classify_review(text, tiny_classifier, tokenizer,
                                                                                   "cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf.json", "clf.pth"]


@pytest.mark.filterwarnings("ignore:the file stores no config")  # the guess is what is tested
def test_init_from_chapter5_files(tmp_path):
    from ch05.gpt_train import QUICK_CONFIG

    set_seed(123)
    lm = GPTModel({**QUICK_CONFIG, "n_layers": 1})
    save_model(lm, tmp_path / "model.pth")            # weights only: the config is read from the shapes
    save_checkpoint(tmp_path / "checkpoint.pth", lm, None, config={**lm.cfg, "drop_rate": 0.3})
    for name in ("model.pth", "checkpoint.pth"):
        model = load_init_checkpoint(tmp_path / name)
        assert model.cfg["n_heads"] == QUICK_CONFIG["n_heads"] and model.cfg["n_layers"] == 1
        assert model.cfg["drop_rate"] == 0.0
        torch.testing.assert_close(model.tok_emb.weight, lm.tok_emb.weight)
    odd = GPTModel({**TINY, "emb_dim": 24})
    save_model(odd, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="--n-heads"):
        load_init_checkpoint(tmp_path / "odd.pth")
    assert load_init_checkpoint(tmp_path / "odd.pth", n_heads=3).cfg["n_heads"] == 3


# --- the script's routes ---------------------------------------------------------------------------------

def test_pretrained_route_offline_explains_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(PretrainedUnavailable, match="HF_ENDPOINT") as info:
        main(dict(QUICK_SETTINGS), tmp_path / "out", mode="pretrained", progress=False)
    assert "--quick" in str(info.value)
    assert cli(["--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "--from-scratch" in capsys.readouterr().err


def write_tiny_gpt2_checkpoint(folder, emb_dim=16, n_layers=2, n_heads=2, n_positions=300, vocab_size=50257):
    """A random GPT-2 in the Hugging Face file layout (model.safetensors + config.json), as chapter 5 reads it."""
    import json

    from safetensors.torch import save_file

    d = emb_dim
    shapes = {"wte.weight": (vocab_size, d), "wpe.weight": (n_positions, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(n_layers):
        shapes.update({f"h.{i}.{name}": shape for name, shape in {
            "ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
            "mlp.c_fc.weight": (d, 4 * d), "mlp.c_fc.bias": (4 * d,),
            "mlp.c_proj.weight": (4 * d, d), "mlp.c_proj.bias": (d,)}.items()})
    folder.mkdir(parents=True)
    save_file({k: torch.randn(shape) * 0.02 for k, shape in shapes.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": vocab_size, "n_positions": n_positions, "n_embd": d,
        "n_layer": n_layers, "n_head": n_heads}))
    return folder


def test_pretrained_route_with_a_local_gpt2_checkpoint(tmp_path):
    """The book's route end to end, with a tiny random GPT-2 in Hugging Face format instead of the real weights."""
    torch.manual_seed(0)
    folder = write_tiny_gpt2_checkpoint(tmp_path / "tiny-gpt2")
    settings = {**QUICK_SETTINGS, "trainable": "last_block", "num_epochs": 1, "max_length": None, "batch_size": 32,
                "eval_freq": 100, "eval_iter": 2}
    result = main(settings, tmp_path / "out", mode="pretrained", model_name=str(folder),
                  device="cpu", progress=False)
    model = result["model"]
    assert model.trf_blocks[0].att.W_query.weight.requires_grad is False
    assert model.out_head.weight.shape == (2, 16)
    assert len(result["train_accs"]) == 1 and result["examples_seen"] == (1045 // 32) * 32
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"review_classifier.pth", "review_classifier.json",
                                                              "loss-plot.png", "accuracy-plot.png", "train.csv"}
    # GPT-2's config ties the output head to the token embedding; the saved classifier still reloads exactly
    loaded, meta = load_classifier(result["model_path"])
    assert meta["config"]["tie_weights"] is True and meta["max_length"] == 120
    assert calc_accuracy_loader(result["loaders"][2], loaded, "cpu") == result["accuracies"]["test"]


def test_cli_settings_and_from_scratch_route(tmp_path):
    mode, settings = settings_from_args(parse_args(["--quick", "--epochs", "2", "--lr", "3e-4"]))
    assert mode == "quick" and settings["num_epochs"] == 2 and settings["learning_rate"] == 3e-4
    assert settings["trainable"] == "all" and settings["max_length"] == 64
    mode, settings = settings_from_args(parse_args([]))
    assert mode == "pretrained" and settings == BOOK_SETTINGS
    assert (settings["learning_rate"], settings["batch_size"], settings["num_epochs"]) == (5e-5, 8, 5)
    mode, settings = settings_from_args(parse_args(["--from-scratch", "--trainable", "last_block"]))
    assert mode == "scratch" and settings["trainable"] == "last_block"

    tiny = {**TINY, "context_length": 64}
    result = main({**QUICK_SETTINGS, "num_epochs": 1, "batch_size": 32, "eval_freq": 100}, tmp_path,
                  mode="scratch", cfg=tiny, device="cpu", progress=False)
    assert all(p.requires_grad for p in result["model"].parameters())
    assert result["max_length"] == 64


def test_quick_offline_fine_tuning_reaches_85_percent(tmp_path):
    """SLOW (about 20-60 s on two CPU cores): the offline quick path, random init, fixed seed.

    This is the accuracy the README quotes for the offline route; it measures ~96% test accuracy.
    """
    result = main(dict(QUICK_SETTINGS), tmp_path, mode="quick", device="cpu", progress=False)
    assert result["accuracies"]["test"] >= 0.85
    assert result["accuracies"]["validation"] >= 0.85
    assert len(result["train_accs"]) == QUICK_SETTINGS["num_epochs"]
    # the saved classifier gives the same answers
    loaded, meta = load_classifier(result["model_path"])
    test_loader = result["loaders"][2]
    assert calc_accuracy_loader(test_loader, loaded, "cpu") == result["accuracies"]["test"]


def test_classifier_optimizer_covers_only_trainable_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    for p in model[0].parameters():
        p.requires_grad = False
    opt = make_classifier_optimizer(model, 1e-3, 0.1)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model[1].parameters()}
    for p in model[1].parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_classifier_optimizer(model, 1e-3, 0.1)


def test_fine_tuning_loop_runs_linear_layers_through_onednn_unless_turned_off(tiny_classifier, onednn_products):
    from ch06.gpt_class_finetune import train_classifier_simple

    calls = onednn_products
    batches = [(torch.randint(0, 50257, (2, 6)), torch.tensor([0, 1]))]
    counts = {}
    for flag in (True, False):
        calls.clear()
        model = tiny_classifier.train()
        optimizer = make_classifier_optimizer(model, 1e-3, 0.1)
        train_classifier_simple(model, batches, batches, optimizer, "cpu", num_epochs=1, eval_freq=1, eval_iter=1,
                                progress=False, use_onednn=flag)
        counts[flag] = len(calls)
    # 2 blocks x 6 linear layers + head: a training step (forward, input gradients), 2 loss and 2 accuracy passes
    assert counts == {True: 13 * 2 + 13 * 4, False: 0}


def test_main_use_onednn_covers_the_final_accuracy_pass(tmp_path, onednn_products, monkeypatch):
    import ch06.gpt_class_finetune as cf

    inside: list[bool] = []  # for each final accuracy pass: was oneDNN routing on?
    real = cf.calc_accuracy_loader

    def spy(loader, model, device, num_batches=None):
        before = len(onednn_products)
        acc = real(loader, model, device, num_batches=num_batches)
        inside.append(len(onednn_products) > before)
        return acc

    monkeypatch.setattr(cf, "calc_accuracy_loader", spy)
    tiny = {**TINY, "context_length": 64}
    settings = {**QUICK_SETTINGS, "num_epochs": 1, "batch_size": 64, "eval_freq": 100, "eval_iter": 1}
    results = {}
    for flag in (False, True):
        inside.clear()
        onednn_products.clear()
        results[flag] = main(settings, tmp_path / str(flag), mode="scratch", cfg=tiny, device="cpu",
                             progress=False, use_onednn=flag)
        assert inside[-3:] == [flag] * 3  # train, validation, test after training
        assert bool(onednn_products) is flag
    assert results[True]["accuracies"] == results[False]["accuracies"]
    assert parse_args(["--no-onednn"]).no_onednn and not parse_args([]).no_onednn


def test_download_and_unzip_spam_data_as_in_the_book(tmp_path, capsys):
    """The book's call (listing 6.1) puts a verified copy at data_file_path; the mirror serves it offline."""
    from ch02.download import DATA_FILES, get_data_file

    url = DATA_FILES["SMSSpamCollection"].url
    extracted_path = tmp_path / "sms_spam_collection"
    data_file_path = extracted_path / "SMSSpamCollection.tsv"
    download_and_unzip_spam_data(url, tmp_path / "sms_spam_collection.zip", extracted_path, data_file_path)
    assert data_file_path.read_bytes() == get_data_file("SMSSpamCollection", download=False).read_bytes()
    assert capsys.readouterr().out == f"File downloaded and saved as {data_file_path}\n"
    df = pd.read_csv(data_file_path, sep="\t", header=None, names=["Label", "Text"])
    assert df["Label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}

    data_file_path.write_text("kept\n")  # an existing file is never replaced
    download_and_unzip_spam_data(url, tmp_path / "x.zip", str(extracted_path), str(data_file_path))
    assert data_file_path.read_text() == "kept\n"
    assert capsys.readouterr().out == f"{data_file_path} already exists. Skipping download and extraction.\n"
