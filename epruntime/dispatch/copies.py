"""Where logical routing becomes physical: each (token, logical expert) pair to one copy.

The router speaks logical experts (routing map [T, E]); a replicated placement has P > E
physical slots. The dedup dispatchers plan their rows on the physical routing this returns,
under `physical_view(placement)` (slot p is "expert" p on rank p // num_local), so the row plan,
the ledger and the wire see physical rows. Which copy: `placement.replicas.resolve_copies` (the
token's own rank, else its node, else spread deterministically over the copies).

Pure tensor function, fixed shapes, no host sync. A placement without copies passes through.
"""

from __future__ import annotations

import torch
from torch import Tensor

from epruntime.placement.core import Placement
from epruntime.placement.replicas import physical_view, resolve_copies


def route_to_copies(routing_map_TE: Tensor, probs_TE: Tensor | None, placement: Placement,
                    source_rank: int, max_pairs: int) -> tuple[Tensor, Tensor | None, Placement]:
    """(routing_map_TP [T, P] bool, probs_TP [T, P] or None, the placement to plan with).

    routing_map_TE [T, E] bool, probs_TE [T, E] in logical columns from EP rank `source_rank`;
    `max_pairs`: most experts a token uses (its top-k, `capacity.max_entries`). Column p of the
    result is physical slot p; a pair's weight goes to the one copy it is sent to (its gradient
    flows back to the logical column), every other copy gets 0. Without copies the inputs and
    `placement` come back unchanged."""
    if not placement.is_replicated:
        return routing_map_TE, probs_TE, placement
    t, e = routing_map_TE.shape
    dev = routing_map_TE.device
    # each token's routed experts, ascending, then -1: [T, K] (the copy choice then works on
    # K, not E, candidates per token: K/E of the work at 256 experts top-8)
    k = min(int(max_pairs), e)
    ids_TE = torch.where(routing_map_TE, torch.arange(e, device=dev)[None, :], e)
    ids_TK = torch.topk(ids_TE, k, dim=1, largest=False, sorted=True).values
    idx_TK = torch.where(ids_TK < e, ids_TK, -1)
    src_T = torch.full((t,), int(source_rank), dtype=torch.long, device=dev)
    phys_TK = resolve_copies(idx_TK, placement, src_T).to(dev)  # [T, K], -1 where not routed
    p = placement.num_physical
    hit = torch.zeros(t, p + 1, dtype=torch.bool, device=dev)
    hit.scatter_(1, torch.where(phys_TK >= 0, phys_TK, p), True)  # column P collects the -1s
    routing_map_TP = hit[:, :p]
    probs_TP = None
    if probs_TE is not None:
        logical_P = placement.phy2log_P.to(dev)
        probs_TP = probs_TE.index_select(1, logical_P) * routing_map_TP
    return routing_map_TP, probs_TP, physical_view(placement)
