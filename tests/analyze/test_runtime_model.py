import json

import numpy as np
import pytest

from effllm.analyze.runtime_model import RuntimeModel, RuntimeSample, fit_runtime_model, load_runs
from effllm.core.errors import ConfigError

PROMPTS = [1, 16, 32, 64, 128, 256, 512, 1024]
OUTPUTS = [1, 2, 4, 8, 16, 32, 64]


def _synthetic(prompt_runtime, per_token, overhead=0.0, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [
        RuntimeSample(p, o, overhead + prompt_runtime(p) + per_token * (o - 1) + rng.normal(0, noise))
        for p in PROMPTS
        for o in OUTPUTS
        for _ in range(3)
    ]


def test_runtime_fit_recovers_synthetic_parameters():
    def prompt_runtime(p):
        return 0.015 + 2e-4 * p

    model = fit_runtime_model(_synthetic(prompt_runtime, per_token=0.021, noise=1e-4))
    assert model.runtime_per_output_token == pytest.approx(0.021, rel=0.01)
    for p in PROMPTS:
        assert model.runtime_for_prompt_tokens[p] == pytest.approx(prompt_runtime(p), abs=3e-4)
    assert model.predict(512, 100) == pytest.approx(prompt_runtime(512) + 0.021 * 99, rel=0.01)


def test_denoised_fit_separates_a_fixed_overhead():
    def prompt_runtime(p):
        return 0.02 * (1 + p / 64)  # F(1) = 0.0203

    runs = _synthetic(prompt_runtime, per_token=0.01, overhead=0.5)
    model = fit_runtime_model(runs, denoise=True)
    assert model.runtime_per_output_token == pytest.approx(0.01)
    # HELM: overhead = F(p_min) - g, taken out of every F and added back per request
    assert model.overhead == pytest.approx(0.5 + prompt_runtime(1) - 0.01)
    assert model.runtime_for_prompt_tokens[1] == pytest.approx(0.01)
    for run in runs[:: len(OUTPUTS)]:
        assert model.predict(run.prompt_tokens, run.output_tokens) == pytest.approx(run.runtime_s)


def test_prediction_follows_helm_lookup_rules():
    # davinci's idealized entry in HELM: g = 0.081 s/token, F(1920) = 0.597 s
    model = RuntimeModel(0.081, {1: 0.016, 1024: 0.3, 1920: 0.597})
    assert model.predict(1920, 1) == pytest.approx(0.597)
    assert model.predict(1920, 11) == pytest.approx(0.597 + 10 * 0.081)
    assert model.predict(1500, 1) == pytest.approx(0.597 * 1500 / 1920)  # smallest key >= p, scaled to p
    assert model.predict(3840, 1) == pytest.approx(2 * 0.597)  # beyond the largest key: linear
    assert model.predict(1, 0) == pytest.approx(0.016)  # no output tokens: no per-token term


def test_exported_model_round_trips_in_helm_format(tmp_path):
    model = RuntimeModel(0.02, {16: 0.1, 256: 0.4}, overhead=0.05)
    path = model.save(tmp_path / "runtime.json", name="effllm/smollm")
    raw = json.loads(path.read_text())
    assert raw == {
        "effllm/smollm": {
            "runtime_per_output_token": 0.02,
            "runtime_for_prompt_tokens": {"16": 0.1, "256": 0.4},
            "overhead": 0.05,
        }
    }
    assert RuntimeModel.load(path) == model
    assert RuntimeModel.load(model.save(tmp_path / "plain.json")) == model


def test_runs_load_from_json_or_jsonl_and_bad_runs_are_rejected(tmp_path):
    rows = [
        {"prompt_tokens": 8, "output_tokens": 1, "runtime_s": 0.1},
        {"prompt_tokens": 8, "output_tokens": 3, "runtime_s": 0.3},
    ]
    (tmp_path / "runs.json").write_text(json.dumps(rows))
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert (
        load_runs(tmp_path / "runs.json")
        == load_runs(tmp_path / "runs.jsonl")
        == [RuntimeSample(8, 1, 0.1), RuntimeSample(8, 3, 0.3)]
    )
    with pytest.raises(ConfigError, match="one output token"):
        fit_runtime_model([(8, 2, 0.2), (8, 3, 0.3)])
    with pytest.raises(ConfigError, match="two different output lengths"):
        fit_runtime_model([(8, 1, 0.1)])
    (tmp_path / "bad.json").write_text('[{"prompt_tokens": 8}]')
    with pytest.raises(ConfigError, match="runtime_s"):
        load_runs(tmp_path / "bad.json")
