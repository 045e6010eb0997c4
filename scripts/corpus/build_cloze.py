"""Write the Persuasion cloze set (effllm/assets/eval/persuasion_cloze.jsonl) from the shipped corpus.

The items come from `effllm.eval.cloze.build_cloze_items` with its fixed seed, so rerunning this script after
the corpus or the generator changes is the only way the file changes. Run from the repository root:

    python scripts/corpus/build_cloze.py
"""

from __future__ import annotations

import json

from effllm.eval.cloze import CLOZE_FILE, build_cloze_items
from effllm.eval.corpus import heldout_text, training_text


def main() -> int:
    items = build_cloze_items(training_text(), heldout_text())
    CLOZE_FILE.parent.mkdir(parents=True, exist_ok=True)
    with CLOZE_FILE.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"wrote {len(items)} items to {CLOZE_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
