"""`EngineConfig`: every engine option in one flat dataclass (a CLI flag is a field).

Defaults that depend on the device (token budget, sequence cap, KV-cache size) are left as None here
and resolved by `resolve` once the model and device are known.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, replace

import torch

from effllm.core.errors import ConfigError
from effllm.core.flags import add_dataclass_flags, given_fields, option
from effllm.engine.structured.manager import BACKENDS as STRUCTURED_BACKENDS
from effllm.kernels.kv_quant import KV_CACHE_DTYPES, kv_bits

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "t": 1000**4,
    "tb": 1000**4,
}

# CPU: a step of 512 tokens keeps the GEMMs near peak and a step near half a second for a 135M model: the
# budget of an engine that serves (`effllm serve`, `LLMEngine`), where a long step delays every running
# request's next token. The offline `LLM` class, which runs a batch to completion, takes 2048 (as vLLM's CPU
# build gives its LLM class 4096 and its server 2048): fewer, larger prefill chunks and more decode-only
# steps. docs/benchmarks.md: 64 requests, SmolLM-135M shape, bf16 519-541 -> 589-605 output tok/s, fp32
# 189 -> 194 (4096: 614 and 194).
CPU_MAX_NUM_BATCHED_TOKENS = 512
CPU_OFFLINE_MAX_NUM_BATCHED_TOKENS = 2048
CPU_MAX_NUM_SEQS = 64
CPU_MAX_KV_CACHE_BYTES = 2 * 1024**3
SPECULATIVE_METHODS = ("ngram", "draft", "early-exit")


def parse_memory(value: int | float | str) -> int:
    """Bytes from an int or a string such as '2GiB', '512MiB', '1.5GB' or '4e9'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"cannot read the memory size {value!r}; write bytes or e.g. '2GiB', '512MiB', '4GB'"
        )
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class EngineConfig:
    """Options of the inference engine (`LLM(model, **options)`, `effllm generate/serve/bench`).

    Every field is a flag of the engine commands (`--block-size`, `--no-enable-prefix-caching` ...), built
    by `effllm.core.flags`; the help texts below are what `--help` shows.
    """

    block_size: int = option(16, "tokens per KV-cache block")
    kv_cache_memory: int | str | None = option(
        None,
        "KV-cache size in bytes or with a unit, e.g. 2GiB (default: at most 2 GiB on CPU, less when fewer "
        "tokens can ever be held; --gpu-memory-utilization of the GPU on CUDA)",
        metavar="SIZE",
    )
    gpu_memory_utilization: float = option(0.9, "fraction of the GPU's memory the engine may use (CUDA)")
    num_kv_blocks: int | None = option(None, "exact number of KV-cache blocks, overriding --kv-cache-memory")
    max_num_batched_tokens: int | None = option(
        None,
        "token budget of one step, decodes and prefill chunks together (default on CPU: 512, and 2048 for the "
        "offline LLM class; 8192 or 16384 on CUDA)",
    )
    max_num_seqs: int | None = option(
        None, "most sequences running at once (default: 64 on CPU, 256 or 1024 on CUDA)"
    )
    max_model_len: int | None = option(
        None, "longest prompt plus output in tokens (default: the model's max_position_embeddings)"
    )
    kv_cache_dtype: str = option(
        "auto",
        "how the KV cache stores keys and values: auto (the model's dtype, or what a quantized checkpoint's "
        "config.json asks for, e.g. int4 after --scheme w4a8kv4), int8 or int4 (asymmetric per token and "
        "head, a float16 step and minimum each: about 1.9x / 3.6x the tokens of bfloat16 at head_dim 64)",
        choices=KV_CACHE_DTYPES,
    )
    enable_prefix_caching: bool = option(
        True, "share the KV blocks of a common prompt prefix between requests"
    )
    enable_chunked_prefill: bool = option(True, "cut long prompts into chunks that share steps with decodes")
    attention_backend: str = option(
        "auto",
        "attention over the paged KV cache: auto (triton on CUDA, paged on CPU) or a name from "
        "effllm.engine.attention_backend.BACKENDS",
    )
    dtype: str | None = option(None, "float32, bfloat16, float16 or auto (default: the checkpoint's)")
    device: str | None = option(None, "cpu, cuda, cuda:N or auto (default: CUDA when available)")
    enforce_eager: bool = option(False, "never capture CUDA graphs of decode steps (CUDA)")
    threads: int | None = option(
        None,
        "CPU threads for the model's kernels (torch.set_num_threads, process-wide; default: torch's, one per "
        "core). On a shared 2-core machine 2 beat 1 by 1.1-1.3x in decode (docs/benchmarks.md)",
    )
    cpu_gemv: bool = option(
        True, "on CPU, run decode-sized linear layers through EffLLM's GEMV kernel instead of F.linear"
    )
    cpu_fused_decode: int = option(
        64,
        "on CPU, run decode-only steps of at most this many requests through one fused C call per step "
        "(every layer in one OpenMP region; dense float32/bfloat16, palettized, symmetric W4A16, W8A16 or W8A8 "
        "models with a float32/bfloat16 cache of the model's dtype); at most 64 for dense bfloat16 models on "
        "a CPU with AMX, 16 for the rest; 0: off",
    )
    cpu_huge_pages: bool = option(
        True,
        "on CPU (Linux), back the weights and the KV cache with 2 MiB transparent huge pages (MADV_COLLAPSE / "
        "MADV_HUGEPAGE): fewer TLB misses while a step streams them; best-effort, results unchanged",
    )
    cpu_prepack: bool = option(
        True,
        "on CPU, run bfloat16 linear layers above decode sizes on weights prepacked for oneDNN (AMX where the "
        "CPU has it; 1.5-2x F.linear at 16-256 rows); costs a second copy of the weights",
    )
    sparse_linears: float | None = option(
        None,
        "run decoder linears with at least this share of zero weights (a pruned model) as CSR sparse "
        "products (CPU, float32); on this machine class they beat dense only near 0.9 at small batch "
        "(`effllm bench sparse-matmul`)",
    )
    seed: int = option(
        0, "seed of the engine's shared sampling generator (requests with a seed use their own)"
    )
    structured_outputs_backend: str = option(
        "auto",
        "what enforces structured outputs (JSON schema, regex, grammar, choice): xgrammar (pip install "
        "'effllm[structured]'), builtin (choice only, no dependency) or auto (xgrammar when installed)",
        choices=STRUCTURED_BACKENDS,
    )
    soft_prompt: str | None = option(
        None,
        "a soft prompt learned for this model (`effllm train --method soft-prompt`): its vectors lead every "
        "prompt, their KV computed once and shared through the prefix cache",
        metavar="PATH",
    )
    lora: list[str] = option(
        [],
        "LoRA adapters (PEFT folders) served over the one base model, NAME=PATH each; a request picks one by "
        "name (the API's `model` field, SamplingParams.adapter), the base otherwise",
        metavar="NAME=PATH",
    )
    uld_assistant: str | None = option(
        None,
        "ULD unlearning: serve base - w * assistant, the assistant trained on what to forget by `effllm "
        "train --method uld` (its own KV cache; docs/training-methods.md)",
        metavar="PATH",
    )
    uld_weight: float = option(1.0, "ULD: the assistant's weight w")
    uld_filter: float = option(
        0.1, "ULD: relative-top filter r (only the base's top tokens are contrasted and drawn; 0: off)"
    )
    speculative_method: str | None = option(
        None,
        "speculative decoding: ngram (prompt lookup: drafts copied from the request's own earlier tokens), "
        "draft (a smaller model with the same tokenizer, --speculative-model) or early-exit (LayerSkip's "
        "self-speculation: the model's first --speculative-exit-layer layers and its head draft); greedy "
        "output is unchanged, sampled output keeps its distribution (rejection sampling)",
        choices=SPECULATIVE_METHODS,
    )
    speculative_model: str | None = option(
        None, "draft: the draft model's checkpoint folder (same tokenizer and vocabulary)", metavar="PATH"
    )
    speculative_exit_layer: int | None = option(
        None,
        "early-exit: how many layers draft (default: half the model's); best on a model trained with "
        "`effllm train --method early-exit`",
    )
    num_speculative_tokens: int = option(4, "drafts per request per step (speculative decoding)")
    prompt_lookup_max: int = option(4, "ngram: longest suffix looked up in the request's tokens")
    prompt_lookup_min: int = option(1, "ngram: shortest suffix looked up")
    skip_decode: str | None = option(
        None,
        "SkipDecode: generated tokens exit after a layer falling linearly from MAX at the first generated "
        "token to MIN at the SPAN-th (default 128), e.g. 3,6 (lossy; for a model trained with early exit)",
        metavar="MIN,MAX[,SPAN]",
    )
    speculative_adaptive: bool = option(
        True,
        "draft only while drafted decode steps are measured to give more tokens/s than plain ones, per batch "
        "size (spec_decode/gate.py); output is the same either way",
    )
    speculative_max_running: int = option(
        8,
        "draft only while at most this many requests run: a larger batch already keeps the CPU busy and "
        "verifying drafts then costs more than it saves (docs/decoding.md)",
    )

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in (
            "num_kv_blocks",
            "max_num_batched_tokens",
            "max_num_seqs",
            "max_model_len",
            "threads",
            "num_speculative_tokens",
            "prompt_lookup_max",
            "prompt_lookup_min",
            "speculative_max_running",
            "speculative_exit_layer",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")
        kv_bits(self.kv_cache_dtype)  # ConfigError for an unknown name
        if self.speculative_method not in (None, *SPECULATIVE_METHODS):
            raise ConfigError(
                f"unknown speculative method {self.speculative_method!r}; choose one of "
                f"{', '.join(SPECULATIVE_METHODS)}"
            )
        if (self.speculative_method == "draft") != (self.speculative_model is not None):
            raise ConfigError(
                "--speculative-method draft needs --speculative-model PATH, and --speculative-model needs "
                "--speculative-method draft"
            )
        if self.soft_prompt and self.speculative_method in ("ngram", "draft"):
            raise ConfigError(
                f"--soft-prompt does not combine with --speculative-method {self.speculative_method} (its "
                "drafts would read the prompt's virtual tokens); use early-exit or no speculation"
            )
        adapters = self.lora_adapters()
        if adapters and (self.skip_decode or self.speculative_method == "early-exit"):
            raise ConfigError(
                "--lora does not combine with --skip-decode or early-exit speculation (they run parts of the "
                "model per request); leave them out"
            )
        if self.uld_assistant and self.speculative_method:
            raise ConfigError(
                "--uld-assistant does not combine with speculative decoding (its logits are one row per "
                "request); leave --speculative-method out"
            )
        if not 0 <= self.uld_filter < 1:
            raise ConfigError(f"--uld-filter is a relative-top ratio in [0, 1), got {self.uld_filter}")
        if self.speculative_exit_layer is not None and self.speculative_method != "early-exit":
            raise ConfigError("--speculative-exit-layer is for --speculative-method early-exit")
        if self.skip_decode and self.speculative_method:
            raise ConfigError(
                "--skip-decode and --speculative-method do not combine (SkipDecode is lossy, speculation "
                "exact); choose one"
            )
        if not 0 <= self.cpu_fused_decode <= 64:
            raise ConfigError(f"--cpu-fused-decode takes 0 (off) to 64 requests, got {self.cpu_fused_decode}")
        if self.sparse_linears is not None and not 0 < self.sparse_linears < 1:
            raise ConfigError(
                f"--sparse-linears takes a share of zero weights in (0, 1), got {self.sparse_linears}"
            )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) exceeds prompt_lookup_max ({self.prompt_lookup_max})"
            )
        if self.kv_cache_memory is not None and parse_memory(self.kv_cache_memory) <= 0:
            raise ConfigError(f"kv_cache_memory must be positive, got {self.kv_cache_memory!r}")

    def lora_adapters(self) -> dict[str, str]:
        """--lora as {name: folder}; ConfigError for an entry that is not NAME=PATH or a repeated name."""
        adapters: dict[str, str] = {}
        for entry in [self.lora] if isinstance(self.lora, str) else self.lora:
            name, sep, path = str(entry).partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--lora takes NAME=PATH (an adapter folder), got {entry!r}")
            if name in adapters:
                raise ConfigError(f"--lora names the adapter {name!r} twice; give each its own name")
            adapters[name] = path
        return adapters

    def resolve(
        self, max_position_embeddings: int, device: torch.device, offline: bool = False
    ) -> EngineConfig:
        """A copy with the device-dependent defaults filled in and the limits made consistent; `offline` for
        an engine that runs batches to completion (the `LLM` class), whose CPU token budget is larger."""
        gpu_mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
        if device.type == "cuda":
            budget, seqs = (16384, 1024) if gpu_mem >= 70 * 1024**3 else (8192, 256)
        else:
            budget = CPU_OFFLINE_MAX_NUM_BATCHED_TOKENS if offline else CPU_MAX_NUM_BATCHED_TOKENS
            seqs = CPU_MAX_NUM_SEQS
        max_model_len = self.max_model_len or max_position_embeddings
        if max_model_len > max_position_embeddings:
            raise ConfigError(
                f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                f"{max_position_embeddings}; lower it"
            )
        max_num_seqs = self.max_num_seqs or min(seqs, self.max_num_batched_tokens or seqs)
        max_tokens = self.max_num_batched_tokens or max(budget, max_num_seqs)
        if max_tokens < max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({max_tokens}) must be at least max_num_seqs ({max_num_seqs}), "
                "so every running sequence can decode in one step; raise the budget or lower max_num_seqs"
            )
        if not self.enable_chunked_prefill:
            # Without chunking a whole prompt must fit in one step.
            max_tokens = max(max_tokens, max_model_len)
        return replace(
            self, max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens
        )


def engine_config(options: dict) -> EngineConfig:
    """`EngineConfig(**options)`, with a ConfigError that lists the valid names for an unknown one."""
    names = [f.name for f in dataclasses.fields(EngineConfig)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ConfigError(f"unknown engine option {unknown[0]!r}; the options are {', '.join(names)}")
    return EngineConfig(**options)


def add_engine_flags(parser, exclude: tuple[str, ...] = (), defaults: dict | None = None) -> None:
    """Every `EngineConfig` field as a flag of `parser` (an argparse parser or group), the same spelling
    on every engine command; `defaults` changes what --help shows for a command that overrides them."""
    add_dataclass_flags(parser, EngineConfig, exclude=exclude, defaults=defaults)


def engine_options(args, exclude: tuple[str, ...] = ()) -> dict:
    """The `EngineConfig` fields given as flags (absent flags keep the dataclass defaults), less `exclude`."""
    return given_fields(args, EngineConfig, exclude)
