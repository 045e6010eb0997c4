"""What the training experiments on the Austen corpus share (scripts/{growth,salt,soft_prompt,uld,dkm,
pruning_aware}_experiment.py): the data and model configs under a root folder, one `effllm train` run per
arm with the same optimizer, schedule and precision, and the held-out *Persuasion* perplexity per token.

Run as `python scripts/NAME.py` from the repository root (scripts/ is then on the import path)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from effllm.eval.corpus import heldout_text, training_text
from effllm.eval.perplexity import perplexity
from effllm.models import load_model, load_tokenizer
from effllm.models.default import default_model_path
from effllm.train import TrainConfig, train

CONFIG = Path("recipes/default-model/config.json")


@dataclass
class Experiment:
    root: Path
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3

    def data(self) -> Path:
        """The five training novels as one text file under ROOT/data."""
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        data = self.root / "data" / "austen.txt"
        if not data.exists():
            data.write_text(training_text())
        return data

    def model_config(self, name: str, **changes) -> Path:
        """The default model's config.json with `changes`, written as ROOT/data/NAME-config.json."""
        path = self.root / "data" / f"{name}-config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json.loads(CONFIG.read_text()) | changes, indent=2))
        return path

    def run(self, name: str, steps: int, done_file: str = "model.safetensors", **options) -> Path:
        """Train arm `name` into ROOT/NAME (kept when its `done_file` is already there; resumed when killed)."""
        out = self.root / name
        if (out / done_file).exists():
            print(f"{name}: already trained, kept", flush=True)
            return out
        values = dict(
            tokenizer=str(default_model_path()),
            data=[str(self.data())],
            out=str(out),
            steps=steps,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            optimizer="adamw",
            optimizer_options={"betas": [0.9, 0.95]},
            lr=self.lr,
            weight_decay=0.1,
            warmup_steps=max(1, steps // 20),
            schedule="cosine",
            precision="bf16",
            eval_fraction=0.02,
            eval_every=100,
            eval_batches=8,
            save_every=100,
            resume=True,
            tensorboard=False,
            log_every=50,
        )
        values.update(options)
        train(TrainConfig(**values))
        return out

    @classmethod
    def from_args(
        cls,
        doc: str,
        root: str,
        steps: int,
        lr: float,
        batch_size: int = 16,
        seq_len: int = 256,
        more: Callable[[argparse.ArgumentParser], None] = lambda p: None,
    ) -> tuple[argparse.Namespace, Experiment]:
        """Parse the command line of a script (`doc` its help; `more` adds its own flags) into its options and
        the Experiment they describe; --root, --steps, --lr, --batch-size and --seq-len are common."""
        p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--root", default=root)
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--seq-len", type=int, default=seq_len)
        p.add_argument("--batch-size", type=int, default=batch_size)
        more(p)
        args = p.parse_args()
        return args, cls(Path(args.root), args.seq_len, args.batch_size, args.lr)

    @staticmethod
    def persuasion_perplexity(folder: Path) -> float:
        """Per-token perplexity of the held-out *Persuasion* (float32, batches of 8)."""
        model = load_model(folder, dtype=torch.float32, device="cpu")
        return perplexity(model, load_tokenizer(folder), heldout_text(), batch_size=8).token_perplexity
