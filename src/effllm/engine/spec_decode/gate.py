"""`SpeculationGate`: draft only while drafting is measured to pay.

Whether speculation pays depends on the proposer's acceptance, the cost of drafting and verifying, the
batch size and the machine, so the engine measures it: for decode-only steps it keeps, per batch-size
bucket (1, 2-3, 4-7, 8-15 ... running requests), an exponential average of the output tokens per second
of drafted steps and of plain steps, and drafts while the first is at least the second. Every
`probe_every`-th decision in a bucket takes the other choice, so both rates stay current (what probing
costs is bounded by that share of steps). A bucket first drafts until it has `warmup` drafted samples,
then decodes plainly for as many. Output is unaffected: drafts never change what is generated.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Bucket:
    drafted_rate: float | None = None
    plain_rate: float | None = None
    drafted_samples: int = 0
    plain_samples: int = 0
    decisions: int = 0


class SpeculationGate:
    def __init__(self, probe_every: int = 16, warmup: int = 4, smoothing: float = 0.25):
        self.probe_every, self.warmup, self.smoothing = probe_every, warmup, smoothing
        self.buckets: dict[int, _Bucket] = {}

    def should_draft(self, num_running: int) -> bool:
        b = self.buckets.setdefault(num_running.bit_length(), _Bucket())
        b.decisions += 1
        if b.drafted_samples < self.warmup:
            return True
        if b.plain_samples < self.warmup:
            return False
        pays = b.drafted_rate >= b.plain_rate
        return not pays if b.decisions % self.probe_every == 0 else pays

    def record(self, num_running: int, drafted: bool, tokens: int, seconds: float) -> None:
        """A decode-only step's outcome: `tokens` appended in `seconds`."""
        if seconds <= 0:
            return
        b = self.buckets.setdefault(num_running.bit_length(), _Bucket())
        rate = tokens / seconds
        if drafted:
            b.drafted_rate = rate if b.drafted_rate is None else _ema(b.drafted_rate, rate, self.smoothing)
            b.drafted_samples += 1
        else:
            b.plain_rate = rate if b.plain_rate is None else _ema(b.plain_rate, rate, self.smoothing)
            b.plain_samples += 1


def _ema(old: float, new: float, weight: float) -> float:
    return (1 - weight) * old + weight * new
