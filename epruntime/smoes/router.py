"""SMoESRouter: megatron-core's TopKRouter plus soft modality-guided expert specialization.

SMoES (arXiv 2604.23996). Routing itself is megatron-core's, under every router option of
model config (score function, expert bias, group-limited routing, aux-loss type, z-loss); this
router adds, per layer:
- a soft modality score M [T, 2] for every token (hard, attention-accumulated or Gaussian);
- EMA expert x modality counts C [2, E], summed over the data-parallel ranks, from which
  `rebin()` sorts experts by text preference into contiguous bins (bin k -> EP rank k);
- the inter-bin mutual-information loss L_MI and the bin-level balance loss L_bal, attached to
  the routing probabilities through megatron-core's MoEAuxLossAutoScaler (so they reach the
  backward pass the way its own aux loss does) and logged in its aux-loss tracker.
It is selected by `smoes.enabled` (see `build_router`), by ModuleSpec like any router.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from megatron.core.transformer.moe.router import TopKRouter

from epruntime.config import Config, SmoesConfig
from epruntime.runtime import TokenStream
from epruntime.smoes.attention import AttentionModality
from epruntime.smoes.bins import ExpertModalityCounts, assign_bins, counts_from_routing, text_preference
from epruntime.smoes.losses import BALANCE_LOSSES, mi_loss
from epruntime.smoes.scores import GaussianModalityStats, hard_scores


def _dp_group():
    return ps.get_data_parallel_group() if dist.is_initialized() else None


def gate_probs(logits_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """SMoES's gate g [T, E], a distribution over experts, from the router's score function:
    softmax(logits) (the paper's), or sigmoid scores normalised over the experts (DeepSeek-V3's
    gate, megatron-core's moe_router_score_function=sigmoid)."""
    if score_function == "sigmoid":
        s_TE = torch.sigmoid(logits_TE.float())
        return s_TE / s_TE.sum(dim=-1, keepdim=True)
    return F.softmax(logits_TE.float(), dim=-1)


class SMoESRouter(TopKRouter):
    def __init__(self, config, pg_collection=None, *, smoes: SmoesConfig, num_bins: int,
                 tokens: TokenStream, attention: AttentionModality | None = None):
        super().__init__(config=config, pg_collection=pg_collection)
        experts = config.num_moe_experts
        self.smoes, self.num_bins, self.attention = smoes, num_bins, attention
        self.tokens = tokens  # the model's token stream: the modality of this layer's tokens
        self.counts = ExpertModalityCounts(experts, smoes.count_beta)
        # Logical bins; before the first re-binning, megatron-core's contiguous placement.
        self.register_buffer("bin_of_expert", torch.arange(experts) // (experts // num_bins))
        self.gaussian = (GaussianModalityStats(config.hidden_size, smoes.gaussian_beta)
                         if smoes.score == "gaussian" else None)
        self.tau = smoes.tau or 0.5 * config.hidden_size
        self._hidden_TH: torch.Tensor | None = None

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        self._hidden_TH = input.reshape(-1, input.shape[-1])
        try:
            return super().forward(input, padding_mask)
        finally:
            self._hidden_TH = None

    def modality_scores(self, modality_SB: torch.Tensor) -> torch.Tensor:
        """M [S*B, 2] for this layer's tokens, in megatron's token order."""
        modality_T = modality_SB.reshape(-1)
        if self.smoes.score == "hard":
            M_T2 = hard_scores(modality_T)
        elif self.smoes.score == "gaussian":
            M_T2 = self.gaussian.scores(self._hidden_TH.detach(), self.tau)
            if self.training:
                self.gaussian.update(self._hidden_TH, modality_T, group=_dp_group())
        else:
            M_T2 = self.attention.advance()
        return M_T2.detach() if self.smoes.detach_scores else M_T2

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs_TE, routing_map_TE = super().routing(logits, padding_mask=padding_mask)
        modality_SB = self.tokens.modality_SB
        if modality_SB is None:
            raise RuntimeError("SMoESRouter needs the token modality: run it inside the model's "
                               "forward (TokenStream.forward)")
        M_T2 = self.modality_scores(modality_SB)
        if not self.training:
            return probs_TE, routing_map_TE

        with torch.no_grad():
            counts_2E = counts_from_routing(routing_map_TE, M_T2).double()
            if (group := _dp_group()) is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(counts_2E, group=group)
            self.counts.update(counts_2E.to(self.counts.C.dtype))

        s, b = modality_SB.shape
        experts = self.config.num_moe_experts
        g_TE = gate_probs(logits.view(-1, experts), self.config.moe_router_score_function)
        l_mi = mi_loss(M_T2.view(s, b, 2).transpose(0, 1), g_TE.view(s, b, experts).transpose(0, 1),
                       self.bin_of_expert, self.num_bins)
        l_bal = BALANCE_LOSSES[self.smoes.bal_form](g_TE, routing_map_TE, self.bin_of_expert,
                                                    self.num_bins, self.config.moe_router_topk)
        num_layers = self.config.num_layers
        save_to_aux_losses_tracker("smoes_mi_loss", l_mi.detach(), self.layer_number, num_layers)
        save_to_aux_losses_tracker("smoes_bal_loss", l_bal.detach(), self.layer_number, num_layers)
        if self.smoes.mi_coeff or self.smoes.bal_coeff:
            aux = self.smoes.mi_coeff * l_mi + self.smoes.bal_coeff * l_bal
            probs_TE = MoEAuxLossAutoScaler.apply(probs_TE, aux)
        return probs_TE, routing_map_TE

    @torch.no_grad()
    def rebin(self) -> torch.Tensor:
        """Re-cut the bins from the EMA counts (identical on every rank: C is globally summed)."""
        self.bin_of_expert.copy_(assign_bins(text_preference(self.counts.C), self.num_bins))
        return self.bin_of_expert


def build_router(cfg: Config, tokens: TokenStream) -> tuple[object | None,
                                                         AttentionModality | None]:
    """(router builder for the layer spec, attention tracker to attach to the decoder layers);
    (None, None) when SMoES is off (megatron-core's TopKRouter). Both read the modality of the
    tokens from the model's `tokens` stream."""
    if not cfg.smoes.enabled:
        return None, None
    attention = (AttentionModality(tokens, detach=cfg.smoes.detach_scores)
                 if cfg.smoes.score == "attention" else None)
    builder = functools.partial(SMoESRouter, smoes=cfg.smoes, num_bins=cfg.num_bins,
                                tokens=tokens, attention=attention)
    return builder, attention


def smoes_routers(model: torch.nn.Module) -> list[SMoESRouter]:
    return [m for m in model.modules() if isinstance(m, SMoESRouter)]
