"""A CPU-safe `MoEAlltoAllTokenDispatcher`, for dispatcher subclasses selected by spec.

On a CUDA host (compat not enabled) it *is* megatron-core's dispatcher: every method is
inherited and called unchanged. On CPU it differs in exactly the two places declared in
`epruntime.compat.adapters` (targets `MoEAlltoAllTokenDispatcher.cuda_dtoh_stream` and
`MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`):

- `__init__` creates no `torch.cuda.Stream()` (megatron-core creates one per process, on the
  base class, the first time a dispatcher is built; CPU builds of torch cannot);
- `_maybe_dtoh_and_synchronize` does, at megatron-core's `cuda_dtoh_point`, the conversion
  megatron-core expects after its device-to-host copy (splits as numpy arrays, which
  `all_to_all_single` takes as lists of ints) and no stream or event work.

Importing this module imports megatron-core.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher


class NoStream:
    """Stands in for megatron-core's class-level DtoH stream so that no CUDA stream is made."""

    def __repr__(self) -> str:
        return "NoStream()"


NO_STREAM = NoStream()


def cpu_mode() -> bool:
    """True where the CPU adaptations apply: compat is enabled, or there is no CUDA at all."""
    from epruntime.compat import megatron_cpu

    return megatron_cpu.is_enabled() or not torch.cuda.is_available()


def cpu_dtoh_and_synchronize(self, point: str, tokens_per_expert: torch.Tensor | None = None):
    """CPU counterpart of `MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`.

    On CUDA the splits are copied to the host on a side stream at `cuda_dtoh_point` and the copy
    is awaited at `cuda_sync_point`. On CPU the tensors are already on the host; what must still
    happen at the same point is the conversion megatron-core does after its copy
    (`maybe_move_tensor_to_cpu(..., as_numpy=True)`, a no-op for CPU tensors): splits as numpy
    arrays; counts stay CPU tensors.
    """
    if self.drop_and_pad or point != self.cuda_dtoh_point:
        return tokens_per_expert

    def as_numpy(t: Any) -> Any:
        return t.numpy() if torch.is_tensor(t) else t

    self.input_splits = as_numpy(self.input_splits)
    self.output_splits = as_numpy(self.output_splits)
    self.output_splits_tp = as_numpy(self.output_splits_tp)
    return tokens_per_expert


@contextlib.contextmanager
def no_dtoh_stream():
    """While megatron-core builds alltoall dispatchers on CPU, make its class-level DtoH stream
    look created, so that its `__init__` makes no `torch.cuda.Stream()`; a no-op off CPU.

    megatron-core tests and assigns `MoEAlltoAllTokenDispatcher.cuda_dtoh_stream` (the base class
    by name, not `type(self)`), so a subclass cannot shadow it; the value is restored on exit.
    `MoELayer.__init__` always builds megatron-core's own alltoall dispatcher (from
    `config.moe_token_dispatcher_type`) before a spec-selected one replaces it: wrap it in this.
    """
    base = MoEAlltoAllTokenDispatcher
    # Off CPU megatron-core makes its real stream; already set: a real stream or the patch.
    if not cpu_mode() or base.cuda_dtoh_stream is not None:
        yield
        return
    base.cuda_dtoh_stream = NO_STREAM
    try:
        yield
    finally:
        if base.cuda_dtoh_stream is NO_STREAM:
            base.cuda_dtoh_stream = None


@contextlib.contextmanager
def no_shared_expert_stream():
    """While megatron-core builds shared experts with `moe_shared_expert_overlap=true` on CPU, make
    `SharedExpertMLP.stream` (class level, tested by its `__init__`) look created, so that no
    `torch.cuda.Stream()` is made; a no-op off CPU. On CPU the dedup dispatchers run the shared
    experts on the main thread while their all-to-all is in flight (epruntime.dispatch.overlap)."""
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    if not cpu_mode() or SharedExpertMLP.stream is not None:
        yield
        return
    SharedExpertMLP.stream = NO_STREAM
    try:
        yield
    finally:
        if SharedExpertMLP.stream is NO_STREAM:
            SharedExpertMLP.stream = None


class CpuAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron-core's alltoall dispatcher; on CPU without the CUDA stream and DtoH copies."""

    def __init__(self, *args, **kwargs):
        self.cpu_adapted = cpu_mode()
        with no_dtoh_stream():
            super().__init__(*args, **kwargs)

    def _maybe_dtoh_and_synchronize(self, point: str, tokens_per_expert=None):
        if not self.cpu_adapted:
            return super()._maybe_dtoh_and_synchronize(point, tokens_per_expert)
        return cpu_dtoh_and_synchronize(self, point, tokens_per_expert)
