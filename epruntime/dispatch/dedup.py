"""Rank-deduplicating token dispatcher: one row per (token, destination rank).

megatron-core's `MoEAlltoAllTokenDispatcher` sends one row per (token, expert) pair, so a token
whose k experts share a rank crosses the link up to k times. Here (as in DeepEP's layout) it
crosses once per rank: the row carries the weights and local slots of the experts it uses there,
the expert rank fans it out to them, sums their weighted outputs, and sends one row back. Which
experts share a rank is the `Placement`'s business (any logical -> physical map works), so SMoES
bins or traffic-aware placement turn into fewer rows. What crosses the wire is the row plan's
(`epruntime.dispatch.plan`, kind "rank"); this class moves bytes by it.

It plugs into megatron-core's `MoELayer` through the `MoETokenDispatcher` interface (selected by
`dispatch.kind=dedup`, see `epruntime.model.spec`); experts, router and the layer are
megatron-core's own. Everything else it needs (layer index, transport, kernels backend, ledger,
the modality of the layer's tokens) comes from its `LayerRuntime`, given at construction.

Phases (megatron-core's contract: communication only in token_dispatch / token_combine). As in
megatron-core's flex (DeepEP) dispatcher, pre-processing only plans; the rows are gathered
where the split counts are known:

    dispatch_preprocess  plan the rows (device only, no sync): the handle
    token_dispatch       exchange the [R] row counts, then the rows and their metadata
    dispatch_postprocess fan the received rows out to local experts, sorted by slot
    combine_preprocess   sum each received row's expert outputs back into one row
    token_combine        send the rows back
    combine_postprocess  sum each token's rows (kernels backend)

The handle (`DispatchHandle`, as DeepEP's `handle`) carries everything from dispatch to combine;
it is the only per-call state on the dispatcher (`self._handle`), and backward needs nothing else.

Host-sync budget: 1 host sync per dispatch (token_dispatch): the send and receive split counts
come to the host in one `.tolist()`, because the all-to-all takes its splits as host integers.
Everything else stays on the device: the plan, the ledger's counters, the send buffer (its size
is the sum of those host counts). tests/test_host_syncs.py counts this. Not counted there: the
fan-out's data-dependent sizes (`nonzero` on the received slots; on CUDA megatron-core's experts
sync on `tokens_per_expert` anyway).

Overlap (epruntime.dispatch.overlap): with shared experts given at construction
(`model.moe_shared_expert_overlap`) token_dispatch starts the all-to-all, runs them, then waits;
with `runtime.overlap` (`dispatch.overlap`) token_dispatch returns the started hop and
`experts_local_first` (called by SpecMoELayer in place of dispatch_postprocess, experts and
combine_preprocess) runs the experts given at construction on this rank's own rows first.

Timing (`dispatch.timing`, epruntime.dispatch.timing): each phase method marks its parts into the
runtime's PhaseTimer; no host sync on CPU (perf_counter), and on CUDA the events are resolved once
per step by the engine, not here. Off, every mark is `NULL_LAPS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from megatron.core import utils
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from epruntime import kernels
from epruntime.dispatch.capacity import capacity_pairs, max_entries
from epruntime.dispatch.collective import (
    all_to_all,
    exchange_counts,
    last_wait_s,
    start_all_to_all,
)
from epruntime.dispatch.copies import route_to_copies
from epruntime.dispatch.layout import FanOut, fan_out
from epruntime.dispatch.overlap import (
    HopInFlight,
    backward_node_span,
    local_first,
    run_shared_experts,
    start_hop,
)
from epruntime.dispatch.plan import Hop, RowPlan, row_plan
from epruntime.dispatch.timing import NULL_LAPS
from epruntime.placement import Placement, PlacementError
from epruntime.runtime import LayerRuntime

HOST_SYNCS_PER_DISPATCH = 1  # the split counts (see the module docstring)


@dataclass(frozen=True, eq=False)
class SentHop:
    """One hop as dispatched: its plan, the split counts both ways and the send rows' layout."""

    hop: Hop
    send_splits: tuple[int, ...]  # rows sent to each rank (host)
    recv_splits: tuple[int, ...]  # rows received from each rank (host)
    recv_R: torch.Tensor  # [R] int64 the same received counts on the device (the ledger's)
    layout: kernels.Layout  # where each (token, rank) row sits in the send buffer
    modality_rows: torch.Tensor | None  # [2, R, R] the sent rows by modality; None: unknown

    @property
    def num_sent(self) -> int:
        return sum(self.send_splits)

    @property
    def num_received(self) -> int:
        return sum(self.recv_splits)


@dataclass(frozen=True, eq=False)
class DispatchHandle:
    """Everything combine (and backward) needs from one dispatch. Built by dispatch_preprocess
    (plan, shape, modality), completed by token_dispatch (`sent`) and dispatch_postprocess
    (`fan`)."""

    plan: RowPlan
    hidden_shape: torch.Size  # of the layer's input, [S, B, H] or [T, H]
    modality_T: torch.Tensor | None  # [T] modality of the layer's tokens; None: unknown
    sent: tuple[SentHop, ...] = ()  # hops in dispatch order
    fan: FanOut | None = None  # received rows -> local expert inputs
    layer_input: torch.Tensor | None = None  # [S, B, H] for the shared experts (else None)
    shared_out: torch.Tensor | None = None  # shared experts' output, run during the all-to-all

    @property
    def num_received(self) -> int:
        return self.sent[-1].num_received if self.sent else 0


class DedupTokenDispatcher(MoETokenDispatcher):
    plan_kind = "rank"
    routes_copies = True  # replicated placements: each pair to one copy (dispatch.copies)
    # Validate the routing in the row plan (a row needing more than M entries is an error).
    # Costs a host sync per dispatch: off by default; set it on an instance (or a subclass)
    # to check a new router.
    debug_checks = False

    def __init__(self, num_local_experts: int, local_expert_indices: list[int], config,
                 pg_collection=None, runtime: LayerRuntime | None = None, experts=None,
                 shared_experts=None):
        """`experts`: the layer's megatron-core experts, run here with `runtime.overlap`;
        `shared_experts`: run during the dispatch all-to-all (moe_shared_expert_overlap)."""
        super().__init__(config=config, pg_collection=pg_collection)
        if self.tp_size > 1:
            raise NotImplementedError("dedup dispatch with expert tensor parallelism")
        self.num_local_experts = num_local_experts
        self.ep_rank = utils.get_pg_rank(self.ep_group)
        self.runtime = runtime if runtime is not None else LayerRuntime()
        # Until the model sets its placement: one slot per expert column of `config` (the
        # physical slots when the layer holds copies, see SpecMoELayer).
        self.placement = Placement.contiguous(num_local_experts * self.ep_size, self.ep_size)
        self._handle: DispatchHandle | None = None
        if self.runtime.overlap and experts is None:
            raise ValueError("dispatch.overlap=true: the dedup dispatcher runs the layer's experts "
                             "itself and needs them at construction (experts=...)")
        self.experts, self.shared_experts = experts, shared_experts

    def supports(self, placement: Placement) -> bool:
        """Any placement of this layer's experts over this EP group."""
        return (placement.num_ranks == self.ep_size
                and placement.num_local == self.num_local_experts)

    def set_placement(self, placement: Placement) -> None:
        if not self.supports(placement):
            raise PlacementError(f"placement of {placement.num_experts} experts on "
                                 f"{placement.num_ranks} ranks does not fit EP size {self.ep_size}"
                                 f" with {self.num_local_experts} local experts")
        self.placement = placement

    # ---- dispatch ------------------------------------------------------------------------
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """hidden [S, B, H] (or [T, H]), routing_map [T, E] bool, probs [T, E] -> (x [T, H],
        probs [T, E]); the row plan goes into the handle (device only, no communication)."""
        laps = self.runtime.laps("dispatch", first=True)
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        ledger = self.runtime.recording_ledger()
        # Replicated experts: each (token, logical expert) pair to one physical copy; the plan
        # (and the ledger) then count physical rows. Unchanged without copies.
        topk = max_entries(self.config)
        phys_map, phys_probs, slots = route_to_copies(routing_map, probs, self.placement,
                                                      self.ep_rank, topk)
        plan = row_plan(phys_map, phys_probs, slots, self.plan_kind,
                        source_rank=self.ep_rank, topk=topk,
                        hidden_size=x_TH.shape[1], hidden_bytes=x_TH.element_size(),
                        modality_column=ledger is not None, debug_checks=self.debug_checks)
        modality_T = self.runtime.tokens.modality_T
        if modality_T is not None:
            modality_T = modality_T.to(x_TH.device)
        if ledger is not None:
            ledger.record_routing(self.runtime.layer_index, plan.expert_rows_RR,
                                  plan.floor_rows_RR, modality_T, plan.num_tokens,
                                  plan.token_nodes_T)
            if self.config.moe_expert_capacity_factor is not None:
                ledger.record_capacity(self.runtime.layer_index, *capacity_pairs(
                    routing_map, probs, self.config.moe_router_topk, modality_T))
        self._handle = DispatchHandle(plan, hidden_states.shape, modality_T,
                                      layer_input=None if self.shared_experts is None
                                      else hidden_states)
        laps.lap("layout")
        return x_TH, probs

    def token_dispatch(self, x_TH, probs):
        """Rows [N, H] and their metadata [N, 2M] (weights, then slots as floats) to the ranks
        of their experts; returns what this rank receives."""
        laps = self.runtime.laps("dispatch")
        h = self._handle
        if not self.runtime.overlap and self.shared_experts is None:
            rows, meta, sent = self._send_hop(x_TH, h.plan.hops[0], h.modality_T, laps)
            self._handle = dataclasses.replace(h, sent=(sent,))
            return rows, meta
        flight = self._send_hop(x_TH, h.plan.hops[0], h.modality_T, laps, asynchronous=True)
        self._handle = dataclasses.replace(h, sent=(flight.sent,),
                                           shared_out=self._shared_experts_now(h))
        if self.runtime.overlap:  # SpecMoELayer hands it to experts_local_first
            return flight, None
        return self._wait_hop(flight)

    def _shared_experts_now(self, h: DispatchHandle):
        """The shared experts on the layer input [S, B, H] while rows travel (None: none)."""
        if self.shared_experts is None:
            return None
        return run_shared_experts(self.shared_experts, h.layer_input)

    def _wait_hop(self, flight: HopInFlight):
        """Wait for a started hop -> (rows_XH, meta_XC), timed as the phase's collective."""
        laps = self.runtime.laps("dispatch")
        rows_XH, meta_XC, wait_s = flight.wait()
        laps.lap("collective", wait_s)
        return rows_XH, meta_XC

    def experts_local_first(self, flight: HopInFlight) -> torch.Tensor:
        """dispatch.overlap: dispatch_postprocess, the experts and combine_preprocess in one, on
        this rank's own rows while the remote rows travel, then on those -> [X, H] one row per
        received row (epruntime.dispatch.overlap.local_first)."""
        timer, layer = self.runtime.timing_timer(), self.runtime.layer_index
        if timer is not None:  # this replaces combine_preprocess, the combine's first method
            timer.count_call(layer, "forward", "combine")

        def span(phase, part, inp, out):
            if timer is not None:
                backward_node_span(timer, layer, phase, part, inp, out)

        return local_first(flight, self.experts, self.num_local_experts,
                           flight.sent.hop.max_entries, (self.runtime.laps, span))

    def _send_hop(self, x_TH: torch.Tensor, hop: Hop, modality_T: torch.Tensor | None,
                  laps=NULL_LAPS, asynchronous: bool = False):
        """One hop of the plan: exchange the counts, gather the rows (one per (token, rank) of
        x_TH's rows) with their entries, hand both to the all-to-all. -> (rows, meta, SentHop);
        asynchronous: the started exchange (HopInFlight, epruntime.dispatch.overlap).
        `laps` times its parts: wait (the counts), permute, collective."""
        ledger, layer = self.runtime.recording_ledger(), self.runtime.layer_index
        laps.barrier(self.ep_group)
        recv_R = exchange_counts(hop.splits_R, self.ep_group, self.runtime.transport)
        if ledger is not None:
            ledger.record_control(layer, hop.control_bytes_RR)
        # host sync: the all-to-all needs the split sizes on the host
        send_splits, recv_splits = torch.stack([hop.splits_R, recv_R]).tolist()
        laps.lap_first_collective()
        num_rows = sum(send_splits)
        token_N, dest_N = hop.rows(num_rows=num_rows)
        # (per-expert counts left out: the rows carry their slots, nothing reads them)
        layout = kernels.Layout.of_rows(hop.sends_TR, hop.splits_R, None, num_rows, token_N)
        rows_NH = kernels.permute_differentiable(x_TH, layout, self.runtime.kernels)
        self.runtime.time_backward("dispatch", "permute", x_TH, rows_NH)
        slot_NM, prob_NM = hop.entries(token_N, dest_N, self.runtime.kernels)
        columns = [prob_NM.float(), slot_NM.float()]
        if hop.modality_column:  # node dedup: the gateway counts its rows by modality
            known = modality_T if modality_T is not None else token_N.new_zeros(x_TH.shape[0])
            columns.append(known[token_N].float()[:, None])
        modality_rows = None
        if ledger is not None:
            if modality_T is not None:
                modality_rows = hop.modality_rows(modality_T)
            ledger.record_rows(layer, "dispatch", hop.rows_RR, hop.payload_row_bytes,
                               hop.meta_row_bytes, modality_rows)
        sent = SentHop(hop, tuple(send_splits), tuple(recv_splits), recv_R, layout, modality_rows)
        if hop.packed and not asynchronous:  # rows and metadata in one buffer, one copy
            payload = torch.cat([rows_NH, *columns], dim=1)
            laps.lap("permute")
            packed, wait_s = self._exchange(payload, sent, "dispatch")
            rows_XH, meta_XC = packed.split([rows_NH.shape[1], payload.shape[1] - rows_NH.shape[1]],
                                            dim=1)
            laps.lap("collective", wait_s)
            return rows_XH, meta_XC, sent
        meta_NC = torch.cat(columns, dim=1)
        if asynchronous:
            laps.lap("permute")
            flight = start_hop(rows_NH, meta_NC, sent, self.ep_rank,
                               lambda x: self._start_exchange(x, sent), self.runtime.transport)
            laps.lap("collective")
            return flight
        laps.lap("permute")  # rows and metadata differ in dtype: two collectives
        rows_XH, wait_s = self._exchange(rows_NH, sent, "dispatch")
        meta_XC, wait2_s = self._exchange(meta_NC, sent, "dispatch")
        laps.lap("collective", wait_s + wait2_s)
        return rows_XH, meta_XC, sent

    def _exchange(self, x_NC, sent: SentHop, phase: str, back: bool = False):
        """x_NC to the destination ranks of `sent` (back: from them, the reverse splits). ->
        (received rows, seconds the transport waited for its slowest peer, 0 if it can't tell).
        """
        send, recv = list(sent.send_splits), list(sent.recv_splits)
        if back:
            send, recv = recv, send
        transport = self.runtime.transport
        out = all_to_all(x_NC, send, recv, self.ep_group, transport,
                         self.runtime.collective_timing(phase))
        return out, last_wait_s(transport)

    def _start_exchange(self, x_NC, sent: SentHop):
        """Start `_exchange(x_NC, sent, "dispatch")` -> InFlight (waits: the group's timeout)."""
        return start_all_to_all(x_NC, sent.send_splits, sent.recv_splits, self.ep_group,
                                self.runtime.transport, self.runtime.collective_timing("dispatch"),
                                self.runtime.timeout_s)

    def dispatch_postprocess(self, rows_XH, meta_XC):
        """Received rows -> expert inputs [K, H] sorted by local slot, tokens per slot, weights
        [K]."""
        laps = self.runtime.laps("dispatch")
        m = self._handle.sent[-1].hop.max_entries
        prob_XM, slot_XM = meta_XC[:, :m], meta_XC[:, m:2 * m].detach().long()
        fan = fan_out(slot_XM, self.num_local_experts, self.runtime.kernels)
        self._handle = dataclasses.replace(self._handle, fan=fan)
        x_KH = rows_XH.index_select(0, fan.row_K)
        probs_K = prob_XM.reshape(-1).index_select(0, fan.entry_K)
        self.runtime.time_backward("dispatch", "permute", rows_XH, x_KH)
        laps.lap("permute")
        return x_KH, fan.tokens_per_slot, probs_K

    # ---- combine ---------------------------------------------------------------------------
    def combine_preprocess(self, out_KH):
        """Weighted expert outputs [K, H] -> one row per received row [X, H] (sum over slots)."""
        laps = self.runtime.laps("combine", first=True)
        h = self._handle
        rows_XH = out_KH.new_zeros(h.num_received, out_KH.shape[-1]).index_add_(0, h.fan.row_K,
                                                                                 out_KH)
        self.runtime.time_backward("combine", "combine", out_KH, rows_XH)
        laps.lap("combine")
        return rows_XH

    def token_combine(self, rows_XH):
        """Every received row goes back to its sender."""
        laps = self.runtime.laps("combine")
        return self._return_hop(rows_XH, self._handle.sent[0], laps)

    def _return_hop(self, rows_XH, sent: SentHop, laps=NULL_LAPS):
        """The reverse of one hop: rows_XH [X, H] (one per received row) -> [N, H] (one per sent
        row)."""
        ledger, layer = self.runtime.recording_ledger(), self.runtime.layer_index
        if ledger is not None:
            ledger.record_rows(layer, "combine", sent.recv_R, sent.hop.payload_row_bytes)
        laps.lap("combine")
        laps.barrier(self.ep_group)
        back, wait_s = self._exchange(rows_XH, sent, "combine", back=True)
        if ledger is not None and sent.modality_rows is not None:
            ledger.record_combine_modality(layer, sent.modality_rows)
        laps.lap("collective", wait_s)
        return back

    def combine_postprocess(self, back_NH):
        """One row per (token, rank) [N, H] -> per token sum (ascending rank order), in the
        input's shape."""
        laps = self.runtime.laps("combine")
        h = self._handle
        out = kernels.unpermute_combine_differentiable(back_NH, h.sent[0].layout,
                                                       backend=self.runtime.kernels)
        self.runtime.time_backward("combine", "combine", back_NH, out)
        laps.lap("combine")
        out = out.view(h.hidden_shape)
        if h.shared_out is not None:  # as MoELayer.postprocess adds them without overlap
            out = out + h.shared_out
        return out
