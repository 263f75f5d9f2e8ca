"""Pure tensor pieces shared by the learned visual-token compressors: straight-through top-k
selection, gathering rows, and score-weighted merging of groups of rows.

Straight-through estimator (Bengio et al. 2013): the forward pass uses the hard top-k choice,
the backward pass treats it as if it were the soft score. A kept token is multiplied by the gate
`1 + s - s.detach()`, whose value is exactly 1 (so the forward pass equals plain selection bit
for bit) and whose gradient is ds: the loss's sensitivity to the token, <dL/dy, y>, reaches the
score that kept it.
"""

from __future__ import annotations

import torch


def top_k_ascending(score_BP: torch.Tensor, k: int) -> torch.Tensor:
    """[B, P] -> [B, k] int64: the k highest scores' indices in position order (ties: lower
    index first)."""
    order = torch.sort(score_BP, dim=1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=1).values


def gather_rows(x_BPD: torch.Tensor, index_BK: torch.Tensor) -> torch.Tensor:
    """[B, P, D], [B, K] -> [B, K, D] rows at `index_BK` (exact copies)."""
    return x_BPD.gather(1, index_BK[:, :, None].expand(-1, -1, x_BPD.shape[-1]))


def straight_through_gate(prob_BK: torch.Tensor) -> torch.Tensor:
    """[B, K] probabilities of the kept tokens -> [B, K] gates, value exactly 1, gradient d prob."""
    return 1.0 + (prob_BK - prob_BK.detach())


def segment_softmax_merge(x_BND: torch.Tensor, logit_BN: torch.Tensor, group_BN: torch.Tensor,
                          groups: int) -> torch.Tensor:
    """Merge rows into `groups` tokens: [B, N, D] rows, [B, N] logits, [B, N] group ids in
    0..groups-1 -> [B, groups, D], each the softmax(logit)-weighted mean of its group's rows
    (differentiable in the logits and the rows). Every group must hold at least one row."""
    b, n, d = x_BND.shape
    neg = torch.full((b, groups), float("-inf"), dtype=logit_BN.dtype, device=logit_BN.device)
    gmax_BG = neg.scatter_reduce(1, group_BN, logit_BN, reduce="amax", include_self=True)
    e_BN = torch.exp(logit_BN - gmax_BG.gather(1, group_BN).detach())
    denom_BG = torch.zeros_like(gmax_BG).scatter_add(1, group_BN, e_BN)
    w_BN = e_BN / denom_BG.gather(1, group_BN)
    out = x_BND.new_zeros(b, groups, d)
    return out.scatter_add(1, group_BN[:, :, None].expand(b, n, d), w_BN[:, :, None] * x_BND)


def farthest_seeds(feat_BND: torch.Tensor, chosen_BMD: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy farthest-point choice of `count` rows of `feat_BND` [B, N, D] (unit rows): each
    next seed is the row whose highest cosine similarity to what is already chosen (the rows of
    `chosen_BMD` [B, M, D], M may be 0, and earlier seeds) is lowest; first index on ties.
    -> [B, count] int64 indices into N, in the order chosen. O(count * N * D)."""
    b, n, _ = feat_BND.shape
    device = feat_BND.device
    if chosen_BMD.shape[1]:
        nearest_BN = (feat_BND @ chosen_BMD.transpose(1, 2)).amax(dim=2)
    else:
        nearest_BN = torch.full((b, n), float("-inf"), device=device, dtype=feat_BND.dtype)
    taken_BN = torch.zeros(b, n, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)
    seeds = []
    for _ in range(count):
        pick_B = nearest_BN.masked_fill(taken_BN, float("inf")).argmin(dim=1)
        seeds.append(pick_B)
        taken_BN[rows, pick_B] = True
        sim_BN = (feat_BND @ feat_BND[rows, pick_B][:, :, None]).squeeze(2)
        nearest_BN = torch.maximum(nearest_BN, sim_BN)
    return torch.stack(seeds, dim=1) if seeds else torch.empty(b, 0, dtype=torch.long,
                                                               device=device)
