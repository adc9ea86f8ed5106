"""torch.distributed, as sidetune uses it: one process per device under `torchrun`, gloo on
CPU and nccl on CUDA. A single process (no `torchrun`) is a world of size one and never
initialises a process group, so every caller can be written once for both cases."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes started by torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Under torchrun each process on a node takes the GPU of its local rank."""
        if device.type == "cuda" and self.size > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def all_gather(self, value: T) -> list[T]:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if self.size == 1:
            return [value]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def share(self, items: list[T]) -> list[T]:
        """This rank's contiguous, balanced share of `items` (sizes differ by at most one)."""
        base, extra = divmod(len(items), self.size)
        begin = self.rank * base + min(self.rank, extra)
        return items[begin:begin + base + (self.rank < extra)]


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), before any process group."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def current_world(device: torch.device | None = None) -> World:
    """The world this process runs in, read from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK); the default process group is initialised on first use, with nccl when
    `device` is CUDA and gloo otherwise."""
    size = launched_world_size()
    if size == 1:
        return World()
    world = World(launched_rank(), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return world
