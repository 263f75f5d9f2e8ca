"""How the dispatchers' row all-to-alls move bytes between ranks.

A transport has `all_to_all_single(out, x, recv_splits, send_splits)` with the semantics of
`torch.distributed.all_to_all_single` on the group it was built for, and `close()`. The Engine
builds one per `dispatch.transport` and hands it to its dispatchers (each engine its own, so
engines with different transports live side by side); without one the dispatchers use the
process group itself (dispatch.transport=pg).

- `shm.ShmTransport`: ranks on one host through POSIX shared memory, other nodes over the
  process group (dispatch.transport=shm on CPU ranks over gloo).
- `cuda_ipc.CudaIpcTransport`: GPUs of one node through CUDA IPC buffers (dispatch.transport=shm
  on NCCL ranks whose EP group fits in one node). Built and compiled here, run only on GPUs.
"""

from __future__ import annotations

import weakref
from typing import Protocol


class Transport(Protocol):
    def all_to_all_single(self, out, x, recv_splits: list[int], send_splits: list[int]) -> None:
        ...

    def close(self) -> None:
        ...


_live: weakref.WeakSet = weakref.WeakSet()  # transports to close at shutdown


def close_all() -> None:
    """Close every transport still open (local: no collective); distributed.shutdown calls it."""
    for transport in list(_live):
        transport.close()
    _live.clear()


def setup_transport(cfg, group, ranks_per_node: int) -> Transport | None:
    """Build the transport `cfg.dispatch.transport` asks for on `group` (collective over
    `group`); None for pg."""
    if cfg.dispatch.transport == "pg":
        return None
    import torch.distributed as dist

    from epruntime.config import ConfigError
    from epruntime.transport.shm import ShmTransport

    backend = dist.get_backend(group)
    if backend == "nccl":
        from epruntime.transport.cuda_ipc import CudaIpcTransport

        if ranks_per_node != dist.get_world_size(group):
            raise ConfigError(f"dispatch.transport=shm on GPUs is CUDA IPC inside one node; this "
                              f"EP group spans {dist.get_world_size(group) // ranks_per_node} "
                              "nodes: use dispatch.transport=pg")
        transport = CudaIpcTransport(group, cfg.dispatch.shm_mib, cfg.parallel.timeout_s)
    elif backend == "gloo":
        transport = ShmTransport(group, ranks_per_node, cfg.dispatch.shm_mib,
                                 cfg.parallel.timeout_s)
    else:
        raise ConfigError(f"dispatch.transport=shm supports gloo (shared memory) and nccl (CUDA "
                          f"IPC) groups; this group's backend is {backend}: use "
                          "dispatch.transport=pg")
    _live.add(transport)
    return transport


__all__ = ["Transport", "close_all", "setup_transport"]
