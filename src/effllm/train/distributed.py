"""torchrun support: the process group, DDP or FSDP2 wrapping, and the collectives the loop needs.

Run by torchrun, a process reads RANK, LOCAL_RANK and WORLD_SIZE from the environment and joins the
group (NCCL on GPUs, gloo on CPUs); run alone, every helper here is a no-op, so one code path serves both.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from effllm.core.dtypes import parse_device
from effllm.core.errors import ConfigError


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over processes (in place; returned for chaining)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def first_error(self, message: str | None) -> str | None:
        """Every process passes its error (or None); all get the first one, so all can stop together."""
        if not self.enabled:
            return message
        messages: list[str | None] = [None] * self.world_size
        dist.all_gather_object(messages, message)
        return next((m for m in messages if m is not None), None)


def init_distributed(device: str | None = None) -> Distributed:
    """Join the torchrun process group when there is one; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = parse_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(
    model: nn.Module, parallel: str, env: Distributed, freezes_parameters: bool = False
) -> nn.Module:
    """DDP (a full replica per process) or FSDP2 (parameters, gradients and optimizer state sharded by layer).

    FSDP2 shards in place and returns the same module; DDP returns a wrapper whose `.module` is the model.
    `freezes_parameters`: some parameters will get no gradient in some steps (layer sampling).
    """
    if not env.enabled:
        return model
    if parallel == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # Buffers (rotary frequencies) are computed identically everywhere: no broadcast each forward
        # (torch 2.13 renamed the switch).
        no_sync = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        buffers = {"forward_sync_buffers" if no_sync else "broadcast_buffers": False}
        return DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=freezes_parameters, **buffers
        )
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ConfigError(f"--parallel must be ddp or fsdp, got {parallel!r}")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce gradients across processes only on the last micro-batch of an accumulated step."""
    if isinstance(model, DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(sync)
        yield
    else:
        yield
