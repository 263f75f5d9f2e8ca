"""Dispatch layout helpers: the row plan as a flat list of send rows, and the fan-out of received
rows to local experts.

Pure tensor functions. Which rows a rank-deduplicating dispatcher sends is the row plan's
business (`epruntime.dispatch.plan`); `dedup_send_layout` lists them. A token travels once to
every rank that holds at least one of its experts (DeepEP's layout), carrying the weights and
local slots of the experts it uses there; the expert rank fans the row out to those experts
(`fan_out`) and sums their weighted outputs before sending one row back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epruntime import kernels
from epruntime.dispatch.plan import row_plan, to_physical
from epruntime.placement import Placement


@dataclass
class SendLayout:
    token_N: torch.Tensor  # [N] int64: token of each send row; rows grouped by destination rank
    rank_N: torch.Tensor  # [N] int64: destination rank of each send row
    splits_R: torch.Tensor  # [R] int64: rows per destination rank
    slot_NM: torch.Tensor  # [N, M] int64: destination-local slots the row feeds, -1 = unused
    prob_NM: torch.Tensor  # [N, M] float: their routing weights (0 where unused), differentiable
    expert_rows_R: torch.Tensor  # [R] int64: (token, expert) pairs per rank (per-expert dispatch)


def dedup_send_layout(routing_map_TE: torch.Tensor, probs_TE: torch.Tensor,
                      placement: Placement, max_entries: int) -> SendLayout:
    """The rank-dedup row plan of one rank's tokens as a flat list: one send row per (token,
    destination rank), rank-major, tokens ascending within a rank.

    routing_map_TE [T, E] bool, probs_TE [T, E] float (logical expert columns). `max_entries` is
    M, the most experts a token can use on one rank (min(top-k, n_local)).
    """
    plan = row_plan(routing_map_TE, probs_TE, placement, "rank", source_rank=0,
                    topk=max_entries, debug_checks=True)
    hop = plan.hops[0]
    token_N, rank_N = hop.rows()
    slot_NM, prob_NM = hop.entries(token_N, rank_N)
    return SendLayout(token_N=token_N, rank_N=rank_N, splits_R=hop.splits_R, slot_NM=slot_NM,
                      prob_NM=prob_NM, expert_rows_R=plan.expert_rows_RR[0])


@dataclass
class FanOut:
    row_K: torch.Tensor  # [K] int64: received row feeding each expert input, sorted by slot
    entry_K: torch.Tensor  # [K] int64: flat index into the received [rows, M] metadata
    tokens_per_slot: torch.Tensor  # [n_local] int64


def fan_out(slot_RM: torch.Tensor, num_local: int, backend: str | None = None) -> FanOut:
    """Received rows -> expert inputs grouped by local slot (rows in arrival order per slot).

    slot_RM [rows, M] int64, -1 = unused; `backend`: the kernels backend of the counting sort
    (`epruntime.kernels.fan_out_order`; None: the device's default).
    """
    entry_K, tokens_per_slot = kernels.fan_out_order(slot_RM, num_local, backend)
    return FanOut(row_K=torch.div(entry_K, slot_RM.shape[1], rounding_mode="floor"),
                  entry_K=entry_K, tokens_per_slot=tokens_per_slot)


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
