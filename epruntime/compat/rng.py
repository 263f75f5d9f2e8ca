"""megatron-core's named RNG states on the CPU generator. Importing this imports megatron-core."""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as mrandom


class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
    """megatron's named RNG states (data-parallel, model-parallel, expert-parallel) on the CPU
    generator: `fork(name)` swaps the named state in and out of torch's default CPU generator,
    with the same bookkeeping as megatron's CUDA tracker (`reset`, `get_states`, `set_states`
    are megatron-core's own)."""

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


def cpu_model_parallel_manual_seed(
    seed: int,
    te_rng_tracker: bool = False,
    inference_rng_tracker: bool = False,
    use_cudagraphable_rng: bool = False,
    tp_rank: int | None = None,
    ep_rank: int | None = None,
    etp_rank: int | None = None,
    force_reset_rng: bool = False,
) -> None:
    """CPU counterpart of megatron's `model_parallel_cuda_manual_seed` (same parameters): the
    same three named states with the same seed offsets, held by the CPU tracker that
    `epruntime.compat.enable()` installed. A rank given explicitly (0 included) wins over the one
    parallel_state reports. The TE, inference and CUDA-graph trackers do not exist on CPU; their
    switches are accepted and ignored."""
    from megatron.core import parallel_state as ps

    if tp_rank is None:
        tp_rank = ps.get_tensor_model_parallel_rank()
    if ep_rank is None:
        ep_rank = ps.get_expert_model_parallel_rank()
    if etp_rank is None:
        etp_rank = ps.get_expert_tensor_parallel_rank()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    if not isinstance(tracker, CpuRNGStatesTracker):
        raise RuntimeError("cpu_model_parallel_manual_seed needs the CPU RNG tracker: call "
                           "epruntime.compat.enable() first")
    tracker.reset()  # a fresh set of states every call, as force_reset_rng would give
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
