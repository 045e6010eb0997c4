"""Resumable checkpoints under OUT/checkpoints/step-NNNNNNNN, written atomically.

A checkpoint is the model in the Hugging Face layout (so `effllm generate --model` takes it as is), the
optimizer and scheduler state, each process's RNG and callback state (`rank-R.pt`) and
`trainer_state.json` (step, data position, the options that fix the data). Under FSDP the model and
optimizer state are also saved sharded, one file per process, through torch.distributed.checkpoint.

Everything is written into `.tmp-step-N` and renamed to `step-N` only when complete, so a process
killed at any moment (SIGKILL included, even mid-save) leaves the previous checkpoints intact; only
complete `step-N` folders are ever resumed from.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from effllm.core.errors import CheckpointError
from effllm.models.checkpoint import save_model
from effllm.models.transformer import CausalLM
from effllm.train.distributed import Distributed, is_fsdp, unwrap
from effllm.train.schedule import restore_scheduler

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SHARDED_DIR = "sharded"
# Seconds to sleep inside each save, after the weights and before the rest (crash tests kill it there).
PAUSE_ENV = "EFFLLM_TRAIN_SAVE_PAUSE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of the run in `out`, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = _STEP_DIR.match(folder.name)
        if match and (folder / STATE_FILE).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json; CheckpointError when it is unreadable or not a run's state."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / STATE_FILE} is unreadable ({e})") from None
    if not isinstance(state, dict) or not all(k in state for k in ("step", "samples_seen", "tokens_seen")):
        raise CheckpointError(
            f"{folder / STATE_FILE} is not a training state (no step, samples_seen, tokens_seen)"
        )
    return state


def resume_point(out: str | os.PathLike, log) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint whose trainer state reads back, and that state; a newer one that does not is
    skipped with a message through `log` (the atomic saves leave every older checkpoint whole)."""
    for _, folder in reversed(list_checkpoints(out)):
        try:
            return folder, read_trainer_state(folder)
        except CheckpointError as e:
            log(f"{e}; skipping it and resuming from the newest checkpoint before it")
    return None


def remove_partial_checkpoints(out: str | os.PathLike) -> None:
    """Delete what saves that never finished left behind."""
    root = Path(out) / CHECKPOINTS
    if root.is_dir():
        for folder in root.iterdir():
            if folder.name.startswith("."):
                shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(
    out: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    env: Distributed,
    tokenizer: Any = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` (every process calls this), then keep only the newest `keep_last`."""
    root = Path(out) / CHECKPOINTS
    final, staging = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if env.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    env.barrier()
    save_full_model(model, staging, env, tokenizer)
    _pause_for_crash_tests()
    if is_fsdp(model):
        _save_sharded(model, optimizer, staging / SHARDED_DIR)
    elif env.is_main:
        _save_torch({"optimizer": optimizer.state_dict()}, staging / OPTIMIZER_FILE)
    _save_torch(
        {**rank_state, "rng": rng_state(), "scheduler": scheduler.state_dict()},
        staging / f"rank-{env.rank}.pt",
    )
    env.barrier()
    if env.is_main:
        _write_json(staging / STATE_FILE, trainer_state)
        _publish(staging, final)
        _prune(out, keep_last)
    env.barrier()
    return final


def save_full_model(
    model: nn.Module, folder: Path, env: Distributed, tokenizer: Any = None, dtype: torch.dtype | None = None
) -> None:
    """The whole model in the Hugging Face layout, written by rank 0 (FSDP shards are gathered first);
    in `dtype` when given (a copy: the training model keeps its float32 weights)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.is_main:
            host = _host_model(model.config, full)
            save_model(host if dtype is None else host.to(dtype), folder, tokenizer=tokenizer)
    elif env.is_main:
        plain = unwrap(model)
        if dtype is not None and plain.dtype != dtype:
            plain = copy.deepcopy(plain).to(dtype)
        save_model(plain, folder, tokenizer=tokenizer)


def load_training_state(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, env: Distributed
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore optimizer, scheduler and RNG (and the sharded model under FSDP) from checkpoint `folder`.

    Returns (trainer_state, this rank's state). The weights of a non-FSDP run are loaded by building the
    model from `folder` itself, which is a model checkpoint.
    """
    trainer_state = read_trainer_state(folder)
    if is_fsdp(model):
        if not (folder / SHARDED_DIR).is_dir():
            raise CheckpointError(f"{folder} was not saved by an FSDP run; resume it with --parallel ddp")
        _load_sharded(model, optimizer, folder / SHARDED_DIR)
    else:
        if (folder / SHARDED_DIR).is_dir():
            raise CheckpointError(f"{folder} was saved by an FSDP run; resume it with --parallel fsdp")
        if not (folder / OPTIMIZER_FILE).is_file():
            raise CheckpointError(
                f"{folder} lacks {OPTIMIZER_FILE} (the optimizer's state), so the run cannot continue exactly; "
                "delete this checkpoint to resume from an earlier one"
            )
        optimizer.load_state_dict(_load_torch(folder / OPTIMIZER_FILE)["optimizer"])
    rank_file = folder / f"rank-{env.rank}.pt"
    rank_state = _load_torch(rank_file if rank_file.is_file() else folder / "rank-0.pt")
    restore_scheduler(scheduler, rank_state.pop("scheduler"))
    set_rng_state(rank_state.pop("rng"))
    return trainer_state, rank_state


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _host_model(config: Any, state: dict[str, torch.Tensor]) -> CausalLM:
    """A CPU CausalLM around gathered tensors, for `save_model` (no copy: the tensors are assigned)."""
    with torch.device("meta"):
        model = CausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model


def _save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def _load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _publish(staging: Path, final: Path) -> None:
    """Make `staging` the checkpoint `final` with one rename (an older `final` is moved aside first)."""
    for path in staging.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    if final.exists():
        os.replace(final, final.with_name(f".trash-{final.name}"))
    os.replace(staging, final)
    _fsync_dir(final.parent)
    shutil.rmtree(final.with_name(f".trash-{final.name}"), ignore_errors=True)


def _prune(out: str | os.PathLike, keep_last: int) -> None:
    for _, folder in list_checkpoints(out)[:-keep_last]:
        trash = folder.with_name(f".trash-{folder.name}")
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _pause_for_crash_tests() -> None:
    seconds = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _load_torch(path: Path) -> Any:
    # Our own files in the run folder; they hold numpy RNG state, which weights_only refuses.
    return torch.load(path, map_location="cpu", weights_only=False)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
