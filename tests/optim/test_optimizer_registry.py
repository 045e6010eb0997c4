"""build_optimizer and list_optimizers: names, options, and GaLore's choice of matrices."""

import pytest
import torch

from effllm.core.errors import ConfigError
from effllm.optim import LayerwiseOptimizer, build_optimizer, list_optimizers, optimizer_options

NAMES = [
    "adamw",
    "sgd",
    "galore_adamw",
    "galore_adamw8bit",
    "natural_galore_adamw",
    "gradnorm_lorp_adamw",
    "zo_sgd",
    "zo_sgd_sign",
    "zo_sgd_momentum",
    "zo_sgd_conservative",
    "zo_adam",
    "forward_grad_sgd",
]


def test_every_name_is_listed_with_a_one_line_description():
    listed = list_optimizers()
    assert list(listed) == NAMES
    assert all(text and "\n" not in text for text in listed.values())


def test_unknown_name_raises_config_error_naming_the_valid_ones(llama):
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'.*galore_adamw.*zo_sgd"):
        build_optimizer("adam", llama(), lr=1e-3)


def test_unknown_option_raises_config_error_naming_the_valid_ones(llama):
    with pytest.raises(ConfigError, match="no option rnak.*rank, update_proj_gap"):
        build_optimizer("galore_adamw", llama(), lr=1e-3, rnak=4)
    with pytest.raises(ConfigError, match="'zo_sgd' takes no option layerwise"):
        build_optimizer("zo_sgd", llama(), lr=1e-3, layerwise=True)


def test_bad_option_values_raise_config_error(llama):
    with pytest.raises(ConfigError, match="proj_type"):
        build_optimizer("galore_adamw", llama(), lr=1e-3, proj_type="diagonal")
    with pytest.raises(ConfigError, match="sgd"):
        build_optimizer("sgd", llama(), lr=1e-3, nesterov=True)  # torch: Nesterov needs momentum
    with pytest.raises(ConfigError, match="layerwise"):
        build_optimizer("adamw", llama(), lr=1e-3, accumulation_steps=4)


@pytest.mark.parametrize(
    "name", ["galore_adamw", "galore_adamw8bit", "natural_galore_adamw", "gradnorm_lorp_adamw"]
)
def test_galore_family_projects_the_attention_and_mlp_matrices_only(name, llama):
    model = llama()
    opt = build_optimizer(name, model, lr=1e-3, weight_decay=0.1, rank=8, update_proj_gap=50)
    low, decayed, not_decayed = opt.param_groups
    assert low["rank"] == 8 and low["update_proj_gap"] == 50 and low["weight_decay"] == 0.1
    assert low["proj_type"] == ("full" if name == "gradnorm_lorp_adamw" else "std")
    assert sorted(low["param_names"]) == sorted(
        n for n, p in model.named_parameters() if p.dim() == 2 and ("self_attn" in n or "mlp" in n)
    )
    assert len(low["param_names"]) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert decayed["param_names"] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert "rank" not in decayed and decayed["weight_decay"] == 0.1
    assert (
        all(n.endswith("norm.weight") for n in not_decayed["param_names"])
        and not_decayed["weight_decay"] == 0
    )


def test_parameter_groups_are_used_as_given(llama):
    model = llama()
    matrix = model.model.layers[0].mlp.up_proj.weight
    rest = [p for p in model.parameters() if p is not matrix]
    opt = build_optimizer("galore_adamw", [{"params": [matrix], "rank": 4}, {"params": rest}], lr=1e-3)
    assert opt.param_groups[0]["rank"] == 4 and "rank" not in opt.param_groups[1]
    with pytest.raises(ConfigError, match="by name"):
        build_optimizer("galore_adamw", model.parameters(), lr=1e-3)


def test_flags_and_options_tell_the_trainer_how_to_step(llama):
    model = llama()
    for name in NAMES:
        opt = build_optimizer(name, model, lr=1e-3)
        assert getattr(opt, "requires_backward", True) is name.startswith(
            ("adamw", "sgd", "galore", "natural", "gradnorm")
        )
    assert isinstance(build_optimizer("galore_adamw", model, lr=1e-3, layerwise=True), LayerwiseOptimizer)
    assert optimizer_options("zo_sgd") == {"zo_eps": 1e-3, "perturbation": "two_side", "seed": 0}


def test_frozen_parameters_are_left_out(llama):
    model = llama()
    model.lm_head.weight.requires_grad_(False)
    opt = build_optimizer("adamw", model, lr=1e-3)
    assert all(p is not model.lm_head.weight for g in opt.param_groups for p in g["params"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer("adamw", model, lr=1e-3)
    assert torch.is_grad_enabled()
