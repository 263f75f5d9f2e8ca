"""The torch backend: plain torch ops, the definition every other backend must match bit for bit.

Inputs are already checked by the front (`epruntime.kernels`); these functions assume valid,
same-device tensors. Row order of the send buffer: rank-major, tokens ascending within a rank.
"""

from __future__ import annotations

import torch


def dispatch_layout(routing_map_TE: torch.Tensor, rank_of_expert_E: torch.Tensor,
                    num_ranks: int):
    """routing_map_TE bool [T, E], rank_of_expert_E int64 [E] -> Layout (see the front)."""
    from epruntime.kernels import Layout

    t = routing_map_TE.shape[0]
    hits_TR = torch.zeros(t, num_ranks, dtype=torch.int64, device=routing_map_TE.device)
    hits_TR.index_add_(1, rank_of_expert_E, routing_map_TE.to(torch.int64))
    token_in_rank_TR = hits_TR > 0
    # Running count down each rank's column: the token's row within that rank's block.
    position_TR = torch.where(token_in_rank_TR, token_in_rank_TR.cumsum(0) - 1, -1)
    return Layout(token_in_rank_TR=token_in_rank_TR, position_TR=position_TR,
                  tokens_per_rank_R=token_in_rank_TR.sum(0),
                  tokens_per_expert_E=routing_map_TE.sum(0))


def permute(x_TH: torch.Tensor, layout) -> torch.Tensor:
    """x_TH [T, H] -> rows_NH [N, H]: row offset(r) + position_TR[t, r] is x[t]."""
    return x_TH.index_select(0, layout.token_N)


def unpermute_combine(rows_NH: torch.Tensor, layout, weight_TR: torch.Tensor | None,
                      num_tokens: int) -> torch.Tensor:
    """rows_NH [N, H] -> out_TH [T, H] = sum over ranks r ascending of w[t, r] * row(t, r).

    Rounding, which every backend reproduces: the weight is cast to the row dtype and each
    product rounded to it (megatron-core's unpermute does the same); the sum starts from zero,
    adds in ascending rank order in float32 and is rounded to the row dtype once at the end
    (for float32 rows, every add rounds as usual). That is what torch's `index_add` does for
    16-bit rows, so this equals the index_add combine and the index_select backward bit for bit.
    """
    out_TH = torch.zeros(num_tokens, rows_NH.shape[1], dtype=torch.float32,
                         device=rows_NH.device)
    for r in range(layout.num_ranks):
        token_n = layout.token_in_rank_TR[:, r].nonzero().squeeze(1)
        block_nH = rows_NH[layout.offset_R[r] + layout.position_TR[token_n, r]]
        if weight_TR is not None:
            block_nH = weight_TR[token_n, r].to(rows_NH.dtype)[:, None] * block_nH
        out_TH = out_TH.index_put((token_n,), out_TH[token_n] + block_nH.float())
    return out_TH.to(rows_NH.dtype)


def compact(x_TH: torch.Tensor, keep_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_TH [T, H], keep_T bool [T] -> (x_KH [K, H], index_K int64 [K]) in original order."""
    index_K = keep_T.nonzero().squeeze(1)
    return x_TH.index_select(0, index_K), index_K


def greedy_keep(sim_BPP: torch.Tensor, keep: int) -> torch.Tensor:
    """sim_BPP [B, P, P] float, 0 < keep < P -> keep_BK [B, keep] int64 ascending: FastMMoE's
    greedy redundancy selection (see the front). Every sample at once and no host sync: each
    step takes every row's max over the remaining tokens afresh (O(P^2) per sample and step),
    which equals a cached nearest-neighbour update because a max is exact."""
    b, p, _ = sim_BPP.shape
    device = sim_BPP.device
    eye = torch.eye(p, dtype=torch.bool, device=device)
    work_BPP = sim_BPP.masked_fill(eye, float("-inf"))
    alive_BP = torch.ones(b, p, dtype=torch.bool, device=device)
    rows_B = torch.arange(b, device=device)
    for _ in range(p - keep):
        redundancy_BP = work_BPP.amax(dim=2).masked_fill_(~alive_BP, float("-inf"))
        drop_B = redundancy_BP.argmax(dim=1)  # first index on ties
        alive_BP[rows_B, drop_B] = False
        work_BPP[rows_B, :, drop_B] = float("-inf")  # no longer anyone's neighbour
    index_BP = torch.arange(p, device=device).expand(b, p)
    return torch.where(alive_BP, index_BP, p).sort(dim=1).values[:, :keep]


def row_slots(used_TGQ: torch.Tensor, token_N: torch.Tensor, group_N: torch.Tensor,
              max_entries: int) -> torch.Tensor:
    """used_TGQ bool [T, G, Q], rows (token_N, group_N) int64 [N] -> slot_NM int64 [N, M]: the
    first M used slots of each row in ascending order, -1 padded."""
    used_NQ = used_TGQ[token_N, group_N]
    # Used slots first; stable, so ascending slot order among them.
    order_NQ = torch.sort(used_NQ.to(torch.uint8), dim=1, descending=True, stable=True).indices
    slot_NM = order_NQ[:, :max_entries]
    return torch.where(used_NQ.gather(1, slot_NM), slot_NM, -1)


def fan_out_order(slot_XM: torch.Tensor, num_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slot_XM int64 [X, M] (-1 = unused) -> (entry_K int64 [K]: flat indices of the used
    entries by slot, arrival order within a slot; tokens_per_slot int64 [L])."""
    flat = slot_XM.reshape(-1)
    entry = (flat >= 0).nonzero(as_tuple=True)[0]
    slot_K = flat[entry]
    counts = torch.bincount(slot_K, minlength=num_local)
    if counts.numel() > num_local:
        raise ValueError(f"slot_XM has slots up to {counts.numel() - 1}, expected < "
                         f"num_local={num_local}")
    return entry[torch.argsort(slot_K, stable=True)], counts
