"""Many processes, one result: torch.distributed for evaluation and studies under torchrun.

One process per device (``torchrun --nproc-per-node N -m brecq ...``; gloo on the CPU, NCCL on
GPUs). Work that splits (scoring examples, quantizing blocks) is shared out; work that must not
run twice or must run alone (timing, writing shared files) runs on rank 0 while the others wait.
Every rank ends with the same results. A rank that raises makes every rank raise, naming it, at
the next point where the ranks meet; nothing is written after a failure.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

log = logging.getLogger("brecq")
T = TypeVar("T")

# How long a rank waits for the others at a meeting point (rank 0 may be quantizing a large model
# meanwhile); BRECQ_DIST_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 6 * 3600


class RankFailed(RuntimeError):
    """Another rank (or this one) raised; every rank stops with this error."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's rank and the number of processes (0 and 1 outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return World()


def init_from_environment(device: str = "cpu") -> World:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, ... in the
    environment), if any: gloo for the CPU, NCCL for CUDA, each rank on GPU ``LOCAL_RANK``.
    Does nothing for a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return world()
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = _dt.timedelta(seconds=float(os.environ.get("BRECQ_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    torch.distributed.init_process_group(backend, timeout=timeout)
    w = world()
    log.info("rank %d of %d (%s)", w.rank, w.size, backend)
    return w


def shutdown(wait: bool = True) -> None:
    """Leave the process group, if any. With ``wait`` every rank meets first: a rank that tears its
    gloo connections down while another is still tearing down its own can make that one abort
    ("terminate called without an active exception"; 3 of 31 two-rank streamed quantizations here
    without the barrier, 0 of 30 with it). Pass ``wait=False`` where a rank may be leaving alone
    (an error only it saw), which a barrier would hold until the timeout."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if wait:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def rank_device(device: str) -> str:
    """The device this rank uses: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` under torchrun."""
    if str(device) == "cuda" and world().distributed:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return str(device)


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    w = world()
    if not w.distributed:
        return [obj]
    gathered: list = [None] * w.size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not world().distributed:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def agree(error: BaseException | None, what: str) -> None:
    """A meeting point: raise on every rank if any rank brings an error (its own exception is
    chained on the rank that raised it)."""
    w = world()
    if not w.distributed:
        if error is not None:
            raise error
        return
    failures = [(rank, message) for rank, message in enumerate(all_gather(
        None if error is None else f"{type(error).__name__}: {error}")) if message is not None]
    if failures:
        rank, message = failures[0]
        raise RankFailed(f"{what}: rank {rank} of {w.size} failed ({message}); every rank stops, nothing "
                         "was written after the failure") from error


def on_main(fn: Callable[[], T], what: str) -> T:
    """``fn()`` on rank 0 alone while the others wait; its result (or failure) on every rank."""
    w = world()
    if not w.distributed:
        return fn()
    result, error = None, None
    if w.is_main:
        try:
            result = fn()
        except Exception as exc:  # handed to every rank by agree
            error = exc
    agree(error, what)
    return broadcast(result)
