"""megatron-core's own `MoEAlltoAllTokenDispatcher`, counted by the same CommLedger.

Nothing of megatron-core's dispatch changes: the subclass reads the tensors and split lists that
megatron-core hands to its all-to-all, so the baseline's bytes are measured exactly as
epruntime's dispatchers' are. The routing counts (per-expert rows, the dedup floor), the control
bytes (megatron-core's all-gather of [E] int64 counts) and the rows by modality come from the
row plan (`epruntime.dispatch.plan`, kind "expert"), which is built only while the ledger
records. Its placement is megatron-core's contiguous one. The base is the CPU-safe alltoall
dispatcher (`epruntime.compat.dispatcher`), megatron-core's own on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import utils

from epruntime.compat.dispatcher import CpuAlltoAllTokenDispatcher
from epruntime.dispatch.ledger import row_bytes
from epruntime.dispatch.plan import RowPlan, row_plan
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

    def supports(self, placement: Placement) -> bool:
        """megatron-core places experts contiguously."""
        return placement.is_contiguous

    def set_placement(self, placement: Placement) -> None:
        if not self.supports(placement):
            raise PlacementError("megatron-core's alltoall dispatcher only supports contiguous "
                                 "placement; use dispatch.kind=dedup")

    def _ledger(self):
        ledger = self.runtime.ledger
        return ledger if ledger is not None and ledger.enabled else None

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        out = super().dispatch_preprocess(hidden_states, routing_map, probs)
        ledger, self._handle = self._ledger(), None
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
                                  plan.num_tokens)
            self._handle = LedgerHandle(plan, modality_rows)
        return out

    @staticmethod
    def _splits(splits, rows: int) -> list[int]:
        """megatron-core's split list (None at EP 1: everything stays)."""
        return [rows] if splits is None else [int(s) for s in splits]

    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        out = super().token_dispatch(permutated_local_input_tokens, permuted_probs)
        ledger, h = self._ledger(), self._handle
        if ledger is not None and h is not None:  # host splits only after megatron-core's sync
            tokens, probs = permutated_local_input_tokens, permuted_probs
            ledger.record_rows(self.runtime.layer_index, "dispatch",
                               self._splits(self.input_splits, tokens.shape[0]),
                               row_bytes(tokens), row_bytes(probs), h.modality_rows)
        return out

    def token_combine(self, hidden_states, *args, **kwargs):
        ledger, h = self._ledger(), self._handle
        if ledger is not None and h is not None:
            ledger.record_rows(self.runtime.layer_index, "combine",
                               self._splits(self.output_splits, hidden_states.shape[0]),
                               row_bytes(hidden_states))
        out = super().token_combine(hidden_states, *args, **kwargs)
        if ledger is not None and h is not None and h.modality_rows is not None:
            ledger.record_combine_modality(self.runtime.layer_index, h.modality_rows)
        return out
