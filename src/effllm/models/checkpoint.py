"""Loading and saving models in the Hugging Face layout (config.json + safetensors, sharded or not)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from effllm.core.dtypes import dtype_name, parse_device, parse_dtype
from effllm.core.errors import CheckpointError
from effllm.core.memory import check_fits
from effllm.models import palettized_linear, qoq_linear, quantized_linear  # noqa: F401  (register the layouts)
from effllm.models.config import ModelConfig
from effllm.models.foreign_quant import finalize as finalize_foreign_quant
from effllm.models.hub import checkpoint_file, resolve_model_path
from effllm.models.layouts import apply_layout, compression_section, quantization_section
from effllm.models.rope import RotaryEmbedding
from effllm.models.safetensors_io import iter_tensors
from effllm.models.transformer import CausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards, or the single file."""
    index = checkpoint_file(folder, INDEX_FILE)
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(
                f"{index} is not a valid safetensors index; re-download the checkpoint"
            ) from None
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise CheckpointError(f"{index}'s weight_map must map tensor names to file names")
        files = [checkpoint_file(folder, name) for name in dict.fromkeys(weight_map.values())]
        missing = [p.name for p in files if not p.exists()]
        if missing:
            raise CheckpointError(f"{folder} lacks shard(s) {', '.join(missing)} named in {INDEX_FILE}")
        return files
    if (folder / SINGLE_FILE).exists():
        return [checkpoint_file(folder, SINGLE_FILE)]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        raise CheckpointError(
            f"{folder} holds only PyTorch .bin/.pth weights; EffLLM reads safetensors: convert it with "
            "transformers' save_pretrained(safe_serialization=True)"
        )
    raise CheckpointError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}; pass a Hugging Face model folder")


def load_config(path_or_id: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a checkpoint folder or hub id."""
    folder = resolve_model_path(path_or_id)
    return ModelConfig.from_json_file(checkpoint_file(folder, "config.json"))


def load_model(
    path_or_id: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> CausalLM:
    """Load a llama / qwen2 / mistral checkpoint (local folder or hub id) as a `CausalLM` in eval mode.

    dtype defaults to the checkpoint's own (config.json's torch_dtype, else float32) and applies to floating
    tensors (integer tensors of a compressed layout keep theirs); device defaults to CUDA when available.
    The model is built without storage, swapped to the runtime layout config.json's `effllm.compression`
    names (`effllm.models.layouts`), and each tensor of `state_dict()` is read straight into place, so
    loading never holds two copies of the weights.
    """
    folder = resolve_model_path(path_or_id)
    config = ModelConfig.from_json_file(checkpoint_file(folder, "config.json"))
    target_dtype = parse_dtype(dtype) or parse_dtype(config.torch_dtype) or torch.float32
    target_device = parse_device(device)
    files = weight_files(folder)

    check_fits(
        config.num_parameters() * target_dtype.itemsize,
        target_device,
        f"{folder.name} ({config.num_parameters() / 1e9:.2f}B parameters in {dtype_name(target_dtype)})",
    )
    with torch.device("meta"):
        model = CausalLM(config)
        apply_layout(
            model,
            compression_section(config.effllm) or quantization_section(config.quantization_config),
        )
    expected = _loadable_tensors(model)
    loaded: set[str] = set()
    for file in files:
        for name, tensor in iter_tensors(file, target_dtype, target_device):
            if name not in expected:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise CheckpointError(
                    f"{file.name}: unexpected tensor {name}; is this a {config.model_type} model?"
                )
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CheckpointError(
                    f"{file.name}: {name} has shape {tuple(tensor.shape)}, config.json implies "
                    f"{tuple(expected[name].shape)}; the checkpoint and its config disagree"
                )
            if tensor.is_floating_point() != expected[name].is_floating_point():
                raise CheckpointError(
                    f"{file.name}: {name} is {tensor.dtype}, its layout needs {expected[name].dtype}; "
                    "the checkpoint and its config.json disagree"
                )
            _assign(model, name, tensor)
            loaded.add(name)
    if config.tie_word_embeddings:
        model.tie_weights()
        loaded.add("lm_head.weight")
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(
            f"{folder}: missing tensors {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
        )
    finalize_foreign_quant(model)  # GPTQ / AWQ tensors -> the compressed-tensors modules EffLLM runs
    # Non-persistent buffers (rotary frequencies) are computed, not loaded.
    model.model.rotary_emb = RotaryEmbedding(config).to(target_device)
    config.torch_dtype = dtype_name(target_dtype)
    return model.eval()


def _loadable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: `state_dict()`'s keys (parameters and persistent buffers), a tied
    head counted once (under the embeddings)."""
    state = model.state_dict(keep_vars=True)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put a loaded tensor in place of the meta tensor `name` (a parameter or a persistent buffer)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        setattr(module, attr, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
    else:
        module.register_buffer(attr, tensor, persistent=True)


def _state_dict_for_saving(model: CausalLM) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.cpu() for k, v in state.items()}


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def generation_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }


def save_model(
    model: CausalLM,
    out: str | os.PathLike,
    tokenizer: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write `model` (and `tokenizer`) in the Hugging Face layout transformers loads.

    The files are written to a temporary folder first. A new `out` appears by one rename; into an
    existing folder each file is moved in by an atomic replace, weights before config.json, and weight
    files of an earlier save that the new one does not use are removed. Other files in `out` are kept.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_checkpoint(model, staging, tokenizer, max_shard_bytes, extra_files or {})
        if not out.exists():
            os.replace(staging, out)
            return out
        if not out.is_dir():
            raise CheckpointError(f"{out} exists and is not a folder; choose another output path")
        new_names = {p.name for p in staging.iterdir()}
        ordered = sorted(new_names, key=lambda n: n in ("config.json", INDEX_FILE))
        for name in ordered:
            os.replace(staging / name, out / name)
        for stale in out.glob("model*.safetensors*"):
            if stale.name not in new_names:
                stale.unlink()
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_checkpoint(
    model: CausalLM, folder: Path, tokenizer: Any, max_shard_bytes: int, extra_files: dict[str, str]
) -> None:
    config = model.config
    config.torch_dtype = dtype_name(model.dtype)
    state = _state_dict_for_saving(model)
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(state, str(folder / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for name, text in extra_files.items():
        (folder / name).write_text(text)
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
