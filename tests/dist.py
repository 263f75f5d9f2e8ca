"""Run a function on N real ranks (torch.multiprocessing + gloo) from a test."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from epruntime import distributed
    from epruntime.cli import quiet_known_warnings

    quiet_known_warnings()
    try:
        fn(rank, *args)
    finally:
        distributed.shutdown()


def spawn(fn, world_size: int, *args) -> None:
    """Run `fn(rank, *args)` on `world_size` processes; raises if any rank fails."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)
