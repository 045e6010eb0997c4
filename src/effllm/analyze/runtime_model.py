"""HELM's idealized runtime: runtime(p, o) = F(p) + g (o - 1) [+ overhead], fitted from measured runs.

From "Cheaply Evaluating Inference Efficiency Metrics" (Narayanan et al.) as HELM computes it
(`compute_estimated_time_from_prompt_size_and_num_output_tokens`): F is profiled at a few prompt
sizes (keys); a prompt of p tokens takes F(key) * p / key for the smallest key >= p (the largest key's
rate beyond it); every output token after the first costs g. The exported JSON has HELM's fields.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effllm.core.errors import ConfigError


@dataclass(frozen=True)
class RuntimeSample:
    """One measured request: prompt tokens in, output tokens out, wall-clock seconds."""

    prompt_tokens: int
    output_tokens: int
    runtime_s: float


@dataclass(frozen=True)
class RuntimeModel:
    runtime_per_output_token: float
    runtime_for_prompt_tokens: dict[int, float]
    overhead: float | None = None

    def prompt_runtime(self, prompt_tokens: int) -> float:
        """F(key) * p / key for the smallest profiled key >= p, else scaled from the largest key."""
        keys = sorted(self.runtime_for_prompt_tokens)
        key = next((k for k in keys if prompt_tokens <= k), keys[-1])
        return self.runtime_for_prompt_tokens[key] * prompt_tokens / key

    def predict(self, prompt_tokens: int, output_tokens: int) -> float:
        """Idealized seconds for one request."""
        runtime = self.prompt_runtime(prompt_tokens)
        if output_tokens > 0:
            runtime += self.runtime_per_output_token * (output_tokens - 1)
        return runtime + (self.overhead or 0.0)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "runtime_per_output_token": self.runtime_per_output_token,
            "runtime_for_prompt_tokens": {
                str(k): v for k, v in sorted(self.runtime_for_prompt_tokens.items())
            },
        }
        if self.overhead is not None:
            out["overhead"] = self.overhead
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuntimeModel:
        try:
            table = {int(k): float(v) for k, v in d["runtime_for_prompt_tokens"].items()}
            model = cls(
                float(d["runtime_per_output_token"]),
                table,
                None if d.get("overhead") is None else float(d["overhead"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(
                f"runtime model is malformed ({type(e).__name__}: {e}); it needs runtime_per_output_token "
                "and runtime_for_prompt_tokens ({prompt tokens: seconds})"
            ) from None
        if not table or min(table) < 1:
            raise ConfigError("runtime_for_prompt_tokens needs at least one positive prompt size")
        return model

    def save(self, path: str | os.PathLike, name: str | None = None) -> Path:
        """Write the model as JSON; with `name`, as HELM's {model name: model} file."""
        path = Path(path)
        body = self.to_dict() if name is None else {name: self.to_dict()}
        path.write_text(json.dumps(body, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> RuntimeModel:
        """Read a model saved by `save`, or one entry (`name`, or the only one) of a HELM runtimes file."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"no runtime model at {path}; fit one with `effllm analyze runtime --runs`"
            ) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(raw, dict) and "runtime_per_output_token" not in raw:
            if name is None and len(raw) != 1:
                raise ConfigError(f"{path} holds several models; name one of {sorted(raw)}")
            if name is not None and name not in raw:
                raise ConfigError(f"{path} has no model {name!r}; it has {sorted(raw)}")
            raw = raw[name] if name is not None else next(iter(raw.values()))
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)


def fit_runtime_model(
    samples: Iterable[RuntimeSample | tuple[int, int, float]], denoise: bool = False
) -> RuntimeModel:
    """Fit F and g as HELM's profiling did.

    F(p) is the mean runtime of the runs with one output token at prompt size p; g is the slope of a
    least-squares line through (o, runtime - F(p)) pooled over every run. `denoise` (for noisy or remote
    engines) takes the fixed per-request overhead F(p_min) - g out of every F and adds it back once
    per request at prediction time.
    """
    runs = [s if isinstance(s, RuntimeSample) else RuntimeSample(*s) for s in samples]
    for run in runs:
        if run.prompt_tokens < 1 or run.output_tokens < 1 or not run.runtime_s >= 0:
            raise ConfigError(f"run {run} needs prompt and output tokens >= 1 and a runtime >= 0")
    single: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        if run.output_tokens == 1:
            single[run.prompt_tokens].append(run.runtime_s)
    missing = sorted({r.prompt_tokens for r in runs} - set(single))
    if not single or missing:
        raise ConfigError(
            f"every prompt size needs a run with one output token to fix F(p); missing for {missing or 'all'}"
        )
    prompt_runtime = {p: float(np.mean(v)) for p, v in single.items()}
    outputs = np.array([r.output_tokens for r in runs], dtype=float)
    extra = np.array([r.runtime_s - prompt_runtime[r.prompt_tokens] for r in runs])
    if np.ptp(outputs) == 0:
        raise ConfigError("runs need at least two different output lengths to fit the per-token runtime")
    per_token = float(np.polyfit(outputs, extra, 1)[0])
    if not denoise:
        return RuntimeModel(per_token, prompt_runtime)
    overhead = prompt_runtime[min(prompt_runtime)] - per_token
    return RuntimeModel(per_token, {p: f - overhead for p, f in prompt_runtime.items()}, overhead)


def load_runs(path: str | os.PathLike) -> list[RuntimeSample]:
    """Measured runs from a JSON list or JSON-lines file of {prompt_tokens, output_tokens, runtime_s}."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"no runs file at {path}") from None
    try:
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
        return [
            RuntimeSample(int(r["prompt_tokens"]), int(r["output_tokens"]), float(r["runtime_s"]))
            for r in rows
        ]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"{path}: each run needs prompt_tokens, output_tokens and runtime_s ({type(e).__name__}: {e})"
        ) from None
