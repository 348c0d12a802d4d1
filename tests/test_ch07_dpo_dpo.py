"""Tests for ch07/dpo/dpo.py: the DPO loss and rewards against trl's DPOTrainer, the answer masks on a
hand-made batch, the log-probabilities, the reference model's frozen state, the trainer's run against
the notebook's loop, SIGTERM and exact resume, the command's errors and outputs rule, and a quick-mode
end-to-end run in which the validation reward margin and reward accuracy rise."""

import ast
import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPTModel
from ch07.cli import QUICK_CONFIG
from ch07.dpo import dpo
from ch07.gpt_instruction_finetuning import format_input, save_finetuned_model, split_data
from llmfs.checkpoint import CheckpointMismatchError
from llmfs.trainer import TrainingInterrupted, make_optimizer

REPO = Path(__file__).resolve().parents[1]

P = 50256  # padding (<|endoftext|>)

TINY = {**QUICK_CONFIG, "vocab_size": 64, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1}

RECORD = {"instruction": "Convert 45 kilometers to meters.", "input": "",
          "output": "45 kilometers is 45000 meters.",
          "chosen": "45 kilometers is equivalent to 45000 meters.",
          "rejected": "45 kilometers is 45000 meters, obviously."}


# --- the loss against trl ---------------------------------------------------------------------------

def trl_sigmoid_dpo(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta):
    """(loss, mean chosen reward, mean rejected reward, mean margin, reward accuracy) from trl.

    Runs trl's own `DPOTrainer._compute_loss` (loss_type "sigmoid", standard reverse-KL DPO) on
    a stub trainer: its "model" returns, per sequence, one completion token whose log-probability
    is the sequence log-probability we give, and the reference values come in as precomputed
    (`precompute_ref_log_probs`), exactly as trl takes them.
    """
    pytest.importorskip("trl", minversion="1.16",
                        reason="trl >= 1.16 (Python 3.11+) is the reference for the DPO loss")
    from trl.trainer.dpo_trainer import DPOTrainer

    n = len(policy_chosen)
    logps = torch.cat([policy_chosen, policy_rejected])[:, None]  # trl's batch is [chosen..., rejected...]
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps),
                              mean_logits=torch.zeros_like(logps), is_top1=torch.zeros_like(logps, dtype=torch.bool))
    metrics = {"train": defaultdict(list)}
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics=metrics, _total_train_tokens=0, _tp_size=1)
    inputs = {
        "input_ids": torch.zeros(2 * n, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * (2 * n)),  # token 0 is the prompt, token 1 the completion
        "ref_chosen_logps": reference_chosen, "ref_rejected_logps": reference_rejected,
    }
    loss = DPOTrainer._compute_loss(stub, lambda **kwargs: outputs, inputs, return_outputs=False)
    m = metrics["train"]
    return (float(loss), m["rewards/chosen"][-1], m["rewards/rejected"][-1], m["rewards/margins"][-1],
            m["rewards/accuracies"][-1])


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_loss_and_rewards_match_trl(beta):
    # float64 so that the comparison measures the formulas, not float32 rounding order
    gen = torch.Generator().manual_seed(123)
    logps = [-(torch.rand(6, generator=gen, dtype=torch.float64) * 4 + 0.5) for _ in range(4)]
    loss, chosen, rejected = dpo.compute_dpo_loss(*logps, beta=beta)
    ref_loss, ref_chosen, ref_rejected, ref_margin, ref_accuracy = trl_sigmoid_dpo(*logps, beta=beta)
    assert abs(float(loss) - ref_loss) < 1e-6
    assert abs(float(chosen) - ref_chosen) < 1e-6
    assert abs(float(rejected) - ref_rejected) < 1e-6
    losses, chosen_each, rejected_each = dpo.compute_dpo_loss(*logps, beta=beta, reduction="none")
    assert abs(float((chosen_each - rejected_each).mean()) - ref_margin) < 1e-6
    assert abs(float((chosen_each > rejected_each).double().mean()) - ref_accuracy) < 1e-12
    assert 0 < ref_accuracy < 1  # the data has pairs on both sides
    for i in range(6):  # pair by pair, too
        one = [t[i:i + 1] for t in logps]
        ref = trl_sigmoid_dpo(*one, beta=beta)
        assert abs(float(losses[i]) - ref[0]) < 1e-6
        assert abs(float(chosen_each[i]) - ref[1]) < 1e-6
        assert abs(float(rejected_each[i]) - ref[2]) < 1e-6


def test_loss_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-1.0, -2.5]), torch.tensor([-3.0, -0.5])
    loss, chosen, rejected = dpo.compute_dpo_loss(*logps, *logps, beta=0.1)
    assert float(loss) == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-7)
    assert float(chosen) == float(rejected) == 0.0
    with pytest.raises(ValueError, match="reduction"):
        dpo.compute_dpo_loss(*logps, *logps, reduction="sum")


# --- batching and masks -----------------------------------------------------------------------------

def test_collate_pads_and_masks_prompt_and_padding_exactly():
    batch = [{"prompt": [1, 2, 3], "chosen": [1, 2, 3, 10, 11], "rejected": [1, 2, 3, 20]},
             {"prompt": [4, 5], "chosen": [4, 5, 30], "rejected": [4, 5, 40, 41, 42, 43]}]
    out = dpo.preference_collate_fn(batch)
    # one common length for chosen and rejected: the longest sequence + 1 = 7
    assert out["chosen"].tolist() == [[1, 2, 3, 10, 11, P, P], [4, 5, 30, P, P, P, P]]
    assert out["rejected"].tolist() == [[1, 2, 3, 20, P, P, P], [4, 5, 40, 41, 42, 43, P]]
    assert out["chosen_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0, 0]]
    assert out["rejected_mask"].tolist() == [[0, 0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0]]
    assert out["chosen_mask"].dtype == torch.bool
    assert [p.tolist() for p in out["prompt"]] == [[1, 2, 3], [4, 5]]

    cut = dpo.preference_collate_fn(batch, allowed_max_length=4)
    assert cut["rejected"].tolist() == [[1, 2, 3, 20], [4, 5, 40, 41]]
    assert cut["rejected_mask"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]

    unmasked = dpo.preference_collate_fn(batch, mask_prompt_tokens=False)
    assert unmasked["chosen_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]]


def test_dataset_masks_select_exactly_the_answer_text():
    tokenizer = get_gpt2_tokenizer()
    dataset = dpo.PreferenceDataset([RECORD, {**RECORD, "input": "45 km"}], tokenizer)
    batch = dpo.preference_collate_fn([dataset[0], dataset[1]])
    for row, entry in enumerate([RECORD, {**RECORD, "input": "45 km"}]):
        for key in ("chosen", "rejected"):
            ids, mask = batch[key][row], batch[f"{key}_mask"][row]
            assert tokenizer.decode(ids[mask].tolist()) == entry[key]
            prompt_len = len(dataset[row]["prompt"])
            assert not mask[:prompt_len].any()
            assert tokenizer.decode(ids[:prompt_len].tolist()) == format_input(entry) + "\n\n### Response:\n"
            assert (ids[int(mask.nonzero().max()) + 1:] == P).all()  # everything after the answer is padding


def test_compute_logprobs_averages_the_masked_tokens():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    got = dpo.compute_logprobs(logits, labels, mask)
    log_probs = F.log_softmax(logits, dim=-1)
    for b in range(2):
        # token t is predicted by the logits at t - 1
        expected = [log_probs[b, t - 1, labels[b, t]] for t in range(1, 5) if mask[b, t]]
        assert got[b].item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-6)
    unmasked = dpo.compute_logprobs(logits, labels)
    expected = torch.stack([log_probs[:, t - 1].gather(-1, labels[:, t:t + 1]).squeeze(-1) for t in range(1, 5)])
    torch.testing.assert_close(unmasked, expected.mean(0))


def test_only_the_policy_learns():
    tokenizer = get_gpt2_tokenizer()
    policy = GPTModel({**QUICK_CONFIG, "emb_dim": 32, "n_heads": 2, "n_layers": 1})
    reference = dpo.make_reference_model(policy)
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    batch = dpo.preference_collate_fn(dpo.PreferenceDataset([RECORD], tokenizer).encoded_texts)
    loss, chosen, rejected = dpo.compute_dpo_loss_batch(batch, policy, reference, beta=0.1)
    assert loss.item() == pytest.approx(0.6931472, abs=1e-6) and chosen.item() == rejected.item() == 0.0
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert policy.tok_emb.weight.grad is not None and policy.tok_emb.weight.grad.abs().sum() > 0


def test_preference_data_loads_and_is_validated(tmp_path):
    data = dpo.load_preference_data()
    assert len(data) == 1100
    assert all(set(entry) >= {"instruction", "input", "output", "chosen", "rejected"} for entry in data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([RECORD, {**RECORD, "rejected": "  "}]))
    with pytest.raises(ValueError, match="record 1 has an empty 'rejected'"):
        dpo.load_preference_data(bad)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({**RECORD, "index": i}) + "\n" for i in range(3)))
    assert [e["index"] for e in dpo.load_preference_data(jsonl)] == [0, 1, 2]


def test_loaders_refuse_a_prompt_that_leaves_no_answer():
    tokenizer = get_gpt2_tokenizer()
    with pytest.raises(ValueError, match="allowed_max_length=20"):
        dpo.create_preference_loaders([RECORD] * 2, [RECORD], None, tokenizer, batch_size=2, allowed_max_length=20)
    with pytest.raises(ValueError, match="no full batch"):
        dpo.create_preference_loaders([RECORD], [RECORD], None, tokenizer, batch_size=2)


# --- the trainer's run equals the notebook's loop; Ctrl-C and exact resume -----------------------------

SMALL = {**QUICK_CONFIG, "emb_dim": 32, "n_heads": 2, "n_layers": 1, "drop_rate": 0.1}  # dropout: RNG matters
RUN_SETTINGS = {**dpo.QUICK_SETTINGS, "num_train": 16, "num_val": 8, "batch_size": 4, "num_epochs": 2,
                "eval_freq": 2, "eval_iter": 1, "num_answers": 1, "max_new_tokens": 4, "print_sample": False}


@pytest.fixture(scope="module")
def preference_records():
    return dpo.load_preference_data()[:40]  # split 85/10/5: 34 train (16 used), 4 test, 2 validation


def fresh_run(records, seed=123):
    """Model, reference, loaders and optimizer as a new process builds them."""
    tokenizer = get_gpt2_tokenizer()
    train_data, _, val_data = split_data(records)
    torch.manual_seed(seed)
    policy = GPTModel(SMALL)
    reference = dpo.make_reference_model(policy)
    train_loader, val_loader, _ = dpo.create_preference_loaders(train_data[:16], val_data, None, tokenizer,
                                                                batch_size=4, allowed_max_length=256)
    return policy, reference, train_loader, val_loader, make_optimizer(policy, 3e-3, 0.01), tokenizer


def test_the_trainer_runs_the_notebooks_loop_step_for_step(preference_records, capsys):
    """`train_dpo` (llmfs.trainer) and the book's `train_model_dpo_simple`: the same tracked values, the same
    weights, the same progress lines and samples."""
    policy, reference, train_loader, val_loader, optimizer, tokenizer = fresh_run(preference_records)
    book = dpo.train_model_dpo_simple(policy, reference, train_loader, val_loader, optimizer, num_epochs=2,
                                      beta=0.1, eval_freq=2, eval_iter=1, start_context="Say hi.",
                                      tokenizer=tokenizer)
    book_out = capsys.readouterr().out
    model, reference2, train_loader, val_loader, optimizer, _ = fresh_run(preference_records)
    ours = dpo.train_dpo(model, reference2, train_loader, val_loader, optimizer, "cpu",
                         {**RUN_SETTINGS, "beta": 0.1, "print_sample": True}, start_context="Say hi.",
                         tokenizer=tokenizer, progress=False)
    assert ours == book and len(book["val_reward_margins"]) == 4  # exact floats, tokens_seen included
    assert book["train_reward_margins"][-1] != book["train_reward_margins"][0]  # it trained
    for (name, a), b in zip(policy.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert book_out.splitlines() == capsys.readouterr().out.splitlines()  # "Ep ..." lines and the samples


@pytest.fixture
def dropout_sft_file(tmp_path):
    torch.manual_seed(123)
    return save_finetuned_model(GPTModel(SMALL), tmp_path / "small-sft.pth", style="alpaca")


def test_sigterm_checkpoints_and_the_resumed_run_is_exact(preference_records, dropout_sft_file, tmp_path,
                                                          monkeypatch):
    def run(output_dir, **kwargs):
        return dpo.main(RUN_SETTINGS, dropout_sft_file, output_dir, data=preference_records, device="cpu",
                        progress=False, **kwargs)

    reference = run(tmp_path / "ref")
    real, training_steps = dpo.compute_dpo_loss_batch, []

    def interrupting(batch, policy_model, reference_model, beta, reduction="mean"):
        if torch.is_grad_enabled():  # a training step, not an evaluation
            training_steps.append(1)
            if len(training_steps) == 6:  # the second step of the second epoch
                os.kill(os.getpid(), signal.SIGTERM)
        return real(batch, policy_model, reference_model, beta, reduction)

    monkeypatch.setattr(dpo, "compute_dpo_loss_batch", interrupting)
    with pytest.raises(TrainingInterrupted) as info:
        run(tmp_path / "run")
    assert info.value.exit_code == 143 and info.value.step == 5
    assert info.value.checkpoint == tmp_path / "run" / "checkpoint.pth"
    assert not list((tmp_path / "run").glob("*-dpo.pth"))  # no model yet: training did not finish
    monkeypatch.setattr(dpo, "compute_dpo_loss_batch", real)

    resumed = run(tmp_path / "run", resume=info.value.checkpoint)
    assert resumed["tracking"] == reference["tracking"] and len(reference["tracking"]["train_losses"]) == 4
    assert (resumed["val_before"], resumed["val_after"]) == (reference["val_before"], reference["val_after"])
    assert resumed["answers"] == reference["answers"]
    for name, value in reference["model"].state_dict().items():
        assert torch.equal(value, resumed["model"].state_dict()[name]), name

    # Another starting model would be another reference: refused, naming why.
    torch.manual_seed(7)
    other = save_finetuned_model(GPTModel(SMALL), tmp_path / "other-sft.pth", style="alpaca")
    with pytest.raises(CheckpointMismatchError, match="reference_sha256"):
        dpo.main(RUN_SETTINGS, other, tmp_path / "run", data=preference_records, device="cpu", progress=False,
                 resume=info.value.checkpoint)


# --- command line -----------------------------------------------------------------------------------

@pytest.fixture
def sft_model_file(tmp_path):
    """A chapter-7 quick model saved the way ch07 saves its fine-tuned models (weights + .json config)."""
    torch.manual_seed(123)
    return save_finetuned_model(GPTModel(QUICK_CONFIG), tmp_path / "quick-sft.pth", style="alpaca")


@pytest.mark.parametrize("extra, message", [
    (["--model", "missing.pth"], "--model missing.pth does not exist; fine-tune one first"),
    (["--beta", "0"], "argument --beta: must be a finite number > 0, got 0"),
    (["--epochs", "0"], "argument --epochs: must be a whole number >= 1, got 0"),
    (["--eval-freq", "0"], "argument --eval-freq: must be a whole number >= 1, got 0"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be a whole number >= 0, got -1"),
    (["--data", "nowhere.json"], "--data nowhere.json does not exist"),
    (["--resume", "nowhere.pth"], "--resume nowhere.pth does not exist"),
    (["--device", "tpu"], "argument --device"),
])
def test_cli_errors(extra, message, sft_model_file, tmp_path, capsys):
    argv = ["--model", str(sft_model_file), "--output-dir", str(tmp_path / "out")] + extra
    try:
        rc = dpo.cli(argv)
    except SystemExit as exc:  # the parser's one-line errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_file_that_is_not_a_model(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a model")
    assert dpo.cli(["--model", str(junk), "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --model {junk} is not a PyTorch checkpoint")


def test_default_output_dir_follows_llmfs_output_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFS_OUTPUT_DIR", str(tmp_path / "elsewhere"))
    args = dpo.parser().parse_args(["--model", "m.pth"])
    assert Path(args.output_dir) == tmp_path / "elsewhere" / "ch07-dpo"
    assert dpo.settings_from_args(dpo.parser().parse_args(["--model", "m.pth", "--quick", "--lr", "0.01",
                                                           "--beta", "0.5", "--weight-decay", "0"])) == \
        {**dpo.QUICK_SETTINGS, "learning_rate": 0.01, "beta": 0.5, "weight_decay": 0.0}


def test_quick_run_refuses_a_finished_model_then_overwrites_it_and_raises_margin_and_accuracy(
        sft_model_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "quick-sft-dpo.pth").write_bytes(b"an earlier run's model")
    argv = ["--model", str(sft_model_file), "--quick", "--device", "cpu", "--output-dir", str(out), "--no-progress"]
    assert dpo.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output-dir {out} already holds a trained model (quick-sft-dpo.pth)")
    assert (out / "quick-sft-dpo.pth").read_bytes() == b"an earlier run's model"
    assert sorted(p.name for p in out.iterdir()) == ["quick-sft-dpo.pth"]  # refused before any work

    assert dpo.cli(argv + ["--overwrite"]) == 0
    metrics = json.loads((out / "dpo-metrics.json").read_text())
    before, after, tracking = metrics["val_before"], metrics["val_after"], metrics["tracking"]
    # Before training the policy is the reference: every reward is 0, no pair is preferred.
    assert before["reward_margin"] == 0.0 and before["reward_accuracy"] == 0.0
    assert after["reward_margin"] > before["reward_margin"] + 0.01
    assert after["reward_accuracy"] > 0.5  # better than chance
    assert after["loss"] < before["loss"]
    margins = tracking["val_reward_margins"]
    assert len(margins) == 4 and margins[-1] > margins[0]
    assert tracking["train_reward_margins"][-1] > tracking["train_reward_margins"][0]
    answers = json.loads((out / "dpo-answers.json").read_text())
    assert len(answers) == 2 and all({"reference_response", "policy_response"} <= set(a) for a in answers)
    assert (out / "dpo-plot.png").stat().st_size > 0
    tuned = dpo.load_sft_model(out / "quick-sft-dpo.pth")
    start = dpo.load_sft_model(sft_model_file)
    assert not torch.equal(tuned.tok_emb.weight, start.tok_emb.weight)


def command(*args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLMFS_DEVICE": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "ch07.dpo", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_command_bad_option_is_one_line(tmp_path):
    proc = command("--model", str(tmp_path / "m.pth"), "--lr", "nan")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and out == ""
    assert err.strip() == "error: argument --lr: must be a finite number > 0, got nan (see --help)"


def test_command_sigterm_prints_how_to_resume(sft_model_file, tmp_path):
    """A real `python -m ch07.dpo`: SIGTERM during training finishes the step, writes the checkpoint and
    says which command continues it."""
    out_dir = tmp_path / "out"
    args = ["--model", str(sft_model_file), "--quick", "--epochs", "100", "--output-dir", str(out_dir),
            "--no-progress"]
    proc = command(*args)
    try:
        for line in proc.stdout:  # the first evaluation is printed inside the training loop
            if line.startswith("Ep 1 (Step 000000)"):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    checkpoint = out_dir / "checkpoint.pth"
    assert proc.returncode == 143, err
    hint = [line for line in err.splitlines() if line.startswith("resume with: ")]
    assert hint == [f"resume with: python -m ch07.dpo {' '.join(args)} --resume {checkpoint}"], err
    state = torch.load(checkpoint, weights_only=True)
    assert state["run_settings"]["num_epochs"] == 100 and state["global_step"] >= 0
    assert len(state["run_settings"]["reference_sha256"]) == 64


def test_notebook_defines_the_modules_listings():
    """dpo-from-scratch.ipynb builds each listing in a cell; they must be the module's code, token for token."""
    def definitions(source: str) -> dict:
        return {node.name: ast.dump(node) for node in ast.parse(source).body
                if isinstance(node, (ast.FunctionDef, ast.ClassDef))}

    notebook = json.loads((Path(dpo.__file__).parent / "dpo-from-scratch.ipynb").read_text(encoding="utf-8"))
    in_notebook = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            in_notebook.update(definitions("".join(cell["source"])))
    in_module = definitions(Path(dpo.__file__).read_text(encoding="utf-8"))
    listings = ["PreferenceDataset", "preference_collate_fn", "compute_dpo_loss", "compute_logprobs",
                "compute_dpo_loss_batch"]
    for name in listings:
        assert in_notebook.get(name) == in_module[name], f"the notebook's {name} differs from ch07/dpo/dpo.py's"


def test_cli_without_the_data_file_says_where_to_get_it(sft_model_file, tmp_path, monkeypatch, capsys):
    import dataclasses

    from llmfs.download import DATA_FILES

    monkeypatch.setenv("LLMFS_DATA_MIRROR", str(tmp_path / "no-mirror"))
    monkeypatch.setenv("LLMFS_CACHE_DIR", str(tmp_path / "cache"))
    spec = DATA_FILES[dpo.PREFERENCE_DATA_FILE]
    monkeypatch.setitem(DATA_FILES, spec.name, dataclasses.replace(spec, url="http://127.0.0.1:1/x"))
    assert dpo.cli(["--model", str(sft_model_file), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    # (pooch reports its download attempt before the error)
    assert any(line.startswith("error: Could not get 'instruction-data-with-preference.json'")
               for line in err.splitlines())
    assert "LLMFS_DATA_MIRROR" in err and not any((tmp_path / "out").iterdir())
