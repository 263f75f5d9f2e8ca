"""megatron-core's own `MoEAlltoAllTokenDispatcher`, counted by the same CommLedger.

Nothing of megatron-core's dispatch changes: the subclass reads the tensors and split lists that
megatron-core hands to its all-to-all, so the baseline's bytes are measured exactly as
epruntime's dispatchers' are. The routing counts (per-expert rows, the dedup floor), the control
bytes (megatron-core's all-gather of [E] int64 counts) and the rows by modality come from the
row plan (`epruntime.dispatch.plan`, kind "expert"), which is built only while the ledger
records. Its placement is megatron-core's contiguous one. The base is the CPU-safe alltoall
dispatcher (`epruntime.compat.dispatcher`), megatron-core's own on CUDA.

The PhaseTimer (`epruntime.dispatch.timing`) times each phase method around megatron-core's
code: its `preprocess` (the all-gather of the routing counts, the first blocking collective) is
the `wait`, the permutes and sorts `permute`, the all-to-alls `collective`, the unpermute
`combine`; the backward through tensor hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import utils

from epruntime.compat.dispatcher import CpuAlltoAllTokenDispatcher
from epruntime.dispatch.capacity import capacity_pairs
from epruntime.dispatch.ledger import row_bytes
from epruntime.dispatch.plan import RowPlan, row_plan
from epruntime.dispatch.timing import NULL_LAPS
from epruntime.placement import Placement, PlacementError
from epruntime.runtime import LayerRuntime


@dataclass(frozen=True, eq=False)
class LedgerHandle:
    """What the ledger needs from dispatch_preprocess in token_dispatch and token_combine."""

    plan: RowPlan
    modality_rows: torch.Tensor | None  # [2, R, R] rows by their token's modality; None: unknown


class LedgeredAlltoAllDispatcher(CpuAlltoAllTokenDispatcher):
    def __init__(self, num_local_experts: int, local_expert_indices: list[int], config,
                 pg_collection=None, runtime: LayerRuntime | None = None):
        super().__init__(num_local_experts, local_expert_indices, config=config,
                         pg_collection=pg_collection)
        self.runtime = runtime if runtime is not None else LayerRuntime()
        self._handle: LedgerHandle | None = None  # set while the ledger records
        self._laps = NULL_LAPS  # the forward laps of dispatch_preprocess, while it runs

    def supports(self, placement: Placement) -> bool:
        """megatron-core places experts contiguously."""
        return placement.is_contiguous

    def set_placement(self, placement: Placement) -> None:
        if not self.supports(placement):
            raise PlacementError("megatron-core's alltoall dispatcher only supports contiguous "
                                 "placement; use dispatch.kind=dedup")

    def preprocess(self, routing_map):
        """megatron-core's; its all-gather of the routing counts is this phase's `wait`."""
        self._laps.lap("layout")
        out = super().preprocess(routing_map)
        self._laps.lap("wait")
        return out

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self._laps = laps = self.runtime.laps("dispatch", first=True)
        if self.runtime.timing_timer() is not None and hidden_states.requires_grad:
            # The layer's input also feeds the router: time the permute's backward from an
            # alias only it consumes, not until the router's backward is done as well.
            hidden_states = hidden_states.view_as(hidden_states)
        try:
            out = super().dispatch_preprocess(hidden_states, routing_map, probs)
        finally:
            self._laps = NULL_LAPS
        self.runtime.time_backward("dispatch", "permute", hidden_states, out[0])
        laps.lap("permute")
        ledger, self._handle = self.runtime.recording_ledger(), None
        if ledger is not None:
            plan = row_plan(routing_map, None,
                            Placement.contiguous(self.config.num_moe_experts, self.ep_size),
                            "expert", source_rank=utils.get_pg_rank(self.ep_group),
                            topk=self.config.moe_router_topk,
                            hidden_size=hidden_states.shape[-1],
                            hidden_bytes=hidden_states.element_size(),
                            prob_bytes=probs.element_size())
            modality_T = self.runtime.tokens.modality_T
            modality_rows = None
            if modality_T is not None:
                modality_T = modality_T.to(routing_map.device)
                modality_rows = plan.hops[0].modality_rows(modality_T)
            layer = self.runtime.layer_index
            ledger.record_control(layer, plan.control_bytes_RR)
            ledger.record_routing(layer, plan.expert_rows_RR, plan.floor_rows_RR, modality_T,
                                  plan.num_tokens, plan.token_nodes_T)
            if self.config.moe_expert_capacity_factor is not None:
                ledger.record_capacity(layer, *capacity_pairs(
                    routing_map, probs, self.config.moe_router_topk, modality_T))
            self._handle = LedgerHandle(plan, modality_rows)
        laps.lap("layout")  # the ledger's row plan, while it records (not megatron-core's cost)
        return out

    def _splits(self, splits, rows: int) -> list[int]:
        """megatron-core's split list. None means even splits (the all-to-all's default): at EP
        1 everything stays; padding to capacity sends every rank C rows per expert."""
        if splits is not None:
            return [int(s) for s in splits]
        return [rows // self.ep_size] * self.ep_size

    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        laps = self.runtime.laps("dispatch")
        laps.barrier(self.ep_group)
        out = super().token_dispatch(permutated_local_input_tokens, permuted_probs)
        self.runtime.time_backward("dispatch", "collective", permutated_local_input_tokens, out[0],
                                   self.ep_group)
        self.runtime.time_backward("dispatch", "collective", permuted_probs, out[1])
        ledger, h = self.runtime.recording_ledger(), self._handle
        if ledger is not None and h is not None:  # host splits only after megatron-core's sync
            tokens, probs = permutated_local_input_tokens, permuted_probs
            ledger.record_rows(self.runtime.layer_index, "dispatch",
                               self._splits(self.input_splits, tokens.shape[0]),
                               row_bytes(tokens), row_bytes(probs), h.modality_rows)
        laps.lap("collective")
        return out

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        laps = self.runtime.laps("dispatch")
        out = super().dispatch_postprocess(global_input_tokens, global_probs)
        self.runtime.time_backward("dispatch", "permute", global_input_tokens, out[0])
        laps.lap("permute")
        return out

    def combine_preprocess(self, hidden_states):
        laps = self.runtime.laps("combine", first=True)
        out = super().combine_preprocess(hidden_states)
        self.runtime.time_backward("combine", "permute", hidden_states, out)
        laps.lap("permute")
        return out

    def combine_postprocess(self, permutated_local_input_tokens):
        laps = self.runtime.laps("combine")
        out = super().combine_postprocess(permutated_local_input_tokens)
        self.runtime.time_backward("combine", "combine", permutated_local_input_tokens, out)
        laps.lap("combine")
        return out

    def token_combine(self, hidden_states, *args, **kwargs):
        laps = self.runtime.laps("combine")
        ledger, h = self.runtime.recording_ledger(), self._handle
        if ledger is not None and h is not None:
            ledger.record_rows(self.runtime.layer_index, "combine",
                               self._splits(self.output_splits, hidden_states.shape[0]),
                               row_bytes(hidden_states))
        laps.barrier(self.ep_group)
        out = super().token_combine(hidden_states, *args, **kwargs)
        self.runtime.time_backward("combine", "collective", hidden_states, out, self.ep_group)
        if ledger is not None and h is not None and h.modality_rows is not None:
            ledger.record_combine_modality(self.runtime.layer_index, h.modality_rows)
        laps.lap("collective")
        return out
