"""The process group of a ``torchrun`` (or ``accelerate launch``) run: who this process is, its GPU
(``cuda:LOCAL_RANK`` becomes the current device), and the few collective moments of a sharded run (barriers:
after every process has looked at the output directory, and before rank 0 merges the manifest and draws the grid).

Sampling itself needs no traffic: every process takes the work items whose global index ≡ rank (mod world size).
A plain ``python scripts/…`` run is rank 0 of a world of 1 and starts no process group.
"""

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from ldm.util import InputError

logger = logging.getLogger(__name__)

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by torchrun and by accelerate launch


@dataclass(frozen=True)
class Process:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def takes(self, index: int) -> bool:
        """Whether the work item with this global index is this process's."""
        return index % self.world_size == self.rank

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def process_from_environment() -> Process:
    if not launched():
        return Process()
    try:
        rank, world_size, local_rank = (int(os.environ[name]) for name in LAUNCH_VARIABLES)
    except ValueError:
        raise InputError("RANK, WORLD_SIZE and LOCAL_RANK must be integers: " + ", ".join(
            f"{name}={os.environ[name]!r}" for name in LAUNCH_VARIABLES)) from None
    if not (world_size >= 1 and 0 <= rank < world_size and local_rank >= 0):
        raise InputError(f"RANK={rank} is not a rank of WORLD_SIZE={world_size}")
    return Process(rank, world_size, local_rank)


@contextlib.contextmanager
def process_group(timeout_minutes: float = 24 * 60.0) -> Iterator[Process]:
    """This process, inside an initialised process group when a launcher started several (NCCL where there are
    GPUs, gloo on CPUs), destroyed again on the way out, also after an error."""
    process = process_from_environment()
    if process.world_size == 1 or dist.is_initialized():
        yield process
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(process.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    logger.debug("rank %d of %d (%s)", process.rank, process.world_size, backend)
    try:
        yield process
    finally:
        dist.destroy_process_group()
