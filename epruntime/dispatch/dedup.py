"""Rank-deduplicating token dispatcher: one row per (token, destination rank).

megatron-core's `MoEAlltoAllTokenDispatcher` sends one row per (token, expert) pair, so a token
whose k experts share a rank crosses the link up to k times. Here (as in DeepEP's layout) it
crosses once per rank: the row carries the weights and local slots of the experts it uses there,
the expert rank fans it out to them, sums their weighted outputs, and sends one row back. Which
experts share a rank is the `Placement`'s business (any logical -> physical map works), so SMoES
bins or traffic-aware placement turn into fewer rows.

It plugs into megatron-core's `MoELayer` through the `MoETokenDispatcher` interface (selected by
`dispatch.kind=dedup`, see `epruntime.model.spec`); experts, router and the layer are
megatron-core's own.
"""

from __future__ import annotations

import torch
from megatron.core import utils
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from epruntime import kernels
from epruntime.dispatch.collective import all_to_all, exchange_counts
from epruntime.dispatch.layout import dedup_send_layout, fan_out
from epruntime.model.context import current_modality_T
from epruntime.placement import Placement, PlacementError


class DedupTokenDispatcher(MoETokenDispatcher):
    def __init__(self, num_local_experts: int, local_expert_indices: list[int], config,
                 pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        if self.tp_size > 1:
            raise NotImplementedError("dedup dispatch with expert tensor parallelism")
        self.num_local_experts = num_local_experts
        self.ep_rank = utils.get_pg_rank(self.ep_group)
        self.placement = Placement.contiguous(config.num_moe_experts, self.ep_size)
        # A row carries at most this many (slot, weight) entries.
        self.max_entries = min(config.moe_router_topk, num_local_experts)
        self.layer_index = 0  # set by the model: the ledger's layer
        self.ledger = None  # CommLedger or None
        self.transport = None  # set by the Engine for dispatch.transport=shm; None: the group
        # kernels.Layout of the last dispatch: the send-row gather and the final combine run
        # through epruntime.kernels with it (subclasses that build other layouts leave it None).
        self.rows_layout = None
        self.kernel_backend: str | None = None  # dispatch.kernels (None: automatic)

    def set_placement(self, placement: Placement) -> None:
        if placement.num_ranks != self.ep_size or placement.num_local != self.num_local_experts:
            raise PlacementError(f"placement of {placement.num_experts} experts on "
                                 f"{placement.num_ranks} ranks does not fit EP size {self.ep_size}"
                                 f" with {self.num_local_experts} local experts")
        self.placement = placement

    # ---- dispatch ------------------------------------------------------------------------
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """hidden [S, B, H] (or [T, H]), routing_map [T, E] bool, probs [T, E] ->
        send rows [N, H] and their metadata [N, 2M] (weights, then slots as floats)."""
        self.hidden_shape = hidden_states.shape
        x_TH = hidden_states.reshape(-1, self.hidden_shape[-1])
        layout = dedup_send_layout(routing_map, probs, self.placement, self.max_entries)
        # Same rows in the same order (rank-major, tokens ascending) as `layout`.
        self.rows_layout = kernels.dispatch_layout(
            routing_map, self.placement.rank_E.to(routing_map.device), self.ep_size,
            backend=self.kernel_backend)
        self.token_N = layout.token_N
        self.send_splits = layout.splits_R.tolist()
        self.recv_splits = exchange_counts(layout.splits_R, self.ep_group).tolist()
        self.modality_N = None
        modality_T = current_modality_T()
        if modality_T is not None and modality_T.numel() == x_TH.shape[0]:
            self.modality_N = modality_T.to(layout.token_N.device)[layout.token_N]
        if self.ledger is not None:
            self.ledger.record_control(self.layer_index,
                                       [layout.splits_R.element_size()] * self.ep_size)
            self.ledger.record_routing(self.layer_index, layout.expert_rows_R, layout.splits_R,
                                       modality_T if self.modality_N is not None else None,
                                       x_TH.shape[0])
        rows_NH = kernels.permute_differentiable(x_TH, self.rows_layout, self.kernel_backend)
        meta_N2M = torch.cat([layout.prob_NM.float(), layout.slot_NM.float()], dim=1)
        return rows_NH, meta_N2M

    def token_dispatch(self, rows_NH, meta_N2M):
        if self.ledger is not None:
            self.ledger.record_exchange(self.layer_index, "dispatch", self.send_splits, rows_NH,
                                        meta_N2M, self.modality_N)
        return self.exchange_rows(rows_NH, meta_N2M, self.send_splits, self.recv_splits)

    def exchange_rows(self, rows_NH, meta_NC, send_splits, recv_splits):
        """Rows and their metadata to their destination ranks; one collective when the dtypes
        allow packing them side by side (fewer latency-bound calls each way)."""
        if rows_NH.dtype == meta_NC.dtype:
            packed = all_to_all(torch.cat([rows_NH, meta_NC], dim=1), send_splits, recv_splits,
                                self.ep_group, self.transport)
            return packed.split([rows_NH.shape[1], meta_NC.shape[1]], dim=1)
        return (all_to_all(rows_NH, send_splits, recv_splits, self.ep_group, self.transport),
                all_to_all(meta_NC, send_splits, recv_splits, self.ep_group, self.transport))

    def dispatch_postprocess(self, rows_RH, meta_R2M):
        """Received rows -> expert inputs [K, H] sorted by local slot, tokens per slot, weights [K]."""
        m = self.max_entries
        prob_RM, slot_RM = meta_R2M[:, :m], meta_R2M[:, m:].detach().long()
        fan = fan_out(slot_RM, self.num_local_experts)
        self.row_K, self.num_recv = fan.row_K, rows_RH.shape[0]
        x_KH = rows_RH.index_select(0, fan.row_K)
        probs_K = prob_RM.reshape(-1).index_select(0, fan.entry_K)
        return x_KH, fan.tokens_per_slot, probs_K

    # ---- combine ---------------------------------------------------------------------------
    def combine_preprocess(self, out_KH):
        """Weighted expert outputs [K, H] -> one row per received row [R, H] (sum over slots)."""
        return out_KH.new_zeros(self.num_recv, out_KH.shape[-1]).index_add(0, self.row_K, out_KH)

    def token_combine(self, rows_RH):
        if self.ledger is not None:
            self.ledger.record_exchange(self.layer_index, "combine", self.recv_splits, rows_RH)
        back = all_to_all(rows_RH, self.recv_splits, self.send_splits, self.ep_group,
                          self.transport)
        if self.ledger is not None and self.modality_N is not None:
            self.ledger.record_return_modality(self.layer_index, self.send_splits, self.modality_N)
        return back

    def combine_postprocess(self, back_NH):
        """One row per (token, rank) [N, H] -> per token sum, in the input's shape."""
        if self.rows_layout is not None:
            # Per token, the rows from each rank summed in ascending rank order.
            out = kernels.unpermute_combine_differentiable(back_NH, self.rows_layout,
                                                           backend=self.kernel_backend)
            return out.view(self.hidden_shape)
        num_tokens = int(torch.tensor(self.hidden_shape[:-1]).prod())
        out = back_NH.new_zeros(num_tokens, back_NH.shape[-1]).index_add(0, self.token_N, back_NH)
        return out.view(self.hidden_shape)
