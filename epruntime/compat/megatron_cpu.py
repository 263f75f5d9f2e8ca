"""megatron-core 0.16.x on CPU processes over gloo.

megatron-core assumes a CUDA device in a handful of places on the MoE path. Each adaptation
below replaces exactly one of those assumptions with its CPU meaning; nothing else changes, and
none of it is applied when CUDA is available (the GPU path runs megatron-core untouched).

| megatron-core assumption                                   | CPU meaning                      |
|------------------------------------------------------------|----------------------------------|
| `torch.cuda.current_device()` as the allocation device     | `torch.device("cpu")`            |
|   (Router.gating moves weights there, tensor_parallel       |                                  |
|   mappings and all-to-all allocate outputs there, experts)  |                                  |
| `torch.cuda.Stream()` in MoEAlltoAllTokenDispatcher init    | no side stream                   |
| DtoH copies of the a2a splits on that stream, where         | splits become Python lists /     |
|   `maybe_move_tensor_to_cpu` only converts CUDA tensors     |   numpy like after a DtoH copy   |
| `te_general_gemm` referenced although TE failed to import  | `None` (megatron's torch.mm path)|
| CUDA RNG tracker (`fork()` in attention, expert init) and   | the same named states on the CPU |
|   `model_parallel_cuda_manual_seed`                         |   generator                      |
| aux-loss tracker allocating on `device="cuda"`             | allocated on the CPU             |
| `get_default_causal_mask` building its mask on "cuda"       | built on the CPU (same cache)    |
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from importlib import metadata
from typing import Any

import torch

SUPPORTED_VERSIONS = ("0.16.",)


class MegatronVersionError(RuntimeError):
    """The installed megatron-core is not one this adapter was written and tested for."""


def megatron_version() -> str:
    return metadata.version("megatron-core")


def check_version() -> str:
    version = megatron_version()
    if not version.startswith(SUPPORTED_VERSIONS):
        raise MegatronVersionError(
            f"epruntime's CPU adapter supports megatron-core {', '.join(v + 'x' for v in SUPPORTED_VERSIONS)}"
            f"; found megatron-core {version}. Install megatron-core==0.16.1 or run on a CUDA host."
        )
    return version


class _NoStream:
    """Stands in for the class-level DtoH stream so that the dispatcher's __init__ creates none."""


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _cpu_dtoh_and_synchronize(self, point: str, tokens_per_expert: torch.Tensor | None = None):
    """CPU version of MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize.

    On CUDA the splits are copied to the host on a side stream at `cuda_dtoh_point` and the copy
    is awaited at `cuda_sync_point`. On CPU the tensors are already on the host; what must still
    happen at the same point is the conversion megatron-core expects after its copy: splits as
    numpy arrays (all_to_all_single takes them as lists of ints), counts as CPU tensors.
    """
    if self.drop_and_pad or point != self.cuda_dtoh_point:
        return tokens_per_expert

    def as_host(t: Any, as_numpy: bool = False) -> Any:
        if torch.is_tensor(t) and as_numpy:
            return t.numpy()
        return t

    self.input_splits = as_host(self.input_splits, as_numpy=True)
    self.output_splits = as_host(self.output_splits, as_numpy=True)
    self.output_splits_tp = as_host(self.output_splits_tp, as_numpy=True)
    return tokens_per_expert


@functools.lru_cache
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """True above the diagonal: the positions a query may not attend to."""
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _make_cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's named RNG states (data-parallel, model-parallel, expert-parallel) on the
        CPU generator: `fork(name)` swaps the named state in and out of torch's default CPU
        generator, with the same bookkeeping as megatron's CUDA tracker."""

        def __init__(self, *args, **kwargs):
            kwargs.pop("use_cudagraphable_rng", None)
            super().__init__(use_cudagraphable_rng=False, **kwargs)

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def cpu_model_parallel_manual_seed(seed: int, *args, **kwargs) -> None:
    """CPU counterpart of megatron's `model_parallel_cuda_manual_seed`: the same three named
    states with the same seed offsets, held by the CPU tracker."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    tp_rank = kwargs.get("tp_rank") or ps.get_tensor_model_parallel_rank()
    ep_rank = kwargs.get("ep_rank") or ps.get_expert_model_parallel_rank()
    etp_rank = kwargs.get("etp_rank") or ps.get_expert_tensor_parallel_rank()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


_ENABLED = False
_ORIGINALS: dict[tuple[Any, str], Any] = {}


def _patch(owner: Any, name: str, value: Any) -> None:
    _ORIGINALS.setdefault((owner, name), getattr(owner, name, None))
    setattr(owner, name, value)


def is_enabled() -> bool:
    return _ENABLED


def enable(force: bool = False) -> bool:
    """Adapt megatron-core to CPU + gloo. Returns True when the adaptation is active.

    A no-op on hosts with CUDA (unless `force`, used by tests that want the CPU path on a GPU
    host); idempotent; raises MegatronVersionError on a megatron-core it was not written for.
    """
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    check_version()

    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as transformer_utils
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    _patch(torch.cuda, "current_device", _cpu_current_device)
    _patch(transformer_utils, "get_default_causal_mask", _cpu_default_causal_mask)
    _patch(fused_softmax, "get_default_causal_mask", _cpu_default_causal_mask)

    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
    _patch(dispatcher, "cuda_dtoh_stream", _NoStream())
    _patch(dispatcher, "_maybe_dtoh_and_synchronize", _cpu_dtoh_and_synchronize)

    if not hasattr(moe_utils, "te_general_gemm"):
        _patch(moe_utils, "te_general_gemm", None)

    tracker_cls = _make_cpu_rng_tracker_class()
    _patch(mrandom, "_CUDA_RNG_STATE_TRACKER", tracker_cls())
    _patch(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    _patch(mrandom, "model_parallel_cuda_manual_seed", cpu_model_parallel_manual_seed)

    _patch_aux_loss_tracker(moe_utils)
    _ENABLED = True
    return True


def _patch_aux_loss_tracker(moe_utils: Any) -> None:
    """`track_moe_metrics(force_initialize=True)` allocates its per-layer buffers with
    device="cuda"; pre-create them on the CPU through the same tracker dict instead."""
    original = moe_utils.track_moe_metrics
    signature = inspect.signature(original)

    def track_moe_metrics(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        if bound.get("force_initialize"):
            tracker = moe_utils.get_moe_layer_wise_logging_tracker()
            num_layers = bound.get("num_layers")
            for key in bound.get("track_names") or []:
                if key not in tracker:
                    tracker[key] = {
                        "values": torch.zeros(num_layers),
                        "reduce_group": None,
                        "avg_group": None,
                        "reduce_group_has_dp": False,
                    }
        return original(*args, **kwargs)

    _patch(moe_utils, "track_moe_metrics", track_moe_metrics)


def disable() -> None:
    """Undo every patch (tests use it to show what breaks without the adapter)."""
    global _ENABLED
    for (owner, name), value in reversed(list(_ORIGINALS.items())):
        setattr(owner, name, value)
    _ORIGINALS.clear()
    _ENABLED = False
