"""Process groups: gloo on CPU, NCCL on GPU, megatron-core parallel_state with EP x DP.

Start-up order matters: the config is validated before this module runs (no process group exists
for a bad config), then the default group comes up with the configured timeout, then every rank
proves it loaded the same config and code before megatron-core builds its groups.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from datetime import timedelta

import torch
import torch.distributed as dist

from epruntime import __version__, compat
from epruntime.config import Config, check_world, ep_ranks_per_node


class ConfigMismatchError(RuntimeError):
    """Ranks started with different configs or code versions."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    ep_size: int
    ep_rank: int
    dp_size: int
    dp_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_launcher_env() -> None:
    """A plain `python -m epruntime.train` is a world of one; torchrun sets these itself."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def pick_backend(cfg: Config) -> str:
    if cfg.parallel.backend != "auto":
        return cfg.parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


@cache
def source_hash() -> str:
    """sha256 over the epruntime package's Python sources (relative path + bytes, sorted): two
    ranks with the same hash run the same code, whatever `__version__` says."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def check_agreement(cfg: Config) -> None:
    """All-gather (config fingerprint, epruntime version, source hash); any difference is an
    error on every rank that names the ranks that differ, instead of a hang in a mismatched
    collective."""
    mine = (cfg.fingerprint(), __version__, source_hash())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    odd = [r for r, theirs in enumerate(everyone) if theirs != everyone[0]]
    if odd:
        details = ", ".join(
            f"rank {r}: config {everyone[r][0][:12]} version {everyone[r][1]} "
            f"code {everyone[r][2][:12]}" for r in [0, *odd]
        )
        raise ConfigMismatchError(
            f"ranks disagree on the config, epruntime version or code ({details}); start every "
            "rank with the same --config and --set arguments and the same epruntime sources"
        )


# (rank, parallel.timeout_s) of this process once its process group exists, so the entry point
# can name them when a collective times out or loses a peer (epruntime.cli.run).
_failure_context: tuple[int, float] | None = None


def failure_context() -> tuple[int, float] | None:
    return _failure_context


def init_distributed(cfg: Config) -> DistEnv:
    """Create the default process group and megatron-core's EP/DP groups for `cfg`."""
    _ensure_launcher_env()
    world_size = int(os.environ["WORLD_SIZE"])
    dp_size = check_world(cfg, world_size)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    ep_ranks_per_node(cfg, local_world_size)  # fail before any collective when it cannot fit
    backend = pick_backend(cfg)
    if backend == "nccl":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        compat.enable()
        torch.set_num_threads(cfg.parallel.threads_per_rank)
        device = torch.device("cpu")

    timeout = timedelta(seconds=cfg.parallel.timeout_s)
    global _failure_context
    _failure_context = (int(os.environ["RANK"]), cfg.parallel.timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    check_agreement(cfg)

    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        expert_model_parallel_size=cfg.parallel.ep_size,
        # megatron-core takes minutes and builds timedelta(minutes=...): a float keeps seconds.
        distributed_timeout_minutes=cfg.parallel.timeout_s / 60,
        # Its extra gloo groups serve CPU-side collectives of NCCL jobs; on gloo they'd be twins.
        create_gloo_process_groups=backend != "gloo",
    )
    seed_all(cfg.train.seed)
    return DistEnv(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=int(os.environ["LOCAL_RANK"]),
        local_world_size=local_world_size,
        ep_size=cfg.parallel.ep_size,
        ep_rank=ps.get_expert_model_parallel_rank(),
        dp_size=dp_size,
        dp_rank=ps.get_data_parallel_rank(),
        backend=backend,
        device=device,
    )


def seed_all(seed: int) -> None:
    """Seed torch and megatron-core's named RNG states (data-, model-, expert-parallel)."""
    if compat.is_enabled():
        compat.cpu_model_parallel_manual_seed(seed)
    else:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    from epruntime.transport import close_all

    close_all()  # unmap shared-memory transports before their process group goes

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _local_rank_entry(rank: int, fn, world_size: int, port: int, threads: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    try:
        fn(rank, *args)
    finally:
        shutdown()


def spawn_local(fn, world_size: int, *args, threads: int = 1) -> None:
    """Run `fn(rank, *args)` on `world_size` fresh local processes with torchrun's environment
    variables set, as tests and benchmarks do without a launcher. `fn` must be a module-level
    function (spawn pickles it by name); raises if any rank fails."""
    import torch.multiprocessing as mp

    mp.spawn(_local_rank_entry, args=(fn, world_size, free_port(), threads, args),
             nprocs=world_size, join=True)
