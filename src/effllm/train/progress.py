"""Progress on the console: a tqdm bar when stderr is a terminal, else a line every `log_every` steps."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any


class Progress:
    def __init__(self, total: int, initial: int = 0, log_every: int = 10, enabled: bool = True):
        self.total, self.log_every, self.enabled = total, log_every, enabled
        self.start_step, self.start_time = initial, time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = row["step"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(_summary(row), refresh=False)
        elif step % self.log_every == 0 or step == self.total or "eval_loss" in row:
            done = step - self.start_step
            rate = (time.perf_counter() - self.start_time) / max(done, 1)
            eta = timedelta(seconds=round(rate * (self.total - step)))
            print(f"step {step}/{self.total} {_summary(row)} eta {eta}", flush=True)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summary(row: dict[str, Any]) -> str:
    parts = [f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}", f"{row['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in row:
        parts.append(f"mfu {row['mfu']:.1%}")
    if "eval_loss" in row:
        parts.append(f"eval_loss {row['eval_loss']:.4f} ppl {row['eval_ppl']:.2f}")
    return " ".join(parts)
