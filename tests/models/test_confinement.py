"""Loading reads only the checkpoint's own files: names from an index or a symlink cannot reach outside it."""

import json
import os

import pytest

from effllm.cli import main
from effllm.core.errors import CheckpointError
from effllm.models import CausalLM, ModelConfig, load_model, save_model
from effllm.models.hub import checkpoint_file
from effllm.models.tokenizer import load_tokenizer
from effllm.models.tokenizer_training import build_byte_level_tokenizer


@pytest.fixture
def checkpoint(tmp_path):
    config = ModelConfig(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return save_model(CausalLM(config), tmp_path / "m", tokenizer=build_byte_level_tokenizer())


def test_an_index_naming_a_file_outside_the_folder_is_refused(checkpoint, tmp_path):
    secret = tmp_path / "secret.safetensors"
    os.replace(checkpoint / "model.safetensors", secret)
    weight_map = {"model.embed_tokens.weight": "../secret.safetensors"}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_model(checkpoint, device="cpu")
    weight_map["model.embed_tokens.weight"] = "/etc/passwd"
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_model(checkpoint, device="cpu")


def test_a_symlink_out_of_the_folder_is_refused(checkpoint, tmp_path):
    outside = tmp_path / "elsewhere.json"
    os.replace(checkpoint / "tokenizer.json", outside)
    (checkpoint / "tokenizer.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="points outside"):
        load_tokenizer(checkpoint)


def test_symlinks_inside_the_folder_and_into_a_hub_cache_blob_store_are_allowed(tmp_path):
    snapshot = tmp_path / "models--x--y" / "snapshots" / "abc"
    blobs = tmp_path / "models--x--y" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "123").write_text("{}")
    (snapshot / "config.json").symlink_to(blobs / "123")
    assert checkpoint_file(snapshot, "config.json") == snapshot / "config.json"


def test_a_symlink_loop_is_one_line_and_exit_2(checkpoint, capsys):
    (checkpoint / "config.json").unlink()
    (checkpoint / "config.json").symlink_to(checkpoint / "config.json")
    assert main(["generate", "--model", str(checkpoint), "hi", "--max-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("effllm: error:") and err.count("\n") == 1


def test_generate_without_a_tokenizer_says_what_is_missing(checkpoint, capsys):
    (checkpoint / "tokenizer.json").unlink()
    assert main(["generate", "--model", str(checkpoint), "hi", "--max-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer.json" in err and err.count("\n") == 1
