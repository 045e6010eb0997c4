"""`--method keep-sparsity`: fine-tuning a pruned model keeps its zeros."""

import pytest
import torch

from effllm.core.errors import ConfigError
from effllm.train import Trainer


def test_keep_sparsity_fine_tuning_keeps_a_pruned_models_zeros(make_config, tmp_path):
    from effllm.compress.prune import prune_
    from effllm.models import load_model, save_model

    first = Trainer(make_config("dense", steps=1))
    first.train()
    model = load_model(tmp_path / "dense", dtype=torch.float32, device="cpu")
    prune_(model, "magnitude", 0.5, progress=False)
    save_model(model, tmp_path / "pruned")
    zeros = {n: p == 0 for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2}
    tuned = Trainer(
        make_config(
            "tuned", model=str(tmp_path / "pruned"), model_config=None, steps=3, method="keep-sparsity"
        )
    )
    tuned.train()
    after = load_model(tmp_path / "tuned", dtype=torch.float32, device="cpu")
    params = dict(after.named_parameters())
    for n, mask in zeros.items():
        assert (params[n][mask] == 0).all() and (params[n][~mask] != 0).all()
    with pytest.raises(ConfigError, match="no zero weights"):
        Trainer(
            make_config("bad", model=str(tmp_path / "dense"), model_config=None, method="keep-sparsity")
        ).setup()
