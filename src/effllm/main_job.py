"""`make run`: the main job on the embedded default model.

While no trained default model ships, it writes a tiny random (untrained) checkpoint and generates from
it, so that the whole path (checkpoint, tokenizer, generation) is exercised on a fresh machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from effllm.cli import main as cli_main
from effllm.models.default import DEFAULT_MODEL_DIR

PROMPT = "It is a truth universally acknowledged, that"
PLACEHOLDER = Path("runs/untrained-placeholder")


def main() -> int:
    if (DEFAULT_MODEL_DIR / "config.json").exists():
        print(f"effllm: generating with the embedded default model ({DEFAULT_MODEL_DIR})", file=sys.stderr)
        return cli_main(["generate", PROMPT, "--max-tokens", "64"])
    print(
        "effllm: no trained default model ships yet, so this runs a tiny RANDOM, UNTRAINED llama "
        f"written to {PLACEHOLDER}: its text is noise, the point is that the whole path runs.",
        file=sys.stderr,
    )
    if not (PLACEHOLDER / "config.json").exists():
        rc = cli_main(["init-model", str(PLACEHOLDER)])
        if rc:
            return rc
    return cli_main(["generate", PROMPT, "--model", str(PLACEHOLDER), "--max-tokens", "32", "--seed", "0"])


if __name__ == "__main__":
    sys.exit(main())
