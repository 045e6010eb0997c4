"""A progress bar on stderr when asked for and stderr is a terminal; otherwise nothing."""

from __future__ import annotations

import sys
from contextlib import contextmanager


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool, unit: str = "seq"):
    if not (enabled and sys.stderr.isatty()):
        yield _Silent()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr) as bar:
        yield bar
