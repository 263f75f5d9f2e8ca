"""Adapters that let megatron-core run where it was not written to run (CPU + gloo)."""

from epruntime.compat.megatron_cpu import (
    MegatronVersionError,
    check_version,
    cpu_model_parallel_manual_seed,
    disable,
    enable,
    is_enabled,
)

__all__ = [
    "MegatronVersionError",
    "check_version",
    "cpu_model_parallel_manual_seed",
    "disable",
    "enable",
    "is_enabled",
]
