"""Checkpoint I/O: effllm reads what transformers writes and writes what transformers reads."""

import json

import pytest
import torch

from effllm.core.errors import CheckpointError, ConfigError
from effllm.models import CausalLM, ModelConfig, load_model, save_model
from effllm.models.hub import resolve_model_path
from effllm.models.safetensors_io import iter_tensors
from tests.models.hf_fixtures import save_hf_model


def _ids():
    torch.manual_seed(0)
    return torch.randint(0, 128, (2, 17))


@pytest.mark.parametrize(
    "variant", ["llama-bias-tied", "qwen2-untied", "mistral-sliding", "llama-llama3-rope"]
)
def test_saved_checkpoint_loads_in_transformers_with_same_logits(tmp_path, variant):
    from transformers import AutoModelForCausalLM

    save_hf_model(variant, tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype="float32", device="cpu")
    save_model(ours, tmp_path / "ours")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(ours(_ids()), theirs(_ids()).logits, atol=1e-5)
    reloaded = load_model(tmp_path / "ours", device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()), ours(_ids()))


def test_transformers_sharded_checkpoint_loads(tmp_path):
    hf = save_hf_model("qwen2-untied", tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path, dtype="float32", device="cpu")
    with torch.no_grad():
        assert torch.allclose(ours(_ids()), hf(_ids()).logits, atol=1e-5)


def test_effllm_writes_shards_with_index_above_the_shard_size(tmp_path):
    model = CausalLM(
        ModelConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
        )
    )
    save_model(model, tmp_path / "m", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "m" / "model.safetensors").exists()
    reloaded = load_model(tmp_path / "m", device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(_ids() % 64), model(_ids() % 64))


def test_resaving_into_an_existing_folder_replaces_weights_and_keeps_other_files(tmp_path):
    config = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    out = tmp_path / "m"
    save_model(CausalLM(config), out, max_shard_bytes=20_000)
    (out / "notes.txt").write_text("keep me")
    second = CausalLM(config)
    save_model(second, out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".m.tmp-*"))
    with torch.no_grad():
        assert torch.equal(load_model(out, device="cpu")(_ids() % 64), second(_ids() % 64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load_in_their_dtype_and_cast_on_request(tmp_path, dtype):
    hf = save_hf_model("llama", tmp_path / "f32")
    hf.to(dtype).save_pretrained(tmp_path / "half")
    ours = load_model(tmp_path / "half", device="cpu")
    assert ours.dtype == dtype
    assert load_model(tmp_path / "half", dtype="float32", device="cpu").dtype == torch.float32
    names = dict(iter_tensors(tmp_path / "half" / "model.safetensors"))
    assert torch.equal(ours.model.embed_tokens.weight, names["model.embed_tokens.weight"])


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    save_hf_model("llama", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path)


def test_unknown_model_type_names_the_supported_ones(tmp_path):
    save_hf_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="llama, qwen2, mistral"):
        load_model(tmp_path)


def test_unsupported_rope_type_names_the_supported_ones():
    with pytest.raises(ConfigError, match="default, linear, dynamic, llama3, yarn"):
        ModelConfig.from_hf_dict(
            dict(
                model_type="llama",
                vocab_size=8,
                hidden_size=8,
                intermediate_size=8,
                num_hidden_layers=1,
                num_attention_heads=1,
                rope_scaling={"rope_type": "longrope"},
            )
        )


def test_config_shape_disagreeing_with_weights_is_a_clear_error(tmp_path):
    save_hf_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="disagree"):
        load_model(tmp_path)


def test_num_parameters_counts_the_model_exactly():
    for tied in (True, False):
        config = ModelConfig(
            model_type="qwen2",
            vocab_size=50,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            qkv_bias=True,
            tie_word_embeddings=tied,
        )
        model = CausalLM(config)
        assert config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_hub_id_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        load_model("effllm-test/not-a-cached-model")


def test_hub_id_found_in_the_cache_loads_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    save_hf_model("llama", tmp_path / "src")
    snapshot = tmp_path / "cache" / "models--effllm-test--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in (tmp_path / "src").iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve_model_path("effllm-test/tiny") == snapshot
    assert load_model("effllm-test/tiny").config.model_type == "llama"
