"""Global vs rank-local parameter names under expert parallelism.

megatron-core names an expert's parameters by its slot among the rank's local experts
(`...layers.{l}.mlp.experts.local_experts.{slot}...`). Checkpoints, initialisation and cross-EP
comparisons use the logical expert id that the layer's `Placement` puts in that slot (with
megatron-core's contiguous placement, `ep_rank * num_local + slot`), so that one checkpoint loads
at any EP size and under any placement.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

from epruntime.placement import Placement

_LOCAL_EXPERT = re.compile(r"(layers\.(\d+)\.mlp\.experts\.local_experts\.)(\d+)(\.)")


def is_expert_param(name: str) -> bool:
    return _LOCAL_EXPERT.search(name) is not None


def split_params(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(dense, expert) parameters of `model` that require grad."""
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (expert if is_expert_param(name) else dense).append(p)
    return dense, expert


def to_global_name(name: str, ep_rank: int,
                   placements: Sequence[Placement] | Mapping[int, Placement]) -> str:
    """`...layers.{l}...local_experts.{slot}...` -> `...local_experts.{logical expert}...`.
    `placements[l]` is decoder layer l's: a list when every layer is MoE, else a mapping of the
    MoE layers' indices (`MoEVLM.placement_of_layer`)."""
    def logical(m: re.Match) -> str:
        expert = placements[int(m[2])].expert_at(ep_rank, int(m[3]))
        return f"{m[1]}{expert}{m[4]}"
    return _LOCAL_EXPERT.sub(logical, name)


def to_local_name(global_name: str, ep_rank: int,
                  placements: Sequence[Placement] | Mapping[int, Placement]) -> str | None:
    """Inverse of `to_global_name`; None when no copy of the expert lives on this EP rank (a
    replicated placement holds at most one copy per rank)."""
    m = _LOCAL_EXPERT.search(global_name)
    if m is None:
        return global_name
    placement, expert = placements[int(m[2])], int(m[3])
    n = placement.num_local
    here = [p % n for p in placement.log2phy_EC[expert].tolist() if p >= 0 and p // n == ep_rank]
    if not here:
        return None
    return _LOCAL_EXPERT.sub(lambda m: f"{m[1]}{here[0]}{m[4]}", global_name)
