"""Adapters that let megatron-core run where it was not written to run (CPU + gloo).

The adaptations are declared in `epruntime.compat.adapters`; `enable()` checks and applies
them. `CpuAlltoAllTokenDispatcher` (epruntime.compat.dispatcher) is the CPU-safe base for
alltoall dispatcher subclasses selected by spec; importing it imports megatron-core, so it is
loaded on first use.
"""

from epruntime.compat.adapters import ADAPTERS, Adapter, render_table
from epruntime.compat.megatron_cpu import (
    MegatronVersionError,
    check_version,
    cpu_model_parallel_manual_seed,
    disable,
    enable,
    enable_host_independent,
    is_enabled,
    without_shortcuts,
)

__all__ = [
    "ADAPTERS",
    "Adapter",
    "CpuAlltoAllTokenDispatcher",
    "MegatronVersionError",
    "check_version",
    "cpu_model_parallel_manual_seed",
    "disable",
    "enable",
    "enable_host_independent",
    "is_enabled",
    "render_table",
    "without_shortcuts",
]


def __getattr__(name: str):
    if name == "CpuAlltoAllTokenDispatcher":
        from epruntime.compat.dispatcher import CpuAlltoAllTokenDispatcher

        return CpuAlltoAllTokenDispatcher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
