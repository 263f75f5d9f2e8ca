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

from epruntime.placement.core import Placement
from epruntime.placement.strategies import traffic_aware_placement


class CoactivationRecorder:
    def __init__(self, model: nn.Module):
        routers = [layer.mlp.router for layer in model.gpt.decoder.layers]
        experts = routers[0].config.num_moe_experts
        self.counts_LEE = torch.zeros(len(routers), experts, experts, dtype=torch.float64)
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(routers)]

    def _hook(self, layer: int):
        def record(router, args, output) -> None:
            routing_TE = output[1].detach().to(torch.float64).cpu()
            self.counts_LEE[layer] += routing_TE.T @ routing_TE
        return record

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def counts(self, group=None) -> torch.Tensor:
        """[L, E, E] int64 summed over `group` (collective when given)."""
        counts = self.counts_LEE.clone()
        if group is not None and dist.get_world_size(group) > 1:
            host_all_reduce(counts, group=group)
        return counts.round().to(torch.int64)


def traffic_placements(counts_LEE: torch.Tensor, num_ranks: int, ranks_per_node: int,
                       max_imbalance: float = 1.1) -> list[Placement]:
    """One traffic-aware placement per layer from its co-activation counts."""
    return [traffic_aware_placement(c, num_ranks, ranks_per_node, max_imbalance=max_imbalance)
            for c in counts_LEE]
