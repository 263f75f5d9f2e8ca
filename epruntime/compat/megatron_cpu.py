"""megatron-core 0.16.x on CPU processes over gloo: switching the declared adapters on and off.

megatron-core assumes a CUDA device in a handful of places on the MoE path. Each adaptation is
declared in `epruntime.compat.adapters.ADAPTERS` (target, reason, versions; the listing is in
that module's docstring) and replaces exactly one of those assumptions with its CPU meaning;
nothing else changes. None of it is applied when CUDA is available (the GPU path runs
megatron-core untouched), and `torch` itself is never patched: `torch.cuda.current_device()`
keeps torch's int result (or its error on a CPU build).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from epruntime.compat import adapters as _adapters
from epruntime.compat.adapters import MegatronVersionError, megatron_version

SUPPORTED_VERSIONS = ("0.16.",)

__all__ = ["MegatronVersionError", "SUPPORTED_VERSIONS", "check_version",
           "cpu_model_parallel_manual_seed", "disable", "enable", "is_enabled",
           "megatron_version", "without_shortcuts"]


def check_version() -> str:
    version = megatron_version()
    if not version.startswith(SUPPORTED_VERSIONS):
        raise MegatronVersionError(
            f"epruntime's CPU adapter supports megatron-core {', '.join(v + 'x' for v in SUPPORTED_VERSIONS)}"
            f"; found megatron-core {version}. Install megatron-core==0.16.1 or run on a CUDA host."
        )
    return version


def cpu_model_parallel_manual_seed(seed: int, *args, **kwargs) -> None:
    """CPU counterpart of megatron's `model_parallel_cuda_manual_seed` (same parameters); see
    `epruntime.compat.rng.cpu_model_parallel_manual_seed`. Needs `enable()` first."""
    from epruntime.compat.rng import cpu_model_parallel_manual_seed as seed_cpu

    seed_cpu(seed, *args, **kwargs)


_ENABLED = False
_STOCK = False  # megatron-core's own alltoall dispatcher adapted too (enable(stock_dispatcher))
_MISSING = object()
# (owner, attribute) -> the raw value in owner's own namespace before enable(), or _MISSING
# where the attribute was not there (disable() deletes it again).
_ORIGINALS: dict[tuple[Any, str], Any] = {}


def _patch(owner: Any, name: str, value: Any) -> None:
    _ORIGINALS.setdefault((owner, name), vars(owner).get(name, _MISSING))
    setattr(owner, name, value)


def is_enabled() -> bool:
    return _ENABLED


def enable(force: bool = False, stock_dispatcher: bool = False) -> bool:
    """Adapt megatron-core to CPU + gloo. Returns True when the adaptation is active.

    A no-op on hosts with CUDA (unless `force`, used by tests that want the CPU path on a GPU
    host); idempotent. Raises MegatronVersionError, before changing anything, on a megatron-core
    it was not written for or when a declared adapter's target is missing or not as expected.

    `stock_dispatcher`: also adapt megatron-core's own `MoEAlltoAllTokenDispatcher` in place (its
    two `subclass` adapters, patched onto the base class), so that a model built from
    megatron-core's stock specs (`MoELayer` choosing its dispatcher from
    `moe_token_dispatcher_type="alltoall"`) runs on CPU. epruntime's own specs do not need it:
    they select the CPU-safe subclass. A later call with it adds those two patches.
    """
    global _ENABLED, _STOCK
    if _ENABLED and (_STOCK or not stock_dispatcher):
        return True
    if torch.cuda.is_available() and not force:
        return False
    version = check_version()
    applicable = _adapters.check(_adapters.ADAPTERS, version)
    try:
        for adapter in applicable:
            stock = stock_dispatcher and adapter.by == "subclass" and adapter.replacement is not None
            if not (adapter.patched() or stock) or (_ENABLED and not stock):
                continue
            owner, name = adapter.resolve()
            if adapter.only_if_missing and hasattr(owner, name):
                continue
            _patch(owner, name, adapter.replacement(getattr(owner, name, None)))
    except BaseException:
        disable()
        raise
    _ENABLED, _STOCK = True, _STOCK or stock_dispatcher
    return True


def enable_host_independent() -> None:
    """On any host (GPU ones included): the adapters that fix megatron-core bugs rather than CUDA
    assumptions (`everywhere=True`, e.g. te-gemm without Transformer Engine). Idempotent; a
    subset of what enable() applies on CPU hosts."""
    version = check_version()
    for adapter in _adapters.check(_adapters.ADAPTERS, version):
        if not (adapter.everywhere and adapter.patched()):
            continue
        owner, name = adapter.resolve()
        if adapter.only_if_missing and hasattr(owner, name):
            continue
        _patch(owner, name, adapter.replacement(getattr(owner, name, None)))


@contextlib.contextmanager
def without_shortcuts() -> Iterator[None]:
    """Within the block, the CPU shortcuts of the enabled adapters are off (epruntime.compat.
    cpu_ops.SHORTCUTS: collectives over one-rank groups are issued, the clip goes through
    megatron-core's local multi-tensor scale), as megatron-core would run them; results are
    the same. For timing what the shortcuts save (profiling/benchmarks/optimizer_step.py)."""
    from epruntime.compat.cpu_ops import SHORTCUTS

    if not _ENABLED:
        raise RuntimeError("without_shortcuts() needs the adapters enabled (compat.enable())")
    saved = []
    try:
        for adapter in _adapters.ADAPTERS:
            if adapter.name in SHORTCUTS:
                owner, name = adapter.resolve()
                patched = vars(owner)[name]
                saved.append((owner, name, patched))
                setattr(owner, name, SHORTCUTS[adapter.name](patched))
        yield
    finally:
        for owner, name, patched in reversed(saved):
            setattr(owner, name, patched)


def disable() -> None:
    """Undo every patch: restore what was there, delete what was added (tests use it to show
    what breaks without the adapter)."""
    global _ENABLED, _STOCK
    for (owner, name), value in reversed(list(_ORIGINALS.items())):
        if value is _MISSING:
            if name in vars(owner):
                delattr(owner, name)
        else:
            setattr(owner, name, value)
    _ORIGINALS.clear()
    _ENABLED = _STOCK = False
