"""Dispatch layout: which rows a rank-deduplicating dispatcher sends, and where they fan out.

Pure tensor functions. A token travels once to every rank that holds at least one of its experts
(DeepEP's layout), carrying the weights and local slots of the experts it uses there; the expert
rank fans the row out to those experts and sums their weighted outputs before sending one row
back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epruntime.placement import Placement


@dataclass
class SendLayout:
    token_N: torch.Tensor  # [N] int64: token of each send row; rows grouped by destination rank
    rank_N: torch.Tensor  # [N] int64: destination rank of each send row
    splits_R: torch.Tensor  # [R] int64: rows per destination rank
    slot_NM: torch.Tensor  # [N, M] int64: destination-local slots the row feeds, -1 = unused
    prob_NM: torch.Tensor  # [N, M] float: their routing weights (0 where unused), differentiable
    expert_rows_R: torch.Tensor  # [R] int64: (token, expert) pairs per rank (per-expert dispatch)


def to_physical(x_TE: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Reorder expert columns from logical id to physical index rank * n_local + slot.

    x_TE [T, E] -> [T, E], column p holds the logical expert placed at p.
    """
    logical_of_physical = torch.argsort(placement.physical_E.to(x_TE.device))
    return x_TE.index_select(1, logical_of_physical)


def dedup_send_layout(routing_map_TE: torch.Tensor, probs_TE: torch.Tensor,
                      placement: Placement, max_entries: int) -> SendLayout:
    """One send row per (token, destination rank).

    routing_map_TE [T, E] bool, probs_TE [T, E] float (logical expert columns). `max_entries` is
    M, the most experts a token can use on one rank (min(top-k, n_local)).
    """
    t, r, n_local = routing_map_TE.shape[0], placement.num_ranks, placement.num_local
    return grouped_send_layout(to_physical(routing_map_TE, placement).view(t, r, n_local),
                               to_physical(probs_TE, placement).view(t, r, n_local), max_entries)


def grouped_send_layout(used_TRL: torch.Tensor, probs_TRL: torch.Tensor,
                        max_entries: int) -> SendLayout:
    """One send row per (row, destination group) from a dense physical layout.

    used_TRL [T, R, L] bool (row t uses slot l of destination r), probs_TRL [T, R, L]. The
    destinations are ranks (dedup) or nodes with L = experts per node (node dedup).
    """
    needs_TR = used_TRL.any(dim=2)
    # nonzero of the [R, T] transpose lists rows rank-major, tokens in order within a rank.
    rank_N, token_N = needs_TR.t().nonzero(as_tuple=True)
    used_NL = used_TRL[token_N, rank_N]
    # Used slots first (stable: ascending slot order), keep the first M.
    order_NL = torch.sort(used_NL.to(torch.uint8), dim=1, descending=True, stable=True).indices
    slot_NM = order_NL[:, :max_entries]
    valid_NM = used_NL.gather(1, slot_NM)
    if used_NL.sum(1).gt(max_entries).any():
        raise ValueError(f"a row uses more than max_entries={max_entries} slots of one destination")
    prob_NM = probs_TRL[token_N, rank_N].gather(1, slot_NM) * valid_NM
    return SendLayout(
        token_N=token_N,
        rank_N=rank_N,
        splits_R=needs_TR.sum(0),
        slot_NM=torch.where(valid_NM, slot_NM, -1),
        prob_NM=prob_NM,
        expert_rows_R=used_TRL.sum(dim=(0, 2)),
    )


@dataclass
class FanOut:
    row_K: torch.Tensor  # [K] int64: received row feeding each expert input, sorted by slot
    entry_K: torch.Tensor  # [K] int64: flat index into the received [rows, M] metadata
    tokens_per_slot: torch.Tensor  # [n_local] int64


def fan_out(slot_RM: torch.Tensor, num_local: int) -> FanOut:
    """Received rows -> expert inputs grouped by local slot (rows in arrival order per slot).

    slot_RM [rows, M] int64, -1 = unused.
    """
    valid = slot_RM >= 0
    flat_slot = slot_RM[valid]
    entry = valid.reshape(-1).nonzero(as_tuple=True)[0]
    order = torch.argsort(flat_slot, stable=True)
    entry_K = entry[order]
    return FanOut(
        row_K=torch.div(entry_K, slot_RM.shape[1], rounding_mode="floor"),
        entry_K=entry_K,
        tokens_per_slot=torch.bincount(flat_slot, minlength=num_local),
    )


def entries_to_dense(slot_XM: torch.Tensor, prob_XM: torch.Tensor, num_slots: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse row entries -> dense ([X, num_slots] bool used, [X, num_slots] weights).

    slot_XM [X, M] int64 (-1 = unused), prob_XM [X, M] (differentiable).
    """
    valid = slot_XM >= 0
    index = slot_XM.clamp(min=0)
    # Unused entries point at slot 0 too: accumulate, so they can never clear a used slot.
    used = torch.zeros(slot_XM.shape[0], num_slots, dtype=torch.int32, device=slot_XM.device)
    used = used.scatter_add_(1, index, valid.to(torch.int32)) > 0
    probs = prob_XM.new_zeros(slot_XM.shape[0], num_slots).scatter_add(1, index, prob_XM * valid)
    return used, probs
