"""Runs over several processes with ``torch.distributed`` (launched by ``torchrun``).

One process is the default and costs nothing: every collective here is a no-op then. Under
``torchrun --nproc-per-node N`` (gloo on CPU, NCCL on GPUs), ``init_from_env`` joins the
process group and ``current()`` describes this process's place in it.

The rules every technique follows:

- **Rows**: each rank takes one contiguous range of the rows (``Ranks.part``), never a
  strided or padded sampler, so a sum or a top-k over the parts equals the one over all rows
  and per-row results gathered in rank order are in row order.
- **Reductions**: ``all_reduce`` sums in rank order on every rank (gathered, then added
  0 + 1 + ... + N-1), so N ranks always give the same float bits, and integer counts equal
  one process's exactly. ``all_gather`` returns every rank's object, in rank order.
- **Output**: only rank 0 draws progress and writes files (``Ranks.is_main``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pyengine.errors import PyengineError

T = TypeVar("T")
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of a run: ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that shows progress and writes results."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process takes part."""
        return self.world > 1

    def part(self, start: int, stop: int, block: int = 1) -> tuple[int, int]:
        """This rank's contiguous share of rows ``start .. stop``, in whole blocks of ``block`` rows
        counted from ``start`` (the batches one process would run, so each batch holds the same
        rows however many processes run); every row belongs to exactly one rank, in rank order."""
        return part_of(start, stop, self.rank, self.world, block)

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (any picklable object; tensors come back on the CPU), in rank order."""
        if not self.active:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, _to_cpu(value))
        return gathered

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over ranks, added in rank order (the same bits on every rank and
        for every run with this many ranks), on ``tensor``'s device and dtype."""
        if not self.active:
            return tensor
        parts = self.all_gather(tensor.detach())
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total.to(tensor.device)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Per-row results of each rank's part concatenated in rank order: all rows, in row order."""
        if not self.active:
            return tensor
        return torch.cat(self.all_gather(tensor.detach())).to(tensor.device)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        box: list[Any] = [_to_cpu(value) if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` run by rank 0 only, its value (or its error) on every rank."""
        if not self.active:
            return compute()
        value: Any = None
        failure: BaseException | None = None
        if self.is_main:
            try:
                value = compute()
            except Exception as error:  # re-raised below, on every rank
                failure = error
        value, message = self.broadcast((value, None if failure is None else str(failure)))
        if failure is not None:
            raise failure
        if message is not None:
            raise PyengineError(f"rank 0 failed: {message}")
        return value

    def check_all(self, error: BaseException | None) -> None:
        """A barrier that fails on every rank if one failed: each rank's error (or None) is
        gathered; a rank that failed re-raises its own, the others raise naming the first."""
        if not self.active:
            if error is not None:
                raise error
            return
        messages = self.all_gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        for rank, message in enumerate(messages):
            if message is not None:
                raise PyengineError(f"rank {rank} of {self.world} failed: {message}")


def part_of(start: int, stop: int, rank: int, world: int, block: int = 1) -> tuple[int, int]:
    """Rows of ``start .. stop`` that rank ``rank`` of ``world`` takes: contiguous, in rank order,
    whole blocks of ``block`` rows (the first ``blocks % world`` ranks take one block more)."""
    blocks = -(-(stop - start) // block)
    count, extra = divmod(blocks, world)
    first = rank * count + min(rank, extra)
    last = first + count + (1 if rank < extra else 0)
    return start + first * block, min(stop, start + last * block)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def current() -> Ranks:
    """This process's ranks: from the initialised default process group, else one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Ranks(dist.get_rank(), dist.get_world_size(), local)


def launched() -> bool:
    """This process was started by ``torchrun`` (or another launcher setting its variables) with
    more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env() -> Ranks:
    """Join the process group ``torchrun`` describes in the environment, once (NCCL when each
    process of this machine has a GPU of its own, else gloo); one process when not launched by it."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise PyengineError("WORLD_SIZE > 1 but this torch has no torch.distributed; run one process")
    gpus = _gpu_per_process()
    if gpus:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if gpus else "gloo", timeout=TIMEOUT)
    return current()


def _gpu_per_process() -> bool:
    """This machine's processes of the run each have a GPU of their own (NCCL needs that)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return torch.cuda.is_available() and torch.cuda.device_count() >= local


def close() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def default_device(ranks: Ranks) -> torch.device | None:
    """``cuda:LOCAL_RANK`` for a rank of a multi-process run on a machine with a GPU for each of
    its processes, else None (the model's own device)."""
    if ranks.active and _gpu_per_process():
        return torch.device("cuda", ranks.local_rank)
    return None
