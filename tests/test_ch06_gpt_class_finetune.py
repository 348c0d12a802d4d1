"""Tests for ch06/gpt_class_finetune.py: the classification head, padding invariance of the
last-real-token reading, loss and accuracy, the book's training loop (and chapter 5's training layer
running it step for step), classify_review, saving/loading. Tiny models throughout."""

import itertools

import pytest
import torch

from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch06.gpt_class_finetune import (
    PAD_TOKEN_ID,
    build_classifier,
    calc_accuracy_loader,
    calc_loss_batch,
    classify_review,
    count_trainable_parameters,
    create_spam_loaders,
    last_token_logits,
    load_classifier,
    prepare_classifier,
    save_classifier,
    sequence_lengths,
)

TINY = {**GPT_CONFIG_124M, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0}
TEXTS = ["Hi, are we still meeting for lunch today?",
         "WINNER!! You have been selected to receive a $900 prize. Call 09061701461 now",
         "ok",
         "Sorry, I'll call later"]


@pytest.fixture
def tiny_classifier():
    torch.manual_seed(123)
    return build_classifier(TINY).eval()


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


class ConstantClassifier(torch.nn.Module):
    """Scores class `label` highest at every position, so its accuracy is the share of that label."""

    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*in_idx.shape, 2)
        logits[..., self.label] = 1.0
        return logits


def test_loss_and_accuracy_on_a_loader(splits, tokenizer, tiny_classifier):
    _, val_loader, _ = create_spam_loaders(splits, tokenizer, batch_size=8, max_length=TINY["context_length"])
    first_four = list(itertools.islice(val_loader, 4))
    labels = torch.cat([targets for _, targets in first_four])
    spam_share = (labels == 1).float().mean().item()
    all_labels = torch.cat([targets for _, targets in val_loader])
    # The data make the checks below sharp: both classes present but not half and half (so reading
    # argmin for argmax would show), and a different share than in the whole set (so would ignoring num_batches).
    assert len(labels) == 32 and spam_share not in (0.0, 0.5, 1.0)
    assert spam_share != pytest.approx((all_labels == 1).float().mean().item())
    assert calc_accuracy_loader(val_loader, ConstantClassifier(1), "cpu", num_batches=4) == pytest.approx(spam_share)
    assert calc_accuracy_loader(val_loader, ConstantClassifier(0), "cpu", num_batches=4) == pytest.approx(1 - spam_share)
    # A real model: the share of the 32 messages whose argmax at the last real token is the label.
    with torch.no_grad():
        predicted = torch.cat([last_token_logits(tiny_classifier, inputs).argmax(dim=-1) for inputs, _ in first_four])
    acc = calc_accuracy_loader(val_loader, tiny_classifier, "cpu", num_batches=4)
    assert acc == (predicted == labels).sum().item() / len(labels)
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


def test_chapter5s_training_layer_runs_the_books_classifier_loop_step_for_step(splits, tokenizer):
    """`llmfs.trainer.train` with this chapter's loss, evaluation and accuracies (as `ch06.cli` runs it) gives
    the losses, accuracies and weights of the book's `train_classifier_simple`."""
    from ch06.gpt_class_finetune import evaluate_model, train_classifier_simple
    from llmfs.trainer import make_optimizer, train

    train_loader, val_loader, _ = create_spam_loaders(splits, tokenizer, batch_size=8, max_length=24)
    train_loader = [batch for _, batch in zip(range(6), train_loader)]  # 6 fixed batches keep it fast
    runs = []
    for use_trainer in (False, True):
        torch.manual_seed(123)
        model = build_classifier({**TINY, "drop_rate": 0.1})
        optimizer = make_optimizer(model, 1e-3, 0.1)
        if not use_trainer:
            result = train_classifier_simple(model, train_loader, val_loader, optimizer, "cpu", 2, 4, 2)
        else:
            def accuracies(m, epoch):
                return {"train_accs": calc_accuracy_loader(train_loader, m, "cpu", num_batches=2),
                        "val_accs": calc_accuracy_loader(val_loader, m, "cpu", num_batches=2)}

            out = train(model, train_loader, val_loader, optimizer, "cpu", 2, 4, 2,
                        loss_fn=lambda m, x, y: calc_loss_batch(x, y, m, "cpu"),
                        evaluate_fn=lambda m: evaluate_model(m, train_loader, val_loader, "cpu", 2),
                        epoch_end_fn=accuracies, progress=False)
            result = (out["train_losses"], out["val_losses"], out["train_accs"], out["val_accs"], out["examples"])
        runs.append((result, model.state_dict()))
    (book, book_state), (ours, ours_state) = runs
    assert book == ours and book[4] == 12 * 8
    for name, value in book_state.items():
        assert torch.equal(value, ours_state[name]), name
