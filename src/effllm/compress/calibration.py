"""Calibration data and the layer-by-layer pass that GPTQ, AWQ and SmoothQuant share.

`calibration_ids` cuts N samples of L tokens from the shipped corpus (the default model's training books;
never the held-out one) or from a user's text / jsonl file. `LayerByLayer` runs the decoder one layer at a
time on those samples: it feeds a layer its inputs, lets the method look at what each linear receives
(forward hooks), lets it rewrite the layer, then runs the rewritten layer to get the next layer's inputs.
So each layer is calibrated on activations that already went through the quantized layers before it (as
the GPTQ and AWQ references do), and peak memory is the model plus one layer's activations.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from effllm.core.errors import InputError
from effllm.core.text import check_text

LINEAR_GROUPS = {  # the linears of a decoder layer that read the same input
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}
LAYER_LINEARS = [name for group in LINEAR_GROUPS.values() for name in group]


def read_calibration_text(path: str | Path, text_field: str = "text") -> str:
    """The text of a .txt file, or the `text_field` of every record of a .jsonl file, joined by newlines."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"calibration data {path} does not exist; pass a .txt or .jsonl file")
    raw = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                texts.append(record[text_field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(
                    f"{path}:{number} is not a JSON object with a {text_field!r} string"
                ) from None
        raw = "\n".join(texts)
    check_text(raw, str(path))
    return raw


def calibration_ids(
    tokenizer, num_samples: int = 64, seq_len: int = 256, data: str | Path | None = None, seed: int = 0
) -> torch.Tensor:
    """[num_samples, seq_len] token ids: random windows of the calibration text (the shipped training
    books by default)."""
    if num_samples < 1 or seq_len < 2:
        raise InputError(f"calibration needs at least 1 sample of 2 tokens (got {num_samples} x {seq_len})")
    if data is None:
        from effllm.eval.corpus import training_text

        text = training_text()
    else:
        text = read_calibration_text(data)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise InputError(
            f"calibration text has {ids.numel()} tokens, fewer than one sample of {seq_len}; "
            "pass more text or a smaller --calibration-seq-len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


class LayerByLayer:
    """Run a `CausalLM` one decoder layer at a time over calibration ids, in batches."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, batch_size: int = 8):
        self.model, self.batch_size = model, batch_size
        stack = model.model
        device = model.device
        positions = torch.arange(ids.shape[1], device=device)
        with torch.no_grad():
            self.hidden = [stack.embed_tokens(b.to(device)) for b in ids.split(batch_size)]
            self.cos, self.sin = stack.rotary_emb(positions.unsqueeze(0), self.hidden[0].dtype)

    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        return enumerate(self.model.model.layers)

    def run(
        self,
        layer: nn.Module,
        observe: dict[str, Callable[[torch.Tensor], None]] | None = None,
        advance: bool = False,
    ) -> None:
        """Feed `layer` every batch; call `observe[name](input)` with what each named linear receives; with
        `advance`, the outputs become the inputs of the next layer."""
        handles = []
        for name, fn in (observe or {}).items():
            module = layer.get_submodule(name)
            handles.append(module.register_forward_pre_hook(lambda m, args, fn=fn: fn(args[0].detach())))
        try:
            with torch.no_grad():
                outputs = [layer(h, self.cos, self.sin) for h in self.hidden]
        finally:
            for h in handles:
                h.remove()
        if advance:
            self.hidden = outputs
