"""Node-deduplicating dispatcher (`dispatch.kind=dedup-hier`): one row per (token, node) across
nodes, forwarded inside the node to the ranks that hold its experts.

Stage 1 sends a token once to every node that holds any of its experts, to the gateway rank with
the sender's local index in that node (the rail DeepEP's internode kernels use), carrying the
node-local slots and weights of its experts there. Stage 2 is the rank dedup inside the node.
Combine runs the stages backwards, summing at each hop, so the slow inter-node link carries one
row per (token, remote node) each way.
"""

from __future__ import annotations

import torch

from epruntime.dispatch.collective import all_to_all, exchange_counts
from epruntime.dispatch.dedup import DedupTokenDispatcher
from epruntime.dispatch.layout import entries_to_dense, grouped_send_layout, to_physical
from epruntime.model.context import current_modality_T


class HierDedupTokenDispatcher(DedupTokenDispatcher):
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """Stage-1 layout: rows [N, H] to gateways, metadata [N, 2 M1 + 1] (weights, node-local
        slots, modality)."""
        p = self.placement
        per_node, n_local, nodes = p.ranks_per_node, self.num_local_experts, p.num_nodes
        self.hidden_shape = hidden_states.shape
        x_TH = hidden_states.reshape(-1, self.hidden_shape[-1])
        t = x_TH.shape[0]
        used_TP, probs_TP = to_physical(routing_map, p), to_physical(probs, p)
        entries = min(self.config.moe_router_topk, per_node * n_local)
        layout = grouped_send_layout(used_TP.view(t, nodes, per_node * n_local),
                                     probs_TP.view(t, nodes, per_node * n_local), entries)
        # Node n's rows go to the rank with this rank's local index in node n.
        gateways = torch.arange(nodes, device=x_TH.device) * per_node + self.ep_rank % per_node
        splits_R = torch.zeros(self.ep_size, dtype=torch.int64, device=x_TH.device)
        splits_R[gateways] = layout.splits_R
        self.token_N = layout.token_N
        self.send1, self.recv1 = splits_R.tolist(), exchange_counts(splits_R, self.ep_group).tolist()

        modality_T = current_modality_T()
        known = modality_T is not None and modality_T.numel() == t
        modality_T = modality_T.to(x_TH.device) if known else x_TH.new_zeros(t, dtype=torch.long)
        self.modality_N = modality_T[layout.token_N] if known else None
        if self.ledger is not None:
            used_TRL = used_TP.view(t, self.ep_size, n_local)
            self.ledger.record_control(self.layer_index, [8] * self.ep_size)
            self.ledger.record_routing(self.layer_index, used_TRL.sum(dim=(0, 2)),
                                       used_TRL.any(dim=2).sum(0), modality_T if known else None, t)
        meta = torch.cat([layout.prob_NM.float(), layout.slot_NM.float(),
                          modality_T[layout.token_N].float()[:, None]], dim=1)
        return x_TH.index_select(0, layout.token_N), meta

    def token_dispatch(self, rows_NH, meta_N):
        if self.ledger is not None:
            self.ledger.record_exchange(self.layer_index, "dispatch", self.send1, rows_NH, meta_N,
                                        self.modality_N)
        rows_XH, meta_X = self.exchange_rows(rows_NH, meta_N, self.send1, self.recv1)

        # Stage 2: rank dedup inside this node.
        per_node, n_local = self.placement.ranks_per_node, self.num_local_experts
        entries1 = (meta_X.shape[1] - 1) // 2
        used_XQ, probs_XQ = entries_to_dense(meta_X[:, entries1:2 * entries1].detach().long(),
                                             meta_X[:, :entries1], per_node * n_local)
        x = rows_XH.shape[0]
        first = self.ep_rank - self.ep_rank % per_node
        before, after = first, self.ep_size - first - per_node
        used_XRL = torch.cat([used_XQ.new_zeros(x, before * n_local), used_XQ,
                              used_XQ.new_zeros(x, after * n_local)], 1).view(x, self.ep_size, n_local)
        probs_XRL = torch.cat([probs_XQ.new_zeros(x, before * n_local), probs_XQ,
                               probs_XQ.new_zeros(x, after * n_local)], 1).view(x, self.ep_size, n_local)
        layout = grouped_send_layout(used_XRL, probs_XRL, self.max_entries)
        self.row2_N, self.num_rows1 = layout.token_N, x
        self.send2 = layout.splits_R.tolist()
        self.recv2 = exchange_counts(layout.splits_R, self.ep_group).tolist()
        self.modality2_N = meta_X[:, -1].detach().long()[layout.token_N]
        rows2 = rows_XH.index_select(0, layout.token_N)
        meta2 = torch.cat([layout.prob_NM.float(), layout.slot_NM.float()], dim=1)
        if self.ledger is not None:
            self.ledger.record_control(self.layer_index, [8] * self.ep_size)
            self.ledger.record_exchange(self.layer_index, "dispatch", self.send2, rows2, meta2,
                                        self.modality2_N if self.modality_N is not None else None)
        return self.exchange_rows(rows2, meta2, self.send2, self.recv2)

    def token_combine(self, rows_RH):
        ledger = self.ledger
        if ledger is not None:
            ledger.record_exchange(self.layer_index, "combine", self.recv2, rows_RH)
        back2 = all_to_all(rows_RH, self.recv2, self.send2, self.ep_group, self.transport)
        if ledger is not None and self.modality_N is not None:
            ledger.record_return_modality(self.layer_index, self.send2, self.modality2_N)
        # The gateway sums its node's contributions: one row per stage-1 row goes back.
        rows1 = back2.new_zeros(self.num_rows1, back2.shape[-1]).index_add(0, self.row2_N, back2)
        if ledger is not None:
            ledger.record_exchange(self.layer_index, "combine", self.recv1, rows1)
        back1 = all_to_all(rows1, self.recv1, self.send1, self.ep_group, self.transport)
        if ledger is not None and self.modality_N is not None:
            ledger.record_return_modality(self.layer_index, self.send1, self.modality_N)
        return back1
