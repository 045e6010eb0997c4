"""The one place where a command's failure becomes what a user sees: one line on stderr and an exit code.

Errors a user can cause (`EffLLMError`, a missing or unreadable file) give exit code 2; Ctrl-C gives 130;
a closed pipe (`effllm generate ... | head`) is not an error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from effllm.core.errors import EffLLMError


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a subcommand's handler; its exit code, or 2 / 130 / 0 as above."""
    try:
        return int(func(args) or 0)
    except EffLLMError as e:
        print(f"effllm: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"effllm: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("effllm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
