"""Global vs rank-local parameter names under expert parallelism.

megatron-core names an expert's parameters by its index among the rank's local experts
(`...experts.local_experts.{i}...`). Checkpoints, initialisation and cross-EP comparisons use the
global expert index `ep_rank * num_local_experts + i`, so that one checkpoint loads at any EP size.
"""

from __future__ import annotations

import re

_LOCAL_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)(\.)")


def is_expert_param(name: str) -> bool:
    return _LOCAL_EXPERT.search(name) is not None


def to_global_name(name: str, ep_rank: int, num_local_experts: int) -> str:
    """`...local_experts.{i}...` -> `...local_experts.{ep_rank * num_local + i}...`."""
    return _LOCAL_EXPERT.sub(
        lambda m: f"{m[1]}{ep_rank * num_local_experts + int(m[2])}{m[3]}", name
    )


def to_local_name(global_name: str, ep_rank: int, num_local_experts: int) -> str | None:
    """Inverse of `to_global_name`; None when the expert lives on another EP rank."""
    m = _LOCAL_EXPERT.search(global_name)
    if m is None:
        return global_name
    expert = int(m[2])
    if expert // num_local_experts != ep_rank:
        return None
    return _LOCAL_EXPERT.sub(lambda m: f"{m[1]}{expert % num_local_experts}{m[3]}", global_name)
