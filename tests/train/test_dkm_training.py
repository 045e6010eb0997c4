"""`effllm train --method dkm`: the run writes a palettized model (at most 2^bits values per decoder
matrix, embeddings untouched) and a killed run resumes exactly."""

import torch

from effllm.models import load_model
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
    for layer in model.model.layers:
        assert layer.mlp.down_proj.weight.unique().numel() <= 4
    assert model.model.embed_tokens.weight.unique().numel() > 4  # embeddings keep full precision
    assert_resumes_like(
        reference, dkm_run(make_config, "killed", keep_last=1), ["--method", "dkm", "--dkm-bits", "2"]
    )
