"""How the dispatchers' row all-to-alls move bytes between ranks.

A transport has `all_to_all_single(out, x, recv_splits, send_splits)` with the semantics of
`torch.distributed.all_to_all_single` on the group it was built for, and `close()`.
`epruntime.dispatch.collective.use_transport(group, transport)` routes that group's row
exchanges through it; groups without one use the process group itself (dispatch.transport=pg).

- `shm.ShmTransport`: ranks on one host through POSIX shared memory, other nodes over the
  process group (dispatch.transport=shm on CPU ranks over gloo).
- `cuda_ipc.CudaIpcTransport`: GPUs of one node through CUDA IPC buffers (dispatch.transport=shm
  on NCCL ranks whose EP group fits in one node). Built and compiled here, run only on GPUs.
"""

from __future__ import annotations

from typing import Protocol


class Transport(Protocol):
    def all_to_all_single(self, out, x, recv_splits: list[int], send_splits: list[int]) -> None:
        ...

    def close(self) -> None:
        ...


def setup_transport(cfg, group, ranks_per_node: int) -> Transport | None:
    """Build and register the transport `cfg.dispatch.transport` asks for on `group` (collective
    over `group` for shm); pg registers nothing. Returns the transport, or None for pg."""
    from epruntime.dispatch.collective import use_transport

    if cfg.dispatch.transport == "pg":
        use_transport(group, None)
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
    use_transport(group, transport)
    return transport


__all__ = ["Transport", "setup_transport"]
