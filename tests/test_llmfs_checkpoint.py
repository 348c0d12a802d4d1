"""Tests for llmfs/checkpoint.py: round trips (.pth and .safetensors, tied weights included),
mismatch errors that name the tensors, atomic writes, refusing pickled objects, and
rebuilding a config from a weights-only file.
"""

import json
import pickle

import pytest
import torch

from ch04.gpt import GPTModel
from ch05.gpt_generate import config_from_state_dict
from llmfs import checkpoint as ckpt_mod
from llmfs.checkpoint import (
    CheckpointFileError,
    CheckpointMismatchError,
    check_model_config,
    check_state_dict,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
    saved_config,
)
from llmfs.decoding_layout import layout_for_decoding
from llmfs.errors import UserError
from llmfs.trainer import make_optimizer

TINY = {"vocab_size": 60, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}



def model_with(seed=0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel({**TINY, **overrides})


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("tied", [False, True])
def test_model_round_trip(tmp_path, suffix, tied):
    src = model_with(1, tie_weights=tied)
    path = save_model(src, tmp_path / f"model{suffix}")
    dst = load_model(model_with(2, tie_weights=tied), path)
    assert same_weights(src, dst)
    assert (dst.out_head.weight is dst.tok_emb.weight) == tied  # loading keeps (or keeps out) the tie
    x = torch.randint(0, 60, (1, 8))
    assert torch.equal(src.eval()(x), dst.eval()(x))
    assert files_in(tmp_path) == [f"model{suffix}"]


def test_tied_safetensors_into_untied_model(tmp_path):
    """safetensors stores a tied pair once; an untied model gets the matrix in both places."""
    src = model_with(1, tie_weights=True)
    save_model(src, tmp_path / "m.safetensors")
    dst = load_model(model_with(2), tmp_path / "m.safetensors")
    assert torch.equal(dst.out_head.weight, src.tok_emb.weight)
    assert torch.equal(dst.tok_emb.weight, src.tok_emb.weight)


def test_safetensors_metadata_carries_the_config(tmp_path):
    src = model_with(tie_weights=True)
    save_model(src, tmp_path / "m.safetensors")
    assert saved_config(tmp_path / "m.safetensors") == src.cfg


def test_checkpoint_round_trip_with_optimizer_and_state(tmp_path):
    model = model_with(1)
    opt = make_optimizer(model, 1e-3, 0.1)
    model(torch.randint(0, 60, (2, 8))).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.pth", model, opt, global_step=7, train_losses=[1.5, 1.25], config=model.cfg)

    fresh = model_with(2)
    fresh_opt = make_optimizer(fresh, 1e-3, 0.1)
    state = load_checkpoint(tmp_path / "c.pth", fresh, fresh_opt)
    assert state == {"global_step": 7, "train_losses": [1.5, 1.25], "config": model.cfg}
    assert same_weights(model, fresh)
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        assert all(torch.equal(a["state"][k][n], b["state"][k][n]) for n in a["state"][k])
    assert saved_config(tmp_path / "c.pth") == model.cfg
    # load_model accepts a checkpoint too (its model part)
    assert same_weights(model, load_model(model_with(3), tmp_path / "c.pth"))


def test_mismatch_names_keys_and_shapes(tmp_path):
    save_model(model_with(), tmp_path / "m.pth")
    with pytest.raises(CheckpointMismatchError, match=r"tok_emb\.weight: file \(60, 16\) vs model \(60, 32\)"):
        load_model(model_with(emb_dim=32), tmp_path / "m.pth")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: \['trf_blocks\.1\."):
        load_model(model_with(n_layers=1), tmp_path / "m.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: \[.*W_key\.bias"):
        check_state_dict(model_with(), {k: v for k, v in model_with().state_dict().items()
                                        if not k.endswith("W_key.bias")})
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        load_model(model_with(qkv_bias=True), save_model(model_with(qkv_bias=False), tmp_path / "nobias.pth"))
    # a failed load leaves the target untouched
    target = model_with(5, emb_dim=32)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError):
        load_model(target, tmp_path / "m.pth")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_load_checkpoint_rejects_weights_only_file_and_missing_optimizer(tmp_path):
    model = model_with()
    save_model(model, tmp_path / "m.pth")
    with pytest.raises(CheckpointMismatchError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "m.pth", model)
    save_checkpoint(tmp_path / "c.pth", model, None, step=1)
    with pytest.raises(CheckpointMismatchError, match="no optimizer state"):
        load_checkpoint(tmp_path / "c.pth", model, make_optimizer(model, 1e-3, 0.0))
    with pytest.raises(FileNotFoundError):
        load_model(model, tmp_path / "absent.pth")


def test_writes_are_atomic(tmp_path, monkeypatch):
    model = model_with()
    save_model(model, tmp_path / "m.pth")
    save_checkpoint(tmp_path / "c.pth", model, make_optimizer(model, 1e-3, 0.1), step=0)
    save_model(model, tmp_path / "m.safetensors")
    assert files_in(tmp_path) == ["c.pth", "m.pth", "m.safetensors"]  # no temporary files left
    original = (tmp_path / "m.pth").read_bytes()

    def crash(obj, f, *args, **kwargs):  # dies half-way through writing
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(model_with(9), tmp_path / "m.pth")
    assert (tmp_path / "m.pth").read_bytes() == original  # the old file is intact
    assert files_in(tmp_path) == ["c.pth", "m.pth", "m.safetensors"]


class Exploit:
    """Unpickling this would create a file: weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pth"
    with open(bad, "wb") as f:
        pickle.dump({"tok_emb.weight": Exploit(marker)}, f, protocol=2)
    torch.save({"weights": torch.ones(2), "extra": Exploit(marker)}, tmp_path / "bad2.pth")
    for path in (bad, tmp_path / "bad2.pth"):
        # A user's file that is not what it should be: one line from a command (a UserError), not a traceback.
        with pytest.raises(CheckpointFileError, match="weights_only"):
            load_model(model_with(), path)
        with pytest.raises(CheckpointFileError):
            load_checkpoint(path, model_with())
    assert not marker.exists()


def test_config_from_state_dict_and_sidecar(tmp_path):
    model = model_with(tie_weights=True)
    cfg = config_from_state_dict(model.state_dict(), n_heads=2)
    assert {k: cfg[k] for k in TINY if k != "drop_rate"} == {k: TINY[k] for k in TINY if k != "drop_rate"}
    with pytest.warns(UserWarning, match="assuming n_heads"):
        guessed = config_from_state_dict(model_with(emb_dim=128, n_heads=4).state_dict())
    assert guessed["n_heads"] == 4  # the quick config's width
    with pytest.raises(CheckpointMismatchError, match="n_heads"):
        config_from_state_dict(model.state_dict())  # emb_dim 16: no rule applies
    # config.json beside the weights (as ch05.cli.pretrain writes it)
    save_model(model, tmp_path / "model.pth")
    assert saved_config(tmp_path / "model.pth") is None
    (tmp_path / "config.json").write_text(json.dumps(model.cfg))
    assert saved_config(tmp_path / "model.pth") == model.cfg
    (tmp_path / "config.json").write_text(json.dumps({"n_embd": 16}))  # a Hugging Face one: ignored
    assert saved_config(tmp_path / "model.pth") is None


# --- files saved by the book's own code -----------------------------------------------------------

def book_state_dict(model: GPTModel, mask_dtype=torch.float32) -> dict:
    """What the book's GPTModel saves: our tensors plus a persistent causal-mask buffer per block
    (`torch.triu(torch.ones(context_length, context_length), diagonal=1)`)."""
    n = model.cfg["context_length"]
    masks = {f"trf_blocks.{i}.att.mask": torch.triu(torch.ones(n, n, dtype=mask_dtype), diagonal=1)
             for i in range(model.cfg["n_layers"])}
    return {**model.state_dict(), **masks}


def test_books_model_pth_loads_with_a_note_about_the_masks(tmp_path):
    from ch05.gpt_generate import load_model_for_generation

    source = model_with(seed=1).eval()
    torch.save(book_state_dict(source), tmp_path / "model.pth")
    with pytest.warns(UserWarning, match=r"dropped 2 attention-mask buffers \(trf_blocks.N.att.mask\)") as seen:
        loaded = load_model(model_with(seed=2), tmp_path / "model.pth")
    assert len(seen) == 1 and str(tmp_path / "model.pth") in str(seen[0].message)
    assert same_weights(loaded, source)

    with pytest.warns(UserWarning, match="attention-mask buffers"):
        generator, _ = load_model_for_generation(tmp_path / "model.pth", n_heads=TINY["n_heads"])
    idx = torch.randint(0, TINY["vocab_size"], (1, 8))
    with torch.no_grad():
        assert torch.equal(generator(idx), source(idx))

    # The book's model_and_optimizer.pth: the masks sit inside model_state_dict.
    torch.save({"model_state_dict": book_state_dict(source, torch.bool), "optimizer_state_dict": {}},
               tmp_path / "model_and_optimizer.pth")
    with pytest.warns(UserWarning, match="attention-mask buffers"):
        assert same_weights(load_model(model_with(seed=3), tmp_path / "model_and_optimizer.pth"), source)


def test_a_mask_that_is_not_causal_is_not_dropped(tmp_path):
    state = book_state_dict(model_with())
    state["trf_blocks.1.att.mask"] = torch.zeros(8, 8)  # not the causal mask: keep it and refuse the file
    torch.save(state, tmp_path / "model.pth")
    with pytest.warns(UserWarning, match="dropped 1 attention-mask"):
        with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: \['trf_blocks.1.att.mask'\]"):
            load_model(model_with(), tmp_path / "model.pth")


# --- a model laid out for decoding saves ---------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("tied", [False, True])
def test_a_model_laid_out_for_decoding_saves_and_reloads_equal(tmp_path, monkeypatch, suffix, tied):
    """LLMFS_DECODING_LAYOUT (on by default) re-strides float32 linear weights; safetensors stores
    tensors contiguously and refused such a model. Saving now writes the same values."""
    monkeypatch.delenv("LLMFS_DECODING_LAYOUT", raising=False)
    model = layout_for_decoding(model_with(3, tie_weights=tied))
    assert not model.trf_blocks[0].att.W_query.weight.is_contiguous()  # the layout really changed
    save_model(model, tmp_path / f"m{suffix}")
    back = load_model(model_with(4, tie_weights=tied), tmp_path / f"m{suffix}")
    assert same_weights(model, back)
    if tied:
        assert back.out_head.weight is back.tok_emb.weight
    if suffix == ".safetensors":
        assert saved_config(tmp_path / f"m{suffix}") == model.cfg


def test_a_laid_out_tied_model_keeps_one_name_in_safetensors(tmp_path):
    from safetensors import safe_open

    save_model(layout_for_decoding(model_with(3, tie_weights=True)), tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "out_head.weight" in keys and "tok_emb.weight" not in keys  # as safetensors' own save_model keeps
    assert meta["tok_emb.weight"] == "out_head.weight"


# --- files and configs that do not fit: one-line errors ------------------------------------------------

@pytest.mark.parametrize("payload, match", [
    ([torch.zeros(2)], "holds a list"),
    ({"a": 1, "b": "x"}, r"should all be tensors, but \['a', 'b'\] are not"),
    ({"model_state_dict": [1, 2]}, "holds a list where the model's weights"),
    ({"model_state_dict": {"tok_emb.weight": 3}}, r"\['tok_emb.weight'\] is not"),
])
def test_a_pth_that_is_not_a_state_dict_is_a_file_error(tmp_path, payload, match):
    torch.save(payload, tmp_path / "x.pth")
    with pytest.raises(CheckpointFileError, match=match):
        load_model(model_with(), tmp_path / "x.pth")
    assert issubclass(CheckpointFileError, UserError)


def test_a_safetensors_metadata_config_that_is_not_json(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "a.safetensors"), metadata={"config": "{oops"})
    save_file({"x": torch.zeros(2)}, str(tmp_path / "b.safetensors"), metadata={"config": "[1]"})
    with pytest.raises(CheckpointFileError, match="not valid JSON"):
        saved_config(tmp_path / "a.safetensors")
    with pytest.raises(CheckpointFileError, match="is a list"):
        saved_config(tmp_path / "b.safetensors")


REQUIRED = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")


@pytest.mark.parametrize("change, match", [
    ({"n_heads": None}, r"lacks \['n_heads'\]"),
    ({"emb_dim": "16"}, "emb_dim = '16', not a whole number"),
    ({"emb_dim": 16.0}, "emb_dim = 16.0, not a whole number"),
    ({"n_layers": 0}, "n_layers = 0"),
    ({"n_layers": True}, "n_layers = True"),
    ({"drop_rate": 1.5}, "drop_rate = 1.5, not a dropout rate"),
    ({"drop_rate_attn": float("nan")}, "drop_rate_attn = nan"),
    ({"qkv_bias": "yes"}, "qkv_bias = 'yes', not true or false"),
    ({"n_heads": 3}, "emb_dim 16, which n_heads 3 does not divide"),
])
def test_check_model_config_names_what_is_wrong(change, match):
    cfg = {**TINY, **change}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(CheckpointFileError, match=match) as info:
        check_model_config(cfg, "some/config.json", REQUIRED)
    assert str(info.value).startswith("some/config.json: ")


def test_check_model_config_accepts_real_configs():
    from ch04.gpt import GPT_CONFIG_124M
    from ch05.gpt_download import gpt2_config

    for cfg in (TINY, GPT_CONFIG_124M, gpt2_config("gpt2-xl"), {**TINY, "head_dim": 5, "n_heads": 3}):
        assert check_model_config(cfg, "x", REQUIRED) is cfg
    with pytest.raises(CheckpointFileError, match="is a list"):
        check_model_config([1], "x")


def test_kill_9_at_any_moment_of_checkpoint_writes_leaves_a_whole_checkpoint(tmp_path):
    """A process writing checkpoints one after another is killed -9 at several moments: the file on disk is
    always a whole checkpoint, the previous one or the next (never a torn file), and it loads."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "checkpoint.pth"
    code = ("import sys, torch\n"
            "from ch04.gpt import GPTModel\n"
            "from llmfs.checkpoint import save_checkpoint\n"
            "cfg = {'vocab_size': 500, 'context_length': 16, 'emb_dim': 64, 'n_heads': 2, 'n_layers': 2,"
            " 'drop_rate': 0.0, 'qkv_bias': False}\n"
            "model = GPTModel(cfg); opt = torch.optim.AdamW(model.parameters())\n"
            "step = 0\n"
            "while True:\n"
            "    with torch.no_grad():\n"
            "        model.out_head.weight.fill_(step)\n"
            "    save_checkpoint(sys.argv[1], model, opt, global_step=step, epoch=0, batch_in_epoch=step, tokens=0,"
            " examples=0, num_epochs=1, steps_per_epoch=10**6, history={}, rng_state=torch.get_rng_state(),"
            " rng_epoch_start=torch.get_rng_state(), config=cfg)\n"
            "    print(step, flush=True)\n"
            "    step += 1\n")
    rng = random.Random(123)
    seen = set()
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "0"  # one whole checkpoint exists
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        written = [int(line) for line in proc.stdout.read().split()]
        proc.stdout.close()
        state = torch.load(target, weights_only=True)  # whole, or this raises
        step = state["global_step"]
        assert torch.all(state["model_state_dict"]["out_head.weight"] == step)
        last = written[-1] if written else 0
        assert step in (last, last + 1)  # the previous or the one being written
        seen.add(step)
    assert len(seen) > 1  # the kills did land at different moments
