"""Momentum-adaptive expert binning for SMoES.

SMoES: Soft Modality-guided Expert Specialization (arXiv 2604.23996). EMA counts of how much
of each modality every expert receives give each expert a text preference; experts sorted by it
are cut into `num_bins` contiguous bins (one bin per EP rank: bin k lives on rank k).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from epruntime.smoes.scores import NUM_MODALITIES, hard_scores


def counts_from_routing(routing_map_TE: Tensor, modality: Tensor) -> Tensor:
    """Soft expert x modality counts [2, E]: C[m, e] = sum_t M[t, m] * routing_map[t, e].

    `modality` is either soft scores M_T2 [T, 2] (float) or modality ids [T] (int, taken as
    one-hot). routing_map_TE is [T, E] bool (True = token t is routed to expert e).
    """
    M_T2 = hard_scores(modality) if modality.dim() == 1 else modality
    if M_T2.dim() != 2 or M_T2.shape != (routing_map_TE.shape[0], NUM_MODALITIES):
        raise ValueError(f"modality must be [T] ids or M [T, 2] with T = {routing_map_TE.shape[0]},"
                         f" got {tuple(modality.shape)}")
    return M_T2.detach().t() @ routing_map_TE.to(M_T2.dtype)


class ExpertModalityCounts(torch.nn.Module):
    """EMA expert x modality counts, buffer `C` [2, E]: C <- beta * C + (1 - beta) * counts."""

    C: Tensor

    def __init__(self, num_experts: int, beta: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"smoes beta must be in [0, 1), got {beta}")
        self.num_experts, self.beta = num_experts, beta
        self.register_buffer("C", torch.zeros(NUM_MODALITIES, num_experts))

    @torch.no_grad()
    def update(self, counts_2E: Tensor) -> None:
        """Fold one step's counts [2, E] (e.g. from `counts_from_routing`) into C."""
        if counts_2E.shape != self.C.shape:
            raise ValueError(f"counts_2E must be {tuple(self.C.shape)}, "
                             f"got {tuple(counts_2E.shape)}")
        self.C.mul_(self.beta).add_(counts_2E.to(self.C.dtype), alpha=1.0 - self.beta)

    @torch.no_grad()
    def sync_(self, group: dist.ProcessGroup | None = None) -> None:
        """Average C over the ranks of `group`, so every rank derives the same bins.
        No-op when torch.distributed is not initialized."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.C, op=dist.ReduceOp.SUM, group=group)
            self.C.div_(dist.get_world_size(group))


def text_preference(C_2E: Tensor) -> Tensor:
    """f_E = C[text] / (C[text] + C[vision]); 0.5 for an expert that has seen no tokens."""
    total_E = C_2E[0] + C_2E[1]
    seen = total_E > 0
    return torch.where(seen, C_2E[0] / torch.where(seen, total_E, torch.ones_like(total_E)),
                       torch.full_like(total_E, 0.5))


def _check_bins(num_experts: int, num_bins: int) -> int:
    if num_bins <= 0 or num_experts % num_bins:
        raise ValueError(f"smoes.num_bins ({num_bins}) must be a positive divisor of the number "
                         f"of experts ({num_experts})")
    return num_experts // num_bins


def assign_bins(f_E: Tensor, num_bins: int) -> Tensor:
    """bin_of_expert_E (int64 [E]): experts sorted by ascending text preference f (stable, so
    ties keep expert-id order), cut into `num_bins` contiguous bins of E / num_bins experts.
    Bin 0 holds the most vision-leaning experts, bin num_bins - 1 the most text-leaning."""
    per_bin = _check_bins(f_E.numel(), num_bins)
    order_E = torch.sort(f_E, stable=True).indices
    bin_of_expert_E = torch.empty(f_E.numel(), dtype=torch.int64, device=f_E.device)
    bin_of_expert_E[order_E] = torch.arange(f_E.numel(), device=f_E.device) // per_bin
    return bin_of_expert_E


def bin_members(bin_of_expert_E: Tensor, num_bins: int) -> Tensor:
    """[num_bins, E / num_bins] expert ids of each bin, ascending id within a bin."""
    E = bin_of_expert_E.numel()
    per_bin = _check_bins(E, num_bins)
    sizes = torch.bincount(bin_of_expert_E, minlength=num_bins)
    if sizes.numel() != num_bins or bool((sizes != per_bin).any()):
        raise ValueError(f"bin_of_expert_E must put {per_bin} experts in each of {num_bins} "
                         f"bins, got sizes {sizes.tolist()}")
    key_E = bin_of_expert_E * E + torch.arange(E, device=bin_of_expert_E.device)
    return torch.argsort(key_E).view(num_bins, per_bin)
