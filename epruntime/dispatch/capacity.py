"""What megatron-core's expert capacity did to one layer's routing: dropped and padding pairs.

With `moe_expert_capacity_factor`, megatron-core's router (`apply_router_token_dropping`, after
top-k) keeps at most C = ceil(T * k / E * factor) of a rank's T tokens per expert, by probability
or by position, and zeroes the rest; with `moe_pad_expert_input_to_capacity` every expert's
column of the routing map holds exactly C tokens, the extra (padding) pairs with probability 0.
Every dispatcher then moves what that routing map says: megatron-core's alltoall sends C rows per
expert, the dedup dispatchers one row per (token, rank) of it, so dropping happens once, in the
router, and all dispatchers drop the same pairs.

The dispatcher sees only the routing after capacity, so the counts are read off it: top-k routing
picks exactly k experts per token, so a token's dropped pairs are k minus its kept pairs (those
with a non-zero weight); padding pairs are the routed pairs with weight 0. A top-k weight is
never exactly 0 (softmax and sigmoid are positive), so nothing real is miscounted as padding.
"""

from __future__ import annotations

import torch


def capacity_pairs(routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, topk: int,
                   modality_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """routing_map_TE [T, E] bool, probs_TE [T, E] after megatron-core's capacity step, the
    router's top-k, modality_T [T] (0 text, 1 vision, else or None: text) ->
    (dropped_M [2] int64 dropped (token, expert) pairs by the token's modality, padded [] int64
    padding pairs). On the routing's device, no host sync."""
    kept_TE = routing_map_TE & (probs_TE.detach() != 0)
    kept_T = kept_TE.sum(1)
    dropped_T = (topk - kept_T).clamp_(min=0)
    vision_T = (torch.zeros_like(dropped_T, dtype=torch.bool) if modality_T is None
                else modality_T.to(dropped_T.device) == 1)
    dropped_M = torch.stack([(dropped_T * ~vision_T).sum(), (dropped_T * vision_T).sum()])
    padded = routing_map_TE.sum() - kept_T.sum()
    return dropped_M, padded


def max_entries(config) -> int:
    """Most experts one token may use in a layer's routing map: its top-k, or every expert when
    padding to capacity (padding pairs fill experts' columns with any token)."""
    if config.moe_expert_capacity_factor is not None and config.moe_pad_expert_input_to_capacity:
        return config.num_moe_experts
    return config.moe_router_topk
