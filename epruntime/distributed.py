"""Process groups: gloo on CPU, NCCL on GPU, megatron-core parallel_state with EP x DP.

Start-up order matters: the config is validated before this module runs (no process group exists
for a bad config), then the default group comes up with the configured timeout, then every rank
proves it loaded the same config and code before megatron-core builds its groups.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from datetime import timedelta

import torch
import torch.distributed as dist

from epruntime import __version__, compat
from epruntime.config import (Config, ConfigError, check_backend_available, check_metrics_port,
                              check_world, ep_ranks_per_node)


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


_FAILURE_KEY = "epruntime/failed/"
# The job's c10d store, kept past destroy_process_group (the entry points shut the groups down
# before their error handler runs) so that failures can still be published and read.
_store = None
_world_size = 0


def publish_failure(line: str) -> None:
    """Best effort: leave this rank's error line in the rendezvous store, where the ranks that
    only see a lost connection look for it (`published_failure`). Never raises."""
    if _failure_context is None or _store is None:
        return
    try:
        _store.set(f"{_FAILURE_KEY}{_failure_context[0]}", line)
    except Exception:  # noqa: BLE001 - the store's host may be the rank that went away
        pass


def published_failure(exclude: int) -> tuple[int, str] | None:
    """(rank, line) of the first other rank that published a failure, waiting up to 2 s for one
    (a rank that failed publishes before it exits, but its peers may notice first); None when
    none did or the store is gone."""
    if _store is None:
        return None
    try:
        store = _store
        store.set_timeout(timedelta(seconds=2))
        keys = [f"{_FAILURE_KEY}{r}" for r in range(_world_size) if r != exclude]
        deadline = time.monotonic() + 2.0
        while True:
            for key in keys:
                if store.check([key]):
                    return int(key.rsplit("/", 1)[1]), store.get(key).decode(errors="replace")
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)
    except Exception:  # noqa: BLE001
        return None


_PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """Under torchrun: end this rank as soon as its agent (the parent) dies, so that no orphan
    keeps training and writing into the run directory. The kernel's parent-death signal does it
    at once (SIGKILL: no checkpoint can be half-written by a rank that should not exist; the
    step directories are atomic); a watchdog thread on getppid() covers kernels without prctl.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the agent died before the signal was armed
        os._exit(EXIT_LOST_LAUNCHER)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                print(f"epruntime: rank {os.environ.get('RANK', '?')}: the torchrun agent (pid "
                      f"{parent}) died; exiting", file=sys.stderr, flush=True)
                os._exit(EXIT_LOST_LAUNCHER)

    threading.Thread(target=watch, name="epruntime-launcher-watchdog", daemon=True).start()


EXIT_LOST_LAUNCHER = 3  # epruntime.cli.EXIT_COLLECTIVE: the job lost a part of itself


def check_router_groups(cfg: Config, ranks_per_node: int) -> None:
    """ConfigError unless every group of group-limited routing fits whole in one EP rank
    (device-limited) or one node (node-limited) of this launch's layout."""
    from epruntime.placement.groups import RouterGroupError, check_groups_fit

    m = cfg.model
    try:
        check_groups_fit(m.num_experts, m.moe_router_num_groups, cfg.parallel.ep_size,
                         ranks_per_node)
    except RouterGroupError as err:
        raise ConfigError(str(err)) from None


def init_distributed(cfg: Config) -> DistEnv:
    """Create the default process group and megatron-core's EP/DP groups for `cfg`."""
    die_with_launcher()
    _ensure_launcher_env()
    world_size = int(os.environ["WORLD_SIZE"])
    dp_size = check_world(cfg, world_size)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    per_node = ep_ranks_per_node(cfg, local_world_size)  # fail before any collective
    check_router_groups(cfg, per_node)
    check_metrics_port(cfg, local_world_size)
    check_backend_available(cfg)
    backend = pick_backend(cfg)
    # megatron-core's MoE options this install, backend and dispatcher can run (ConfigError)
    from epruntime.model.options import check_megatron_options

    check_megatron_options(cfg, backend)
    if backend == "nccl":
        compat.enable_host_independent()  # e.g. megatron-core without Transformer Engine
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
    global _store, _world_size
    _store = dist.distributed_c10d._get_default_store()  # torch-private: the group's own store
    _world_size = dist.get_world_size()
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


def collective_device(group=None) -> torch.device:
    """Where `group`'s collectives take tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def host_all_reduce(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small host-side tensor (counters, figures) in place over `group`, through the
    group's device (NCCL takes CUDA tensors only); returns `t`. A no-op for a group of one."""
    if dist.get_world_size(group) == 1:
        return t
    device = collective_device(group)
    if t.device == device:
        dist.all_reduce(t, op=op, group=group)
        return t
    on_device = t.to(device)
    dist.all_reduce(on_device, op=op, group=group)
    return t.copy_(on_device.to(t.device))  # host sync: figures for the host


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


# What a local rank imports before it runs anything: torch and megatron-core (which pulls in
# torch._inductor through its jit_fuser) cost a fresh process about 5 s on this CPU. A forkserver
# that has imported them once forks ranks that start with them loaded.
RANK_PRELOAD = ("torch", "torch.distributed", "megatron.core",
                "megatron.core.transformer.moe.moe_layer", "epruntime.engine")


def _local_rank_entry(rank: int, fn, world_size: int, port: int, threads: int,
                      environ: dict[str, str], args: tuple) -> None:
    # A forkserver's children inherit the server's environment, not the caller's: take the
    # caller's, as a spawned process would have it.
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    # OpenMP read OMP_NUM_THREADS when the forkserver loaded torch: set the pool's size here
    torch.set_num_threads(threads)
    try:
        fn(rank, *args)
    finally:
        shutdown()


def spawn_local(fn, world_size: int, *args, threads: int = 1,
                start_method: str = "forkserver") -> None:
    """Run `fn(rank, *args)` on `world_size` fresh local processes with torchrun's environment
    variables set, as tests and benchmarks do without a launcher. `fn` must be a module-level
    function (it is pickled by name); raises if any rank fails.

    start_method "forkserver" (default) forks the ranks from a server process that has imported
    RANK_PRELOAD once (started on the first call, kept for the caller's lifetime); "spawn" starts
    each rank from a bare interpreter. Either way a rank sees the caller's environment of now."""
    import multiprocessing

    import torch.multiprocessing as mp

    if start_method == "forkserver":
        multiprocessing.set_forkserver_preload(list(RANK_PRELOAD))  # no-op once it runs
    mp.start_processes(_local_rank_entry, args=(fn, world_size, free_port(), threads,
                                                dict(os.environ), args),
                       nprocs=world_size, join=True, start_method=start_method)
