"""What a model's weights cost in memory: resident bytes, and bytes a decode step streams."""

from __future__ import annotations

from torch import nn


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer, each storage counted once (a tied head once);
    rotary frequencies (computed, not weights) excluded."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *(b for n, b in model.named_buffers() if not n.endswith("inv_freq"))]
    for t in tensors:
        if t is None or t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def streamed_bytes(model: nn.Module) -> int:
    """Bytes a batch-1 decode step reads: every weight but the embedding table (one row of it is read),
    plus the table again when the head is tied to it."""
    embed = model.model.embed_tokens.weight
    table = embed.numel() * embed.element_size()
    tied = getattr(model.lm_head, "weight", None) is embed
    return resident_bytes(model) - table + (table if tied else 0)
