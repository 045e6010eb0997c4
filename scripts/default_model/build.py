"""Build the embedded default model from the shipped Austen corpus, step by step.

    python scripts/default_model/build.py data        # training text -> runs/default-model/data/train.txt
    python scripts/default_model/build.py tokenizer   # 8192-token byte-level BPE with a ChatML template
    python scripts/default_model/build.py train [-- extra effllm train flags, e.g. --resume --device cuda]
    python scripts/default_model/build.py extend [-- flags]  # continue at the full 512-token context
    python scripts/default_model/build.py ship        # bf16 copy into src/effllm/assets/default-model

`all` runs the five in order. Training is resumable: rerun `train -- --resume` after an interruption.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "runs" / "default-model"
RECIPE = ROOT / "recipes" / "default-model"
ASSET = ROOT / "src" / "effllm" / "assets" / "default-model"


def data() -> None:
    from effllm.eval.corpus import training_text

    out = RUN / "data" / "train.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(training_text())
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB; Persuasion held out)")


def tokenizer() -> None:
    from effllm.cli import main

    rc = main(["tokenizer", "train", "--data", str(RUN / "data" / "train.txt"), "--out", str(RUN / "tokenizer"),
               "--vocab-size", "8192"])
    if rc:
        sys.exit(rc)


def train(extra: list[str], recipe: str = "train.yaml") -> None:
    from effllm.cli import main

    rc = main(["train", "--config", str(RECIPE / recipe), *extra])
    if rc:
        sys.exit(rc)


def ship() -> None:
    import torch

    from effllm.models import load_model, load_tokenizer, save_model

    model = load_model(RUN / "ctx512", dtype=torch.bfloat16, device="cpu")
    tok = load_tokenizer(RUN / "ctx512")
    if ASSET.exists():
        shutil.rmtree(ASSET)
    save_model(model, ASSET, tokenizer=tok)
    print(f"shipped {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (bf16) to {ASSET}")


def main(argv: list[str]) -> None:
    step, extra = (argv[0] if argv else "all"), argv[2:] if len(argv) > 1 and argv[1] == "--" else argv[1:]
    steps = {"data": data, "tokenizer": tokenizer, "ship": ship}
    if step == "train":
        train(extra)
    elif step == "extend":
        train(extra, "extend-context.yaml")
    elif step == "all":
        data()
        tokenizer()
        train(extra)
        train(extra, "extend-context.yaml")
        ship()
    elif step in steps:
        steps[step]()
    else:
        sys.exit(f"unknown step {step!r}; use data, tokenizer, train, extend, ship or all")


if __name__ == "__main__":
    main(sys.argv[1:])
