"""`make run`: the main job on the embedded default model.

Generates a continuation of an Austen sentence with the default model (a small llama trained on Jane
Austen, the Bible and Shakespeare; docs/default-model.md), streaming it to the terminal.
"""

from __future__ import annotations

import sys

from effllm.cli import main as cli_main
from effllm.models.default import default_model_path

PROMPT = "It is a truth universally acknowledged, that"


def main() -> int:
    folder = default_model_path()
    print(f"effllm: continuing {PROMPT!r} with the embedded default model ({folder})", file=sys.stderr)
    return cli_main(
        ["generate", PROMPT, "--max-tokens", "80", "--temperature", "0.8", "--top-p", "0.95", "--seed", "0"]
    )


if __name__ == "__main__":
    sys.exit(main())
