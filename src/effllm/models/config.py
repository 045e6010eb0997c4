"""`ModelConfig`: the architecture of a Llama-family model, read from a Hugging Face config.json.

Llama (and SmolLM / SmolLM2, which are llama), Qwen2 and Mistral differ only in a few switches:
bias on the attention projections, a sliding attention window, tied embeddings and the RoPE scaling.
One dataclass holds them all; `from_hf_dict` maps each family's keys onto it and rejects what the
model core does not implement, naming what it does.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from effllm.core.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
# The rope_scaling numbers each type needs (yarn's are all optional).
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
SUPPORTED_ACTIVATIONS = ("silu",)

_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}


# Bounds no released checkpoint comes near (the largest vocabularies are ~260k, the widest models ~30k,
# the deepest ~128 layers); past them a config is corrupt or hostile, and building it would never finish.
_INT_BOUNDS = {
    "vocab_size": (1, 4_194_304),
    "hidden_size": (1, 131_072),
    "intermediate_size": (1, 1_048_576),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 4096),
    "num_key_value_heads": (1, 4096),
    "head_dim": (1, 4096),
    "max_position_embeddings": (1, 1 << 28),
}
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim")
_FLOAT_BOUNDS = {"rms_norm_eps": (0.0, 1.0), "rope_theta": (0.0, 1e12), "partial_rotary_factor": (0.0, 1.0)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ModelConfig:
    """Architecture of a decoder-only Llama-family transformer."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # The HF rope_scaling dict with "rope_type" always set ("default" when there is none).
    rope_scaling: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    partial_rotary_factor: float = 1.0
    # Bias on q, k, v projections (qwen2: always), on o_proj (llama attention_bias), on the MLP.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # Per-layer attention window in tokens (None = full causal attention).
    sliding_windows: list[int | None] = field(default_factory=list)
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # Keys EffLLM itself keeps in config.json (quantization, skip plans ...), saved back untouched.
    effllm: dict[str, Any] = field(default_factory=dict)
    # The Hugging Face `quantization_config` (compressed-tensors, gptq, awq ...), saved back untouched.
    quantization_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._check_values()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly in config.json"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_hidden_layers
        self.rope_scaling = dict(self.rope_scaling or {"rope_type": "default"})
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ConfigError naming what is supported when the config asks for something else."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; EffLLM runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM and SmolLM2 are llama)"
            )
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type {rope_type!r} is not supported; use one of {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        numeric = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        numeric += ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
        required = _ROPE_REQUIRED.get(rope_type, ())
        for key in numeric:
            value = self.rope_scaling.get(key)
            if value is None and key not in required:
                continue
            number = not isinstance(value, bool) and isinstance(value, (int, float))
            if not number or value < 0 or (value == 0 and not key.startswith("mscale")):  # mscale 0: none
                raise ConfigError(
                    f"config.json: rope_scaling type {rope_type} needs a positive number {key!r}, got {value!r}"
                )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; the SwiGLU MLP uses "
                f"{', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ConfigError(
                f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_hidden_layers} layers"
            )
        self._check_values()
        if self.partial_rotary_factor != 1.0:
            raise ConfigError(
                "partial_rotary_factor other than 1.0 is not supported by the Llama-family core"
            )

    def _check_values(self) -> None:
        """Every number is of its type, finite and within bounds no real checkpoint exceeds, so that a
        corrupt or hostile config.json fails here, in one line, before anything is allocated."""
        for name, (low, high) in _INT_BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_INTS:
                continue
            if not _is_int(value) or not low <= value <= high:
                raise ConfigError(f"config.json: {name} must be an integer in [{low}, {high}], got {value!r}")
        for name, (low, high) in _FLOAT_BOUNDS.items():
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or not low < value <= high:
                raise ConfigError(
                    f"config.json: {name} must be a finite number in ({low}, {high}], got {value!r}"
                )
        if not _is_number(self.initializer_range) or not 0 <= self.initializer_range < 10:
            raise ConfigError(
                f"config.json: initializer_range must be in [0, 10), got {self.initializer_range!r}"
            )
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                raise ConfigError(
                    f"config.json: {name} must be an integer or null, got {getattr(self, name)!r}"
                )
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if self.eos_token_id is not None and not all(_is_int(t) and t >= 0 for t in eos):
            raise ConfigError(
                f"config.json: eos_token_id must be a token id or a list of them, got {self.eos_token_id!r}"
            )
        for name in ("qkv_bias", "o_bias", "mlp_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config.json: {name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.rope_scaling, dict):
            raise ConfigError(
                f"config.json: rope_scaling must be a mapping or null, got {self.rope_scaling!r}"
            )
        for window in self.sliding_windows or []:
            if window is not None and (not _is_int(window) or window < 1):
                raise ConfigError(f"config.json: a sliding window must be a positive integer, got {window!r}")
        if not isinstance(self.effllm, dict):
            raise ConfigError(f"config.json: effllm must be a mapping, got {type(self.effllm).__name__}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", "default")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def num_parameters(self) -> int:
        """Parameter count, computed from the shapes (embeddings counted once when tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        attn += (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * i + (2 * i + h) * self.mlp_bias
        layer = attn + mlp + 2 * h
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + h

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from the dict of a Hugging Face config.json (llama, qwen2 or mistral)."""
        model_type = raw.get("model_type")
        if model_type is None:
            raise ConfigError(
                "config.json has no model_type; EffLLM needs one of " + ", ".join(SUPPORTED_MODEL_TYPES)
            )
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; EffLLM runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM and SmolLM2 are llama)"
            )
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [key for key in required if key not in raw]
        if missing:
            raise ConfigError(f"config.json lacks the required key {missing[0]!r}")
        kwargs: dict[str, Any] = {"model_type": model_type, **{key: _whole(raw[key]) for key in required}}
        num_layers = kwargs["num_hidden_layers"]
        if not _is_int(num_layers) or not 1 <= num_layers <= _INT_BOUNDS["num_hidden_layers"][1]:
            raise ConfigError(
                f"config.json: num_hidden_layers must be an integer in [1, 1024], got {num_layers!r}"
            )
        kwargs["num_key_value_heads"] = (
            _whole(raw.get("num_key_value_heads")) or kwargs["num_attention_heads"]
        )
        kwargs["head_dim"] = _whole(raw.get("head_dim"))
        for key in (
            "max_position_embeddings",
            "rms_norm_eps",
            "initializer_range",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "tie_word_embeddings",
            "hidden_act",
        ):
            if raw.get(key) is not None:
                kwargs[key] = _whole(raw[key])
        kwargs["torch_dtype"] = raw.get("torch_dtype") or raw.get("dtype")
        kwargs["partial_rotary_factor"] = raw.get("partial_rotary_factor") or 1.0

        rope_theta, rope_scaling = _read_rope(raw)
        kwargs["rope_theta"] = rope_theta
        kwargs["rope_scaling"] = rope_scaling

        if model_type == "qwen2":
            kwargs["qkv_bias"] = True
        elif model_type == "llama":
            kwargs["qkv_bias"] = kwargs["o_bias"] = bool(raw.get("attention_bias", False))
            kwargs["mlp_bias"] = bool(raw.get("mlp_bias", False))
        kwargs["sliding_windows"] = _read_sliding_windows(raw, model_type, num_layers)
        kwargs["effllm"] = dict(raw.get("effllm") or {})
        if raw.get("quantization_config") is not None:
            if not isinstance(raw["quantization_config"], dict):
                raise ConfigError("config.json: quantization_config must be a mapping")
            kwargs["quantization_config"] = dict(raw["quantization_config"])
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}; pass a Hugging Face model folder") from None
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or replace it"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        try:
            return cls.from_hf_dict(raw)
        except (TypeError, ValueError, AttributeError, OverflowError) as e:  # a value of the wrong shape
            raise ConfigError(
                f"{path}: a value has the wrong type or form ({e}); fix or replace it"
            ) from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers reads back (keys of the family's own config class)."""
        out: dict[str, Any] = {
            "architectures": [_HF_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_type == "default" else dict(self.rope_scaling),
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        windows = {w for w in self.sliding_windows}
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        elif self.model_type == "mistral":
            out["sliding_window"] = next(iter(windows)) if len(windows) == 1 else None
        elif self.model_type == "qwen2":
            window = next((w for w in self.sliding_windows if w is not None), None)
            first_sliding = next(
                (i for i, w in enumerate(self.sliding_windows) if w is not None), self.num_hidden_layers
            )
            out["use_sliding_window"] = window is not None
            out["sliding_window"] = window
            out["max_window_layers"] = first_sliding
            out["layer_types"] = [
                "full_attention" if w is None else "sliding_attention" for w in self.sliding_windows
            ]
        if self.effllm:
            out["effllm"] = dict(self.effllm)
        if self.quantization_config is not None:
            out["quantization_config"] = dict(self.quantization_config)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _whole(value: Any) -> Any:
    """2048.0 -> 2048 (some configs write integers as floats); anything else unchanged, for the checks."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _read_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """rope_theta and the scaling dict, from the pre-v5 (`rope_scaling`) or v5 (`rope_parameters`) keys."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = dict(raw.get("rope_scaling") or {})
    # Old configs name the scaling under "type"; "su"/"mrope" etc. are rejected by validate().
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    scaling["rope_type"] = rope_type
    return theta, scaling


def _read_sliding_windows(raw: dict[str, Any], model_type: str, num_layers: int) -> list[int | None]:
    window = raw.get("sliding_window")
    if model_type == "llama" or window is None:
        return [None] * num_layers
    if model_type == "mistral":
        return [int(window)] * num_layers
    # qwen2: sliding only when use_sliding_window; layer_types (transformers >= 4.53) says which layers,
    # older configs put full attention on layers below max_window_layers.
    if not raw.get("use_sliding_window", False):
        return [None] * num_layers
    layer_types = raw.get("layer_types")
    if layer_types:
        return [int(window) if t == "sliding_attention" else None for t in layer_types]
    first = int(raw.get("max_window_layers", num_layers))
    return [None if i < first else int(window) for i in range(num_layers)]
