"""All-to-all between the GPUs of one node through CUDA-IPC buffers (the GPU sibling of shm.py).

`CudaIpcTransport.all_to_all_single(out, x, recv_splits, send_splits)` has the semantics of
`torch.distributed.all_to_all_single(out, x, recv_splits, send_splits, group)` for CUDA tensors
(rows = dim 0, variable splits, any dtype and trailing shape, zero-row messages); bytes are
copied, never converted. As DeepEP's intranode NVLink buffers, each rank owns one device buffer
that every peer maps, and a sender writes its rows straight into the receiver's buffer.

Setup (collective over `group`, every rank on one node): each rank allocates its buffer
(`ep_ipc_alloc`: a flag header, then `capacity_mib` of receive space), exports its 64-byte
cudaIpcMemHandle, the handles are all-gathered over the process group and every rank opens
every peer's (`ep_ipc_open`); a barrier then guarantees all flags are zero and mapped.

Call n (every rank numbers its calls 1, 2, ... in the same order):
  1. the split matrix S[s][d] (rows s sends d) is all-gathered with each rank's row size and any
     local argument error, so every rank raises the same error (bad splits, a message that
     would overflow a receiver's buffer) before anything is written and nobody is left waiting;
  2. on torch's current stream, for each destination d (rotated from rank + 1): a kernel waits
     until d has consumed call n - 1, copies the rows to d's buffer at byte offset
     row_bytes * sum(S[s'][d] for s' < s), then a system-scope release sets ready[s] = n in d;
  3. a kernel waits for ready[s] >= n from every sender (trapping after `timeout_s`), the data
     is copied to `out` and consumed = n is published.
Steps 2-3 are stream-ordered: the host does not wait for the GPU. The gather of step 1 is a
host collective per call (the price of raising errors consistently on every rank).

`close()` synchronises, barriers (no peer still writes into this buffer), closes the peers'
handles and frees the buffer.
"""

from __future__ import annotations

import ctypes
import math
import socket

import torch
import torch.distributed as dist


class CudaIpcError(RuntimeError):
    """The CUDA-IPC all-to-all could not run; the message names the rank and why."""


class CudaIpcOverflowError(CudaIpcError):
    """A receiver's messages are larger than its buffer (capacity_mib)."""


def _kernels():
    from epruntime.kernels import cuda

    reason = cuda.unavailable_reason()
    if reason is not None:
        raise CudaIpcError(f"CUDA-IPC transport is unavailable: {reason}")
    return cuda


class CudaIpcTransport:
    """CUDA-IPC all-to-all over `group`, whose ranks must all be on this node (see the module
    docstring). `capacity_mib` is the receive space of each rank: the most one rank receives
    in one call. Collective: every rank of `group` constructs it, with its device current."""

    def __init__(self, group=None, capacity_mib: int = 64, timeout_s: float = 300.0):
        self._k = _kernels()
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.capacity = int(capacity_mib) * 2**20
        self.timeout_ms = int(timeout_s * 1000)
        self.calls = 0
        self.base: int | None = None
        self.peers: list[int | None] = [None] * self.size
        self._setup()

    def _gather(self, obj) -> list:
        everyone: list = [None] * self.size
        dist.all_gather_object(everyone, obj, group=self.group)
        return everyone

    def _setup(self) -> None:
        k = self._k
        lib = k.load_library()
        hosts = self._gather(socket.gethostname())
        if len(set(hosts)) != 1:
            raise CudaIpcError("CUDA-IPC transport needs every rank of the group on one node, "
                               f"got hosts {hosts}")
        handle = ctypes.create_string_buffer(lib.ep_ipc_handle_bytes())
        base = ctypes.c_void_p()
        error = None
        with torch.cuda.device(self.device):
            try:
                k.call("ep_ipc_alloc", self.size, self.capacity, ctypes.byref(base), handle)
                self.base = base.value
            except k.CudaKernelError as err:
                error = str(err)
            everyone = self._gather((handle.raw, error))
            bad = [(r, e) for r, (_, e) in enumerate(everyone) if e]
            if bad:
                self._free()
                raise CudaIpcError("CUDA-IPC setup failed: " + "; ".join(
                    f"rank {r}: {e}" for r, e in bad))
            try:
                for r, (peer_handle, _) in enumerate(everyone):
                    if r == self.rank:
                        self.peers[r] = self.base  # a process cannot open its own handle
                        continue
                    ptr = ctypes.c_void_p()
                    k.call("ep_ipc_open", peer_handle, ctypes.byref(ptr))
                    self.peers[r] = ptr.value
            except k.CudaKernelError as err:
                error = str(err)
        # Also the barrier after which every buffer is zeroed and mapped.
        bad = [(r, e) for r, e in enumerate(self._gather(error)) if e]
        if bad:
            self._free()
            raise CudaIpcError("CUDA-IPC setup failed: " + "; ".join(
                f"rank {r}: {e}" for r, e in bad))

    # ---- the all-to-all --------------------------------------------------------------------------
    def _local_error(self, out, x, recv_splits, send_splits) -> str | None:
        for name, t in (("x", x), ("out", out)):
            if not isinstance(t, torch.Tensor) or t.device != self.device or t.dim() == 0:
                return f"{name} must be a tensor with rows on {self.device}"
            if not t.is_contiguous():
                return f"{name} must be contiguous"
        if x.dtype != out.dtype or x.shape[1:] != out.shape[1:]:
            return (f"out {out.dtype} {list(out.shape)} does not match x {x.dtype} "
                    f"{list(x.shape)} beyond the first dim")
        for name, splits, t in (("send_splits", send_splits, x), ("recv_splits", recv_splits, out)):
            if len(splits) != self.size or any(s < 0 for s in splits):
                return f"{name} must be {self.size} non-negative ints, got {splits}"
            if sum(splits) != t.shape[0]:
                return f"{name} sum to {sum(splits)}, but the tensor has {t.shape[0]} rows"
        return None

    def all_to_all_single(self, out: torch.Tensor, x: torch.Tensor, recv_splits: list[int],
                          send_splits: list[int]) -> None:
        """torch.distributed.all_to_all_single(out, x, recv_splits, send_splits, group)."""
        if self.base is None:
            raise CudaIpcError("the CUDA-IPC transport is closed")
        recv_splits, send_splits = [int(s) for s in recv_splits], [int(s) for s in send_splits]
        error = self._local_error(out, x, recv_splits, send_splits)
        row_bytes = None if error else math.prod(x.shape[1:]) * x.element_size()
        everyone = self._gather((send_splits, recv_splits, row_bytes, error))
        self._check(everyone)
        self.calls += 1
        S, row = [e[0] for e in everyone], everyone[0][2]
        me, k, stream = self.rank, self._k, torch.cuda.current_stream(self.device).cuda_stream
        send_off = [0] * self.size
        for d in range(1, self.size):
            send_off[d] = send_off[d - 1] + send_splits[d - 1]
        with torch.cuda.device(self.device):
            for i in range(1, self.size + 1):
                d = (me + i) % self.size
                dst_off = sum(S[s][d] for s in range(me)) * row
                k.call("ep_ipc_send", x.data_ptr() + send_off[d] * row, send_splits[d] * row,
                       self.base, self.peers[d], self.size, dst_off, me, d, self.calls,
                       self.timeout_ms, stream)
            k.call("ep_ipc_wait", self.base, self.size, self.calls, self.timeout_ms, stream)
            k.call("ep_ipc_finish", self.base, self.size, out.data_ptr(), out.shape[0] * row,
                   self.calls, stream)

    def _check(self, everyone: list) -> None:
        """Raises the same error on every rank, from the gathered (send, recv, row_bytes, err)."""
        bad = [f"rank {r}: {e[3]}" for r, e in enumerate(everyone) if e[3]]
        if bad:
            raise CudaIpcError("CUDA-IPC all-to-all refused: " + "; ".join(bad))
        rows = {e[2] for e in everyone}
        if len(rows) > 1:
            raise CudaIpcError(f"ranks disagree on the row size in bytes: {sorted(rows)}")
        row = rows.pop()
        for d in range(self.size):
            col = [everyone[s][0][d] for s in range(self.size)]
            if col != everyone[d][1]:
                raise CudaIpcError(f"rank {d}'s recv_splits {everyone[d][1]} disagree with what "
                                   f"the ranks send it {col}")
            if sum(col) * row > self.capacity:
                raise CudaIpcOverflowError(
                    f"rank {d} would receive {sum(col) * row} bytes in one call, more than its "
                    f"CUDA-IPC buffer of {self.capacity} bytes: raise capacity_mib")

    alltoall = all_to_all_single

    # ---- teardown --------------------------------------------------------------------------------
    def _free(self) -> None:
        k = self._k
        with torch.cuda.device(self.device):
            for r, ptr in enumerate(self.peers):
                if ptr is not None and r != self.rank:
                    k.call("ep_ipc_close", ptr)
            self.peers = [None] * self.size
            if self.base is not None:
                k.call("ep_ipc_free", self.base)
                self.base = None

    def close(self) -> None:
        """Collective: waits for every rank's transfers, then unmaps the peers and frees."""
        if self.base is None:
            return
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self._free()


__all__ = ["CudaIpcError", "CudaIpcOverflowError", "CudaIpcTransport"]
