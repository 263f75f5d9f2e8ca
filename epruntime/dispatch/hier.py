"""Node-deduplicating dispatcher (`dispatch.kind=dedup-hier`): one row per (token, node) across
nodes, forwarded inside the node to the ranks that hold its experts.

Hop 1 sends a token once to every node that holds any of its experts, to the gateway rank with
the sender's local index in that node (the rail DeepEP's internode kernels use), carrying the
node-local slots and weights of its experts there (and, while the ledger records, the token's
modality, so that the gateway can count its rows by modality). Hop 2 is the rank dedup inside
the node, planned by the gateway from the rows it received. Combine runs the hops backwards,
summing at each hop, so the slow inter-node link carries one row per (token, remote node) each
way. The row plan (`epruntime.dispatch.plan`, kind "node") says what each hop carries.

Both hops are communication and run in token_dispatch (and back in token_combine), driven by
the handle; pre- and post-processing are the rank-dedup dispatcher's. Host-sync budget: one per
hop (each hop's split counts), 2 per dispatch.
"""

from __future__ import annotations

import dataclasses

import torch

from epruntime import kernels
from epruntime.dispatch.capacity import max_entries
from epruntime.dispatch.dedup import DedupTokenDispatcher, SentHop
from epruntime.dispatch.layout import entries_to_dense
from epruntime.dispatch.plan import Hop, RowPlan, physical_row_plan

HOST_SYNCS_PER_DISPATCH = 2  # one per hop


class HierDedupTokenDispatcher(DedupTokenDispatcher):
    plan_kind = "node"

    def token_dispatch(self, x_TH, probs):
        """Hop 1 to the gateways, then (as a gateway) hop 2 inside this node; returns the rows
        [X, H] and metadata [X, 2M] this rank receives for its own experts."""
        laps = self.runtime.laps("dispatch")
        h = self._handle
        hop1 = h.plan.hops[0]
        if self.shared_experts is None:
            rows_YH, meta_YC, sent1 = self._send_hop(x_TH, hop1, h.modality_T, laps)
        else:  # the shared experts run while hop 1 travels (epruntime.dispatch.overlap)
            flight1 = self._send_hop(x_TH, hop1, h.modality_T, laps, asynchronous=True)
            h = dataclasses.replace(h, shared_out=self._shared_experts_now(h))
            (rows_YH, meta_YC), sent1 = self._wait_hop(flight1), flight1.sent
            laps = self.runtime.laps("dispatch")
        plan2 = self._gateway_plan(rows_YH, meta_YC, hop1)
        modality_Y = None
        if h.modality_T is not None and hop1.modality_column:
            modality_Y = meta_YC[:, -1].detach().long()
        laps.lap("layout")
        if self.runtime.overlap:  # hop 2 local rows first (SpecMoELayer: experts_local_first)
            flight2 = self._send_hop(rows_YH, plan2.hops[0], modality_Y, laps, asynchronous=True)
            self._handle = dataclasses.replace(h, sent=(sent1, flight2.sent))
            return flight2, None
        rows_XH, meta_XC, sent2 = self._send_hop(rows_YH, plan2.hops[0], modality_Y, laps)
        self._handle = dataclasses.replace(h, sent=(sent1, sent2))
        return rows_XH, meta_XC

    def _gateway_plan(self, rows_YH: torch.Tensor, meta_YC: torch.Tensor, hop1: Hop) -> RowPlan:
        """The rank-dedup plan of the hop-1 rows this rank received as a gateway: each row's
        node-local entries, placed on this node's ranks."""
        per_node, n_local = self.placement.ranks_per_node, self.num_local_experts
        m1 = hop1.max_entries
        used_YQ, probs_YQ = entries_to_dense(meta_YC[:, m1:2 * m1].detach().long(),
                                             meta_YC[:, :m1], per_node * n_local)
        y = rows_YH.shape[0]
        first = self.ep_rank - self.ep_rank % per_node
        before, after = first * n_local, (self.ep_size - first - per_node) * n_local

        def on_all_ranks(x_YQ):
            return torch.cat([x_YQ.new_zeros(y, before), x_YQ, x_YQ.new_zeros(y, after)],
                             1).view(y, self.ep_size, n_local)

        return physical_row_plan(on_all_ranks(used_YQ), on_all_ranks(probs_YQ), "rank",
                                 ranks_per_node=per_node, source_rank=self.ep_rank,
                                 topk=max_entries(self.config), hidden_size=rows_YH.shape[1],
                                 hidden_bytes=rows_YH.element_size(),
                                 debug_checks=self.debug_checks)

    def token_combine(self, rows_XH):
        """Hop 2 back to the gateways, which sum their node's rows per hop-1 row, then hop 1
        back to the senders."""
        laps = self.runtime.laps("combine")
        sent1, sent2 = self._handle.sent
        back2 = self._return_hop(rows_XH, sent2, laps)
        rows_YH = kernels.unpermute_combine_differentiable(back2, sent2.layout,
                                                           backend=self.runtime.kernels)
        self.runtime.time_backward("combine", "combine", back2, rows_YH)
        return self._return_hop(rows_YH, sent1, laps)


__all__ = ["HierDedupTokenDispatcher", "SentHop"]
