"""Several processes on one calibration set: ``torchrun --nproc-per-node N -m moemerge reduce ...``.

Each rank runs a contiguous block of the calibration sequences. Statistics are summed per sequence and the
per-sequence sums of all ranks are added in sequence order on every rank, which is the order a single process
adds them in: groups and output are bit-identical to a one-process run. Only rank 0 writes files.
Without torchrun (no ``WORLD_SIZE`` above 1 in the environment) every function is the one-process identity.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from moemerge.errors import MoemergeError

T = TypeVar("T")


def init_from_environment(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); nothing without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """Whether this process writes output (rank 0)."""
    return rank_and_world()[0] == 0


def my_share(count: int) -> range:
    """The contiguous block of ``range(count)`` this rank works on."""
    rank, world = rank_and_world()
    per = math.ceil(count / world)
    return range(min(count, rank * per), min(count, (rank + 1) * per))


def gather_in_order(items: list) -> list:
    """Every rank's ``items`` concatenated in rank order (so in sequence order, see :func:`my_share`)."""
    _, world = rank_and_world()
    if world == 1:
        return items
    parts = [None] * world
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def on_writer(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 alone, its result (or its MoemergeError) given to every rank."""
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    box: list = [(None, None)]
    if rank == 0:
        try:
            box = [(fn(), None)]
        except MoemergeError as err:
            box = [(None, str(err))]
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise MoemergeError(error)
    return result


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()
