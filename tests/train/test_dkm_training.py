"""`effllm train --method dkm`: the run writes a palettized model (the decoder's matrices as 2-bit indices
into their learned palettes, embeddings untouched) and a killed run resumes exactly."""

import torch

from effllm.models import load_model
from effllm.models.palettized_linear import PalettizedLinear
from effllm.train import train

from .test_resume import assert_resumes_like


def dkm_run(make_config, name, **options):
    values = dict(method="dkm", dkm_bits=2, steps=6, save_every=2, lr=1e-3)
    values.update(options)
    return make_config(name, **values)


def test_dkm_training_writes_a_palettized_model_and_resumes_exactly(make_config):
    reference = dkm_run(make_config, "reference")
    train(reference)
    model = load_model(reference.out, dtype=torch.float32, device="cpu")
    assert model.config.effllm["compression"]["format"] == "palettized"
    for layer in model.model.layers:
        down = layer.mlp.down_proj
        assert isinstance(down, PalettizedLinear) and down.bits == 2 and down.palette.shape == (1, 4)
        assert down.dequantized_weight().unique().numel() <= 4
    assert type(model.lm_head) is torch.nn.Linear
    assert model.model.embed_tokens.weight.unique().numel() > 4  # embeddings keep full precision
    assert_resumes_like(
        reference, dkm_run(make_config, "killed", keep_last=1), ["--method", "dkm", "--dkm-bits", "2"]
    )


def test_edkm_training_logs_the_saved_tensor_bytes_it_keeps(make_config):
    from pathlib import Path

    from effllm.train.metrics import read_metrics

    config = dkm_run(make_config, "edkm", steps=2, save_every=0, dkm_edkm=True)
    train(config)
    rows = [r for r in read_metrics(Path(config.out) / "metrics.jsonl") if "dkm_saved_mb" in r]
    assert rows and all(r["dkm_stored_mb"] < r["dkm_saved_mb"] for r in rows)
    down = load_model(config.out, dtype=torch.float32, device="cpu").model.layers[0].mlp.down_proj
    assert isinstance(down, PalettizedLinear)


def test_a_model_dkm_could_not_write_palettized_is_refused_before_training(make_config, tmp_path):
    import json
    from pathlib import Path

    import pytest

    from effllm.core.errors import ConfigError

    config = dkm_run(make_config, "odd", steps=1)
    odd = json.loads(Path(config.model_config).read_text())
    odd["intermediate_size"] = 40  # down_proj's inputs: not a multiple of 32
    path = tmp_path / "odd-config.json"
    path.write_text(json.dumps(odd))
    config.model_config = str(path)
    with pytest.raises(ConfigError, match="multiples of 32; model.layers.0.mlp.down_proj has 40"):
        train(config)
    assert not list((tmp_path / "odd").glob("**/step-*"))  # refused before any step
