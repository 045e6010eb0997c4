"""SALT (arXiv 2410.18779): a larger model trained with a small model's help, `--method salt`.

    effllm train --model-config big.json --tokenizer T --data D --out runs/salt \\
        --teacher runs/small --kd-weight 0.5 --kd-temperature 1.0 --kd-until-step 150 [--kd-select 0.5]

Two stages. For the first `--kd-until-step` optimizer steps the loss mixes next-token cross-entropy with
knowledge distillation from the frozen small model (the "teacher", though it is the weaker model):

    loss = (1 - w) * CE(student, labels) + w * tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))

summed over target tokens (the trainer divides by their count). The KL is the soft-label cross-entropy the
paper uses minus the teacher's entropy, a constant, so the gradients are the same and KL(p || p) = 0; tau^2
keeps the gradient's size independent of the temperature (Hinton et al.). From that step on the loss is
exactly `causal_lm_loss`, and the teacher is released.

`--kd-select F` (SALT_DS): the KD stage trains on a selection from the small model's scores instead of the
data in order. The paper keeps "challenging yet learnable" sequences by the small model's judgement; its
exact score is not given in the material we have, so EffLLM's rule is stated here and measured in
docs/training-methods.md: score every candidate sequence by the teacher's mean loss per target token, drop
the hardest `skip_hardest` fraction of candidates (default 0.1: text the small model cannot predict at all,
headings and tables, is not learnable from it), and keep the next-hardest F fraction. The candidates are
the first ceil(N / F) sequences of the run's shuffled order, N the sequences the KD stage consumes, so
exactly round(F * candidates) >= N are kept (taken in their shuffled order, repeated if the run needs
more); the plain stage then continues the order after the candidates. The selection is saved with each
checkpoint, so a resumed run does not score again.

The teacher must share the student's vocabulary (the same tokens at the same ids) and vocabulary size. Options
of the stage (`--method-options`): `skip_hardest` (0.1).
"""

from __future__ import annotations

import gc
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from effllm.core.errors import ConfigError
from effllm.train.loss import causal_lm_loss
from effllm.train.packing import IGNORE_INDEX


def kd_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(1 - w) CE + w tau^2 KL(teacher_tau || student_tau), summed over the positions with a label."""
    ce = F.cross_entropy(  # as causal_lm_loss computes it, so that w = 0 is that loss bit for bit
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if weight == 0:
        return ce
    keep = labels.flatten() != IGNORE_INDEX
    student = logits.flatten(0, 1)[keep].float()
    teacher = teacher_logits.flatten(0, 1)[keep].float()
    if teacher.shape[-1] != student.shape[-1]:
        raise ConfigError(
            f"the teacher has {teacher.shape[-1]} logits per token and the student {student.shape[-1]}; "
            "distil from a model with the same vocabulary"
        )
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    return (1 - weight) * ce + weight * temperature**2 * kl


def select_challenging(scores: np.ndarray, fraction: float, skip_hardest: float = 0.1) -> np.ndarray:
    """Positions (into `scores`) of the round(fraction * n) highest scores below the hardest `skip_hardest`.

    Returned in their original order. Ties are broken by position, so the result is deterministic."""
    n = len(scores)
    keep = round(fraction * n)
    skip = math.floor(skip_hardest * n)
    if keep + skip > n:
        raise ConfigError(
            f"--kd-select {fraction} with skip_hardest {skip_hardest} asks for more than every candidate; "
            "lower one of them"
        )
    ranked = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.sort(ranked[skip : skip + keep])


class SelectedData:
    """A run's data with the KD stage's sequences taken from a selection of the shuffled order.

    Data positions below `kd_sequences` read `selected[p % len(selected)]` of the order; later positions
    read the order after the `candidates` scored, so the plain stage sees fresh sequences first."""

    def __init__(self, data: Any, selected: np.ndarray, kd_sequences: int, candidates: int):
        self.data, self.selected = data, selected
        self.kd_sequences, self.candidates = kd_sequences, candidates

    def position(self, p: int) -> int:
        if p < self.kd_sequences:
            return int(self.selected[p % len(self.selected)])
        return self.candidates + p - self.kd_sequences

    def micro_batch(self, first: int, size: int) -> dict[str, torch.Tensor]:
        order = self.data.order
        return self.data.train.batch([order[self.position(first + j)] for j in range(size)])

    def __getattr__(self, name: str) -> Any:  # held-out data and the rest: the run's own
        return getattr(self.data, name)


class SALTTraining:
    """The callback: KD loss until `--kd-until-step`, then plain cross-entropy; optional selection."""

    def __init__(self, trainer: Any, skip_hardest: float = 0.1):
        from effllm.models.checkpoint import load_config, load_model
        from effllm.models.hub import resolve_model_path
        from effllm.models.tokenizer import load_tokenizer
        from effllm.train.distributed import unwrap

        cfg = trainer.config
        if not 0 <= skip_hardest < 1:
            raise ConfigError(f"skip_hardest must be in [0, 1), got {skip_hardest}")
        folder = resolve_model_path(cfg.teacher)
        teacher_config = load_config(folder)
        student_vocab = unwrap(trainer.model).config.vocab_size
        if teacher_config.vocab_size != student_vocab:
            raise ConfigError(
                f"--teacher {cfg.teacher} has vocab_size {teacher_config.vocab_size}, the student "
                f"{student_vocab}; distil from a model trained with the same tokenizer"
            )
        vocab = load_tokenizer(folder).backend.get_vocab(with_added_tokens=True)
        if vocab != trainer.tokenizer.backend.get_vocab(with_added_tokens=True):
            raise ConfigError(
                f"--teacher {cfg.teacher} has another vocabulary than the run's tokenizer "
                f"({trainer.tokenizer_folder}); distil from a model trained with the same tokenizer"
            )
        self.trainer = trainer
        self.weight, self.temperature = cfg.kd_weight, cfg.kd_temperature
        self.until = cfg.kd_until_step
        self.fraction, self.skip_hardest = cfg.kd_select, skip_hardest
        self.step = 0
        self.teacher: nn.Module | None = load_model(folder, dtype=torch.float32, device=trainer.env.device)
        self.teacher.eval().requires_grad_(False)
        self.selected: np.ndarray | None = None
        self.global_batch = cfg.batch_size * cfg.grad_accum * trainer.env.world_size
        self.kd_sequences = self.until * self.global_batch
        self.candidates = math.ceil(self.kd_sequences / self.fraction) if self.fraction else 0
        trainer.loss_fn = self.loss

    # ------------------------------------------------------------------ the two stages
    def on_step_begin(self, step: int) -> None:
        self.step = step
        if step < self.until and self.fraction and self.selected is None:
            self._select()
        if step >= self.until and self.teacher is not None:
            self.teacher = None  # the plain stage needs no teacher: give its memory back
            gc.collect()
            self.trainer._print(
                f"SALT: knowledge distillation ended at step {step}; plain training from here"
            )

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.step >= self.until or self.teacher is None:
            return causal_lm_loss(model, batch)
        with torch.no_grad():
            teacher_logits = self.teacher(batch["input_ids"])
        return kd_loss(
            model(batch["input_ids"]), teacher_logits, batch["labels"], self.weight, self.temperature
        )

    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        metrics["kd"] = int(step <= self.until)

    # ------------------------------------------------------------------ SALT_DS
    @torch.no_grad()
    def scores(self, positions: range) -> np.ndarray:
        """The teacher's mean loss per target token of the sequences at these positions of the order."""
        from effllm.eval.progress import progress_bar

        trainer, cfg = self.trainer, self.trainer.config
        data, env = trainer.data, trainer.env
        data = getattr(data, "data", data)  # the unselected order
        out = np.zeros(len(positions))
        with progress_bar(len(positions), "SALT_DS: scoring with the teacher", env.is_main) as bar:
            for start in range(0, len(positions), cfg.batch_size):
                chunk = positions[start : start + cfg.batch_size]
                batch = data.micro_batch(chunk[0], len(chunk))
                ids, labels = batch["input_ids"].to(env.device), batch["labels"].to(env.device)
                with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                    logits = self.teacher(ids)
                nll = F.cross_entropy(
                    logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
                )
                counts = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
                out[start : start + len(chunk)] = (nll.sum(1) / counts).double().cpu().numpy()
                bar.update(len(chunk))
        return out

    def _select(self) -> None:
        scores = self.scores(range(self.candidates))
        self.selected = select_challenging(scores, self.fraction, self.skip_hardest)
        self._install()
        self.trainer._print(
            f"SALT_DS: kept {len(self.selected)} of {self.candidates} sequences for the distillation stage "
            f"(teacher loss {scores[self.selected].min():.3f} to {scores[self.selected].max():.3f})"
        )

    def _install(self) -> None:
        data = self.trainer.data
        data = getattr(data, "data", data)
        self.trainer.data = SelectedData(data, self.selected, self.kd_sequences, self.candidates)

    def state_dict(self) -> dict[str, Any]:
        return {"selected": None if self.selected is None else self.selected.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("selected") is not None:
            self.selected = np.asarray(state["selected"], dtype=np.int64)
            self._install()
