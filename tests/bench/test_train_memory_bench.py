"""`effllm bench train-memory`: the byte counts it reports are exact, and every method runs."""

import json
import subprocess
import sys

import pytest
import torch

from effllm.bench import train_memory
from effllm.bench.shapes import shape_config
from effllm.models.transformer import CausalLM
from effllm.optim import build_optimizer


def _model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(shape_config("tiny"))


def _backward(model: CausalLM) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    logits = model(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_adamw_state_is_two_moments_and_a_step_counter_per_parameter():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert train_memory.optimizer_state_bytes(opt) == 0
    _backward(model)
    opt.step()
    params = list(model.parameters())
    # exp_avg + exp_avg_sq, plus AdamW's 0-d float32 `step` tensor per parameter.
    assert train_memory.optimizer_state_bytes(opt) == 2 * _param_bytes(params) + 4 * len(params)


def test_galore_state_counts_low_rank_moments_and_projectors():
    model = _model()
    rank = 8
    opt = build_optimizer("galore_adamw", model, lr=1e-3, rank=rank)
    _backward(model)
    opt.step()
    expected = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if "rank" in group:
                m, n = p.shape
                # std projects the smaller side: moments are r x n (m >= n) or m x r, the projector r x n or m x r.
                small = min(m, n)
                k = min(rank, small)
                expected += 4 * (2 * k * max(m, n) + k * small)
            else:
                expected += 2 * _param_bytes([p])
    assert train_memory.optimizer_state_bytes(opt) == expected
    assert expected < 2 * _param_bytes(model.parameters())


def test_gradient_tracker_sees_all_gradients_or_one_layer_at_a_time():
    model = _model()
    tracker = train_memory._GradientTracker(model)
    _backward(model)
    assert tracker.peak == _param_bytes(model.parameters())

    model = _model()
    tracker = train_memory._GradientTracker(model)  # registered first: its hooks run before the updates
    build_optimizer("adamw", model, lr=1e-3, layerwise=True)
    _backward(model)
    assert all(p.grad is None for p in model.parameters())
    assert tracker.peak == max(_param_bytes([p]) for p in model.parameters())


@pytest.mark.parametrize(
    "method", ["adamw", "galore-8bit-layerwise", "lisa", "owlore", "zo-sgd", "inference"]
)
def test_measure_method_reports_memory_and_time(method):
    row = train_memory.measure_method("tiny", method, batch_size=1, seq_len=16, steps=2, warmup=1, rank=8)
    assert row["weights_bytes"] == _param_bytes(CausalLM(shape_config("tiny")).parameters())
    assert row["step_time_s"] > 0 and row["peak_bytes"] > 0
    assert (
        row["model_state_bytes"]
        == row["weights_bytes"] + row["gradient_peak_bytes"] + row["optimizer_state_bytes"]
    )
    if method in ("zo-sgd", "inference"):
        assert row["gradient_peak_bytes"] == 0 and row["optimizer_state_bytes"] == 0
    else:
        assert 0 < row["gradient_peak_bytes"] <= row["weights_bytes"]
    # the rank each trains with: --rank for the GaLore rows, OwLore's own 256
    assert row["rank"] == {"galore-8bit-layerwise": 8, "owlore": 256}.get(method)
    assert row["update_proj_gap"] == {"galore-8bit-layerwise": 200, "owlore": 100}.get(method)
    if method == "galore-8bit-layerwise":
        assert row["layerwise"] and row["gradient_peak_bytes"] < row["weights_bytes"] / 4
        assert row["refresh_step_time_s"] > 0
    if method == "lisa":  # only 2 blocks of the tiny model's 2 and the embeddings train, all of them
        assert row["optimizer_state_bytes"] > 0


def test_goals_are_ratios_of_the_measured_rows():
    def row(method, state=0, added=0, step=1.0, over_gap=None, rank=None):
        return {
            "shape": "s",
            "method": method,
            "rank": rank,
            "optimizer_state_bytes": state,
            "added_bytes": added,
            "model_state_bytes": state + 100,
            "step_time_s": step,
            "step_time_over_gap_s": over_gap or step,
        }

    rows = [
        row("inference", added=100),
        row("adamw", state=1000, added=1000),
        row("galore-r128", state=300, added=600, over_gap=1.2, rank=128),
        row("galore-8bit", rank=128),
        row("galore-8bit-layerwise", added=500, rank=128),
        row("zo-sgd", added=130),
    ]
    goals = train_memory.goals(rows)
    assert goals["galore_state_vs_adamw"] == {"measured": 0.3, "goal_at_most": 0.35, "met": True}
    assert goals["galore_8bit_layerwise_total_vs_adamw"]["measured"] == 0.5
    assert goals["galore_8bit_layerwise_total_vs_adamw"]["met"] is False
    assert goals["galore_8bit_layerwise_weights_grads_state_vs_adamw"]["measured"] == pytest.approx(
        100 / 1100
    )
    assert goals["zo_sgd_total_vs_inference"]["measured"] == pytest.approx(1.3)
    assert goals["galore_step_time_over_gap_vs_adamw"]["measured"] == pytest.approx(1.2)
    assert train_memory.goals([row("adamw")])["galore_state_vs_adamw"]["met"] is None


def test_cli_runs_each_method_in_its_own_process_and_prints_json():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "effllm",
            "bench",
            "train-memory",
            "--shapes",
            "tiny",
            "--methods",
            "adamw",
            "zo-sgd",
            "--batch-size",
            "1",
            "--seq-len",
            "8",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout)
    assert [r["method"] for r in result["rows"]] == ["adamw", "zo-sgd"]
    assert all("error" not in r for r in result["rows"])
    assert "[2/2] tiny zo-sgd" in proc.stderr


def test_cli_rejects_an_unknown_method_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "effllm", "bench", "train-memory", "--methods", "sgd-ish"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown method 'sgd-ish'" in proc.stderr
