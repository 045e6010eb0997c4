"""`SkipSchedule`: SkipDecode's exit layer per generated position (arXiv 2307.02628).

Each generated token runs the decoder layers below its exit layer, then the shared final norm and LM
head. The exit layer depends only on the token's index among the generated tokens, never on the
request, so tokens of a batch at the same index share it, and it never increases with the index: every
(layer, position) a later token attends to was computed by the earlier token, and no key or value of a
skipped layer is ever needed. The prompt (and any recompute after preemption) runs at full depth.

The paper gives a linear decay between a maximum and a minimum layer budget but no code; EffLLM's
constants: the exit layer falls linearly from `max_exit` at the first generated position to `min_exit`
at generated index `span` and stays there. The paper skips *lower* layers and keeps the upper ones;
EffLLM exits early instead, which is what a model trained with LayerSkip's early-exit loss
(`effllm train --method early-exit`) can do, and the key-value argument is the same. Lossy: the tokens
are those of a shallower model (docs/decoding.md reports the perplexity cost).
"""

from __future__ import annotations

from dataclasses import dataclass

from effllm.core.errors import ConfigError

DEFAULT_SPAN = 128  # generated tokens over which the exit layer falls from MAX to MIN


@dataclass(frozen=True)
class SkipSchedule:
    min_exit: int
    max_exit: int
    span: int
    num_layers: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_exit <= self.max_exit <= self.num_layers:
            raise ConfigError(
                f"SkipDecode needs 1 <= min exit <= max exit <= {self.num_layers} layers, got "
                f"{self.min_exit} and {self.max_exit}; give --skip-decode MIN,MAX within the model's depth"
            )
        if self.span < 1:
            raise ConfigError(f"--skip-decode-span must be at least 1, got {self.span}")

    def exit_layer(self, generated_index: int) -> int:
        """Layers run for the generated token at `generated_index` (0: the first generated token)."""
        drop = (self.max_exit - self.min_exit) * min(generated_index, self.span) // self.span
        return self.max_exit - drop

    @classmethod
    def parse(cls, spec: str, num_layers: int) -> SkipSchedule:
        """From 'MIN,MAX[,SPAN]' (exit layers, and the generated tokens over which the exit decays)."""
        try:
            values = [int(v) for v in spec.split(",")]
        except ValueError:
            values = []
        if len(values) not in (2, 3):
            raise ConfigError(
                f"--skip-decode takes MIN,MAX or MIN,MAX,SPAN (exit layers and the decay length in "
                f"generated tokens), e.g. 3,6,128; got {spec!r}"
            )
        return cls(values[0], values[1], values[2] if len(values) == 3 else DEFAULT_SPAN, num_layers)
