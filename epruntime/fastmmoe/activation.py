"""Reduced expert activation for visual tokens (FastMMoE, arXiv 2511.17885).

A visual token keeps only its k' highest-weighted experts out of the router's k; the kept
weights are rescaled to the total the k had, so the token's output keeps its scale. Text tokens
keep all k. Fewer (token, expert) pairs means fewer rows to dispatch and fewer expert FLOPs.
"""

from __future__ import annotations

import torch


def reduce_topk(probs_TE: torch.Tensor, routing_map_TE: torch.Tensor, reduce_T: torch.Tensor,
                k_reduced: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top-`k_reduced` routed experts of the tokens where `reduce_T` is set.

    probs_TE [T, E] float (0 off the routing map), routing_map_TE [T, E] bool, reduce_T [T] bool
    -> (probs_TE, routing_map_TE) with at most k_reduced experts on reduced rows, whose weights
    sum to what the row's k weights summed to. Other rows are returned unchanged.
    """
    if k_reduced < 1:
        raise ValueError(f"k_reduced must be >= 1, got {k_reduced}")
    if probs_TE.shape != routing_map_TE.shape or reduce_T.shape != probs_TE.shape[:1]:
        raise ValueError(f"probs_TE {tuple(probs_TE.shape)}, routing_map_TE "
                         f"{tuple(routing_map_TE.shape)} and reduce_T {tuple(reduce_T.shape)} "
                         "must be [T, E], [T, E] and [T]")
    t = probs_TE.shape[0]
    if t == 0 or int(routing_map_TE.sum(1).max()) <= k_reduced:
        return probs_TE, routing_map_TE
    masked_TE = probs_TE.masked_fill(~routing_map_TE, float("-inf"))
    top_TK = masked_TE.topk(k_reduced, dim=1, sorted=False).indices
    keep_TE = torch.zeros_like(routing_map_TE).scatter_(1, top_TK, True) & routing_map_TE
    new_map = torch.where(reduce_T[:, None], keep_TE, routing_map_TE)
    kept = probs_TE * new_map
    scale_T = probs_TE.sum(1) / kept.sum(1).clamp_min(torch.finfo(probs_TE.dtype).tiny)
    new_probs = torch.where(reduce_T[:, None], kept * scale_T[:, None], probs_TE)
    return new_probs, new_map
