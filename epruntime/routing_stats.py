"""Which experts the tokens of each modality were routed to, and what that says.

A forward hook on every MoE layer's router (megatron-core's TopKRouter or SMoES's) counts routed
(token, expert) assignments by the token's input modality: joint counts [layers, 2, E]. From
them: the modality specialization index over bins (`msi`) and over experts (`msi_expert`), and
the load and balancedness (mean/max) of the bins. Bins are the router's SMoES bins when it has
them, else megatron-core's contiguous placement (expert e on EP rank e // (E / K)).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from epruntime.distributed import host_all_reduce
from epruntime.model.router_tap import moe_routers

from epruntime.smoes.metrics import balancedness, msi_from_joint


def _routers(model: nn.Module) -> list[nn.Module]:
    return moe_routers(model)


class RoutingRecorder:
    def __init__(self, model: nn.Module, num_bins: int):
        self.routers = _routers(model)
        self.num_bins = num_bins
        experts = self.routers[0].config.num_moe_experts
        self.joint_L2E = torch.zeros(len(self.routers), 2, experts, dtype=torch.float64)
        self.tap = model.router_tap
        self.tap.add("stats", self.record)

    def record(self, event) -> None:
        """One router call (epruntime.model.router_tap.RouterEvent)."""
        if event.modality_T is None:
            return
        routing_map_TE = event.routing_map_TE
        if self.joint_L2E.device != routing_map_TE.device:  # accumulate where routing runs
            self.joint_L2E = self.joint_L2E.to(routing_map_TE.device)
        onehot_T2 = nn.functional.one_hot(event.modality_T.to(routing_map_TE.device).long(),
                                          2).double()
        self.joint_L2E[event.layer] += onehot_T2.T @ routing_map_TE.double()

    def close(self) -> None:
        self.tap.remove("stats")

    def bins_of(self, layer: int) -> torch.Tensor:
        router = self.routers[layer]
        experts = self.joint_L2E.shape[-1]
        bins = getattr(router, "bin_of_expert", None)
        return bins.cpu() if bins is not None else torch.arange(experts) // (experts // self.num_bins)

    def summary(self, group=None) -> dict:
        """Metrics over everything recorded, summed over the ranks of `group` (all DP ranks)."""
        joint = self.joint_L2E.to("cpu", copy=True)  # host sync: report time
        if dist.is_initialized():
            host_all_reduce(joint, group=group)
        per_layer, bin_joint_total = [], torch.zeros(2, self.num_bins, dtype=torch.float64)
        expert_joint_total = joint.sum(0)
        for layer in range(joint.shape[0]):
            onehot_EK = nn.functional.one_hot(self.bins_of(layer).long(), self.num_bins).double()
            bin_joint = joint[layer] @ onehot_EK
            bin_joint_total += bin_joint
            load_K = bin_joint.sum(0)
            per_layer.append({"layer": layer + 1, "msi": msi_from_joint(bin_joint),
                              "msi_expert": msi_from_joint(joint[layer]),
                              "bin_load": load_K.tolist(),
                              "bin_balancedness": balancedness(load_K),
                              # [modality][expert] routed (token, expert) pairs, for the
                              # expert x modality heatmap of profiling/comm_report.py.
                              "expert_modality_counts": joint[layer].long().tolist()})
        return {"msi": msi_from_joint(bin_joint_total),
                "msi_expert": msi_from_joint(expert_joint_total),
                "bin_balancedness": sum(p["bin_balancedness"] for p in per_layer) / len(per_layer),
                "routing_per_layer": per_layer}
