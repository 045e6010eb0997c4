"""Build the embedded default model from the shipped corpus, step by step.

    python scripts/default_model/build.py data        # runs/default-model/data/{train,valid}.txt
    python scripts/default_model/build.py tokenizer   # 8192-token byte-level BPE with a ChatML template
    python scripts/default_model/build.py train [-- extra effllm train flags, e.g. --resume --device cuda]
    python scripts/default_model/build.py anneal [-- flags]  # a short low-lr stage on the Austen text only
    python scripts/default_model/build.py ship        # bf16 copy of the last stage into the package

`all` runs the five in order. Training is resumable: rerun `train -- --resume` after an interruption.

The data: the last 2% of the lines of every training book (the five Austen novels and the extras: the World
English Bible, Matthew Henry's commentary, Shakespeare) is the held-out split of the mix (valid.txt); the
rest is the training text, the Austen part AUSTEN_WEIGHT times (it is the evaluation domain). *Persuasion*
is in neither.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "runs" / "default-model"
RECIPE = ROOT / "recipes" / "default-model"
ASSET = ROOT / "src" / "effllm" / "assets" / "default-model"


AUSTEN_WEIGHT = 3
VALID_FRACTION = 0.02


def split_book(text: str, fraction: float = VALID_FRACTION) -> tuple[str, str]:
    """(the first 1 - fraction of the lines, the last fraction): the held-out part is contiguous text."""
    lines = text.splitlines(keepends=True)
    cut = len(lines) - max(1, round(len(lines) * fraction))
    return "".join(lines[:cut]), "".join(lines[cut:])


def data() -> None:
    from effllm.eval.corpus import book_names, book_text

    folder = RUN / "data"
    folder.mkdir(parents=True, exist_ok=True)
    train, valid = {"train": [], "extra": []}, []
    for split in ("train", "extra"):
        for name in book_names(split):
            head, tail = split_book(book_text(name))
            train[split].append(head)
            valid.append(tail)
    austen = "\n".join(train["train"])
    (folder / "train.txt").write_text("\n".join([austen] * AUSTEN_WEIGHT + train["extra"]))
    (folder / "austen.txt").write_text(austen)  # the anneal stage's data (the same 98% of the novels)
    (folder / "valid.txt").write_text("\n".join(valid))
    for file in ("train.txt", "valid.txt", "austen.txt"):
        print(f"wrote {folder / file} ({(folder / file).stat().st_size / 1e6:.2f} MB)")
    print(f"Austen x{AUSTEN_WEIGHT} in the training text; Persuasion held out")


def tokenizer() -> None:
    from effllm.cli import main

    rc = main(
        [
            "tokenizer",
            "train",
            "--data",
            str(RUN / "data" / "train.txt"),
            "--out",
            str(RUN / "tokenizer"),
            "--vocab-size",
            "8192",
        ]
    )  # trained on the mix as the model sees it (Austen upweighted)
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

    stage = RUN / ("anneal" if (RUN / "anneal" / "model.safetensors").exists() else "train")
    model = load_model(stage, dtype=torch.bfloat16, device="cpu")
    tok = load_tokenizer(stage)
    if ASSET.exists():
        shutil.rmtree(ASSET)
    save_model(model, ASSET, tokenizer=tok)
    print(
        f"shipped {stage.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (bf16) to {ASSET}"
    )


def main(argv: list[str]) -> None:
    step, extra = (argv[0] if argv else "all"), argv[2:] if len(argv) > 1 and argv[1] == "--" else argv[1:]
    steps = {"data": data, "tokenizer": tokenizer, "ship": ship}
    if step == "train":
        train(extra)
    elif step == "anneal":
        train(extra, "anneal-austen.yaml")
    elif step == "all":
        data()
        tokenizer()
        train(extra)
        train(extra, "anneal-austen.yaml")
        ship()
    elif step in steps:
        steps[step]()
    else:
        sys.exit(f"unknown step {step!r}; use data, tokenizer, train, anneal, ship or all")


if __name__ == "__main__":
    main(sys.argv[1:])
