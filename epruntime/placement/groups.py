"""Group-limited routing and where experts live.

megatron-core's group-limited routing (`moe_router_num_groups` G, `moe_router_group_topk`;
DeepSeek-V2's device-limited and DeepSeek-V3's node-limited routing) views the router's scores
[T, E] as [T, G, E / G]: group g is the contiguous logical experts g * E/G ... (g + 1) * E/G - 1,
and a token picks its experts inside its `group_topk` best groups. The limit bounds
communication only while each group lives in one place:

- device-limited (each group fits in one EP rank's experts): every group on one rank, so a
  token reaches at most `group_topk` ranks;
- node-limited (a group is larger than a rank but fits in a node): every group inside one node,
  so a token reaches at most `group_topk` nodes (DeepSeek-V3: G = nodes of the EP group).

Under megatron-core's contiguous placement (expert e on rank e // experts-per-rank) both hold
when the group size divides the experts per rank or per node. Other placements (SMoES bins,
traffic-aware placement, placement files, live migration) must keep the groups whole:
`group_violation` says where one does not, `traffic_aware_group_placement` places whole groups.

Shapes: E experts, G groups, R ranks, N nodes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from epruntime.placement.core import Placement, PlacementError

OPTION = "model.moe_router_num_groups"


class RouterGroupError(PlacementError):
    """A placement or EP layout that would split a group of group-limited routing."""


def group_of_expert(num_experts: int, num_groups: int) -> Tensor:
    """[E] int64: the routing group of each logical expert (megatron-core's contiguous view)."""
    return torch.arange(num_experts) // (num_experts // num_groups)


def group_unit(num_experts: int, num_groups: int, num_ranks: int,
               ranks_per_node: int) -> Literal["rank", "node"]:
    """Where a group must stay whole: "rank" when a group fits in a rank's experts in whole
    numbers (device-limited), "node" when it fits in a node's (node-limited). RouterGroupError
    when it fits in neither: a group would straddle nodes, and the limit would not bound the
    nodes a token reaches."""
    group_size = num_experts // num_groups
    per_rank = num_experts // num_ranks
    if per_rank % group_size == 0:
        return "rank"
    if (per_rank * ranks_per_node) % group_size == 0:
        return "node"
    nodes = num_ranks // ranks_per_node
    raise RouterGroupError(
        f"{OPTION}={num_groups}: groups of {group_size} experts fit neither in one EP rank "
        f"({per_rank} experts) nor in one node ({per_rank * ranks_per_node} experts, "
        f"{ranks_per_node} ranks per node); use a multiple of the EP size {num_ranks} "
        f"(device-limited) or of the {nodes} node(s) of an EP group (node-limited)")


def group_violation(placement: Placement, num_groups: int) -> str | None:
    """Why `placement` splits a routing group over ranks (device-limited) or nodes
    (node-limited), None when every group stays whole."""
    E = placement.num_experts
    try:
        unit = group_unit(E, num_groups, placement.num_ranks, placement.ranks_per_node)
    except RouterGroupError as err:
        return str(err)
    if placement.is_replicated:
        # the copy choice sends a token's pairs to copies one by one (its own rank first), so a
        # token could reach more ranks or nodes than its groups allow
        return (f"{OPTION}={num_groups} (group-limited routing) with copies of experts: the copy "
                "choice would not keep a token within its groups' ranks or nodes; use a "
                "placement without copies, or drop group-limited routing")
    where = placement.rank_E if unit == "rank" else placement.rank_E // placement.ranks_per_node
    size = E // num_groups
    for g, places in enumerate(where.view(num_groups, size).tolist()):
        if len(set(places)) > 1:
            kind = "device-limited" if unit == "rank" else "node-limited"
            return (f"routing group {g} (experts {g * size}..{(g + 1) * size - 1}) is split over "
                    f"{unit}s {sorted(set(places))}; with {OPTION}={num_groups} ({kind} "
                    f"routing) each group must stay on one {unit}: use a placement that keeps "
                    "the groups whole (dispatch.placement=contiguous, or python -m epruntime.plan "
                    "--router-groups), or drop group-limited routing")
    return None


def check_groups_fit(num_experts: int, num_groups: int | None, num_ranks: int,
                     ranks_per_node: int) -> None:
    """RouterGroupError unless megatron-core's contiguous layout keeps every group whole (the
    placement every run starts from)."""
    if num_groups is None:
        return
    message = group_violation(Placement.contiguous(num_experts, num_ranks, ranks_per_node),
                              num_groups)
    if message is not None:
        raise RouterGroupError(message)


def _grouped(W_EE: np.ndarray, load_E: np.ndarray, group_E: np.ndarray, num_groups: int):
    """Co-activation and load summed per group: ([G, G] zero diagonal, [G])."""
    onehot_EG = np.eye(num_groups)[group_E]
    W_GG = onehot_EG.T @ W_EE @ onehot_EG
    np.fill_diagonal(W_GG, 0.0)
    return W_GG, onehot_EG.T @ load_E


def traffic_aware_group_placement(coact_EE: Tensor, num_groups: int, num_ranks: int,
                                  ranks_per_node: int | None = None, load_E: Tensor | None = None,
                                  seed: int = 0, max_imbalance: float = 1.1) -> Placement:
    """`strategies.traffic_aware_placement` that moves whole routing groups.

    Device-limited (groups fit in a rank): groups are the items placed on ranks (co-activation
    and load summed per group). Node-limited: groups are placed on nodes, then each node's
    experts on its ranks by the same objective. coact_EE [E, E], load_E [E] (default: the
    diagonal)."""
    from epruntime.placement.strategies import partition_items

    E = coact_EE.shape[0]
    if not isinstance(num_groups, int) or num_groups < 1 or E % num_groups:
        raise RouterGroupError(f"{OPTION}={num_groups!r} must divide the {E} experts")
    rpn = ranks_per_node or num_ranks
    unit = group_unit(E, num_groups, num_ranks, rpn)
    C = coact_EE.detach().to("cpu", torch.float64).numpy()
    W = (C + C.T) / 2
    np.fill_diagonal(W, 0.0)
    load = (C.diagonal().copy() if load_E is None
            else load_E.detach().to("cpu", torch.float64).numpy())
    group_E = group_of_expert(E, num_groups).numpy()
    W_GG, load_G = _grouped(W, load, group_E, num_groups)
    if unit == "rank":
        rank_G, _ = partition_items(W_GG, load_G, num_ranks, rpn, max_imbalance, seed)
        rank_E = rank_G[group_E]
    else:
        nodes = num_ranks // rpn
        node_G = (partition_items(W_GG, load_G, nodes, 1, max_imbalance, seed)[0]
                  if nodes > 1 else np.zeros(num_groups, dtype=np.int64))
        rank_E = np.empty(E, dtype=np.int64)
        for n in range(nodes):
            idx = np.flatnonzero(node_G[group_E] == n)
            sub_W = W[np.ix_(idx, idx)]
            rank_E[idx] = n * rpn + partition_items(sub_W, load[idx], rpn, rpn, max_imbalance,
                                                    seed)[0]
    # Canonical numbering: nodes, and ranks within a node, by their smallest expert id.
    ranks = [np.flatnonzero(rank_E == r).tolist() for r in range(num_ranks)]
    by_node = sorted(range(num_ranks // rpn),
                     key=lambda n: min(min(ranks[r]) for r in range(n * rpn, (n + 1) * rpn)))
    experts_per_rank = []
    for n in by_node:
        experts_per_rank += sorted(ranks[n * rpn:(n + 1) * rpn], key=min)
    placement = Placement.from_rank_lists(experts_per_rank, rpn)
    assert group_violation(placement, num_groups) is None
    return placement
