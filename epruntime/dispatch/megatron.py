"""megatron-core's own `MoEAlltoAllTokenDispatcher`, counted by the same CommLedger.

Nothing of megatron-core's dispatch changes: the subclass only reads the tensors and split lists
that megatron-core hands to its all-to-all, so the baseline is measured exactly as epruntime's
dispatchers are. Its placement is megatron-core's contiguous one.
"""

from __future__ import annotations

from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from epruntime.model.context import current_modality_T
from epruntime.placement import Placement, PlacementError


class LedgeredAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_index = 0
        self.ledger = None

    def set_placement(self, placement: Placement) -> None:
        if not placement.is_contiguous:
            raise PlacementError("megatron-core's alltoall dispatcher only supports contiguous "
                                 "placement; use dispatch.kind=dedup")

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        out = super().dispatch_preprocess(hidden_states, routing_map, probs)
        if self.ledger is not None:
            t = routing_map.shape[0]
            used_TRL = routing_map.view(t, self.ep_size, self.num_local_experts)
            modality_T = current_modality_T()
            self._modality_T = modality_T if modality_T is not None and modality_T.numel() == t else None
            if self.ep_size > 1:  # megatron-core all-gathers the [E] int64 counts of every rank
                self.ledger.record_control(self.layer_index,
                                           [routing_map.shape[1] * 8] * self.ep_size)
            self.ledger.record_routing(self.layer_index, used_TRL.sum(dim=(0, 2)),
                                       used_TRL.any(dim=2).sum(0), self._modality_T, t)
        return out

    def _splits(self, splits, rows: int) -> list[int]:
        return [rows] if splits is None else [int(s) for s in splits]

    def _row_modality(self):
        if self._modality_T is None:
            return None
        return self._modality_T[self.reversed_local_input_permutation_mapping.cpu()]

    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        out = super().token_dispatch(permutated_local_input_tokens, permuted_probs)
        if self.ledger is not None:  # splits are host lists only after megatron-core's sync
            self.ledger.record_exchange(
                self.layer_index, "dispatch",
                self._splits(self.input_splits, permutated_local_input_tokens.shape[0]),
                permutated_local_input_tokens, permuted_probs, self._row_modality())
        return out

    def token_combine(self, hidden_states, *args, **kwargs):
        if self.ledger is not None:
            self.ledger.record_exchange(self.layer_index, "combine",
                                        self._splits(self.output_splits, hidden_states.shape[0]),
                                        hidden_states)
        out = super().token_combine(hidden_states, *args, **kwargs)
        if self.ledger is not None and self._modality_T is not None:
            self.ledger.record_return_modality(
                self.layer_index, self._splits(self.input_splits, out.shape[0]), self._row_modality())
        return out
