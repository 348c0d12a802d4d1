"""llmfs/finetuning.py: weights saved with their config load back; a damaged config is a user's error."""

import json

import pytest
import torch

from ch04.gpt import REQUIRED_KEYS, GPTModel
from llmfs.errors import UserError
from llmfs.finetuning import load_with_config, save_with_config

TINY = {"vocab_size": 64, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0,
        "qkv_bias": False}


def build(meta):
    return GPTModel(meta["config"])


def test_saved_with_its_config_loads_back_equal(tmp_path):
    model = GPTModel(TINY)
    path = save_with_config(model, tmp_path / "m.pth", style="alpaca")
    loaded, meta = load_with_config(path, build=build, required=REQUIRED_KEYS)
    assert meta["style"] == "alpaca" and not loaded.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


@pytest.mark.parametrize("change, message", [
    ({"n_layers": "one"}, "n_layers"),
    ({"n_heads": 3}, "n_heads"),
    ({"drop_rate": 2}, "drop_rate"),
])
def test_a_damaged_config_is_one_user_error_naming_the_file(tmp_path, change, message):
    path = save_with_config(GPTModel(TINY), tmp_path / "m.pth")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "config": {**meta["config"], **change}}))
    with pytest.raises(UserError, match=message) as info:
        load_with_config(path, build=build, required=REQUIRED_KEYS)
    assert str(meta_path) in str(info.value)


def test_a_missing_key_is_named(tmp_path):
    path = save_with_config(GPTModel(TINY), tmp_path / "m.pth")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    del meta["config"]["emb_dim"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="emb_dim"):
        load_with_config(path, build=build, required=REQUIRED_KEYS)
