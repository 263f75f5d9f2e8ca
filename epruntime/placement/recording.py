"""Record which experts the same tokens pick together, for traffic-aware placement.

A forward hook on every MoE layer's router accumulates co-activation counts C[l] = M^T M of its
routing map M [T, E] (diagonal: tokens per expert). Summed over ranks, the counts are the same
everywhere, so every rank derives the same placement from them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from epruntime.distributed import host_all_reduce
from epruntime.model.router_tap import moe_routers
from epruntime.placement.core import Placement
from epruntime.placement.strategies import traffic_aware_placement


class CoactivationRecorder:
    def __init__(self, model: nn.Module):
        routers = moe_routers(model)
        experts = routers[0].config.num_moe_experts
        self.counts_LEE = torch.zeros(len(routers), experts, experts, dtype=torch.float64)
        self.tap = model.router_tap
        self.tap.add("recording", self.record)

    def record(self, event) -> None:
        """One router call (epruntime.model.router_tap.RouterEvent)."""
        routing_TE = event.routing_map_TE.to(torch.float64)
        if self.counts_LEE.device != routing_TE.device:  # accumulate where routing runs
            self.counts_LEE = self.counts_LEE.to(routing_TE.device)
        self.counts_LEE[event.layer] += routing_TE.T @ routing_TE

    def close(self) -> None:
        self.tap.remove("recording")

    def counts(self, group=None) -> torch.Tensor:
        """[L, E, E] int64 summed over `group` (collective when given)."""
        counts = self.counts_LEE.to("cpu", copy=True)  # host sync: report time
        if group is not None and dist.get_world_size(group) > 1:
            host_all_reduce(counts, group=group)
        return counts.round().to(torch.int64)


def traffic_placements(counts_LEE: torch.Tensor, num_ranks: int, ranks_per_node: int,
                       max_imbalance: float = 1.1, num_groups: int | None = None
                       ) -> list[Placement]:
    """One traffic-aware placement per layer from its co-activation counts (whole routing
    groups with group-limited routing, `num_groups` = model.moe_router_num_groups)."""
    return [traffic_aware_placement(c, num_ranks, ranks_per_node, max_imbalance=max_imbalance,
                                    num_groups=num_groups)
            for c in counts_LEE]
