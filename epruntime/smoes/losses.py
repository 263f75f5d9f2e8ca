"""Differentiable SMoES router losses: inter-bin mutual information and bin-level balance.

SMoES: Soft Modality-guided Expert Specialization (arXiv 2604.23996). Each function is one
layer's term; the caller sums over layers and weights them (paper: 0.001 L_bal + 0.0001 L_MI).
Notation: B samples, S tokens per sample, T tokens, E experts, K = num_bins bins,
N_B = E / K experts per bin, g = router softmax probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor

from epruntime.smoes.bins import bin_members
from epruntime.smoes.scores import NUM_MODALITIES


def _bin_matrix_EK(bin_of_expert_E: Tensor, num_bins: int, dtype: torch.dtype) -> Tensor:
    """One-hot [E, K] membership matrix; validates that bins are equal-sized."""
    bin_members(bin_of_expert_E, num_bins)
    return torch.nn.functional.one_hot(bin_of_expert_E.long(), num_bins).to(dtype)


def bin_scores(M_BS2: Tensor, probs_BSE: Tensor, bin_of_expert_E: Tensor,
               num_bins: int) -> Tensor:
    """S_BMK [B, 2, K]: S[i, m, k] = sum_{e in B_k} sum_j M[ij, m] g[ij, e] / (N_B sum_j M[ij, m]).

    M_BS2 [B, S, 2] soft modality scores, probs_BSE [B, S, E] router probabilities (2-D inputs
    [S, 2] / [S, E] are one sample). S[i, m] is the mean bin probability of modality m's tokens
    in sample i, divided by N_B. If modality m is absent from sample i (sum_j M[ij, m] = 0) its
    row S[i, m, :] is zeros, so it adds no mass to the joint of `mutual_information`. Rows of M
    set to zero (padding) drop those tokens.
    """
    if M_BS2.dim() == 2:
        M_BS2, probs_BSE = M_BS2.unsqueeze(0), probs_BSE.unsqueeze(0)
    B, S, E = probs_BSE.shape
    if M_BS2.shape != (B, S, NUM_MODALITIES) or bin_of_expert_E.shape != (E,):
        raise ValueError(f"expected M [B, S, 2], probs [B, S, E], bin_of_expert [E]; got "
                         f"{tuple(M_BS2.shape)}, {tuple(probs_BSE.shape)}, "
                         f"{tuple(bin_of_expert_E.shape)}")
    M_BS2 = M_BS2.to(probs_BSE.dtype)
    onehot_EK = _bin_matrix_EK(bin_of_expert_E, num_bins, probs_BSE.dtype)
    mass_BMK = torch.einsum("bsm,bse,ek->bmk", M_BS2, probs_BSE, onehot_EK)
    denom_BM1 = (E // num_bins) * M_BS2.sum(1).unsqueeze(-1)
    present = denom_BM1 > 0
    safe = torch.where(present, denom_BM1, torch.ones_like(denom_BM1))
    return torch.where(present, mass_BMK / safe, torch.zeros_like(mass_BMK))


def mutual_information(P_BMK: Tensor, eps: float = 1e-12) -> Tensor:
    """I_B [B]: mutual information (nats) between modality m and bin k per sample.

    P_BMK [B, 2, K] nonnegative scores (e.g. `bin_scores`), normalised here over (m, k) to a
    joint P_i(m, k); an already-normalised joint passes through unchanged.
    I_i = sum_{m,k} P log(P / (P(m) P(k))), with 0 log 0 = 0. Logs take clamp(., eps), so
    zero cells give zero terms with finite gradients; an all-zero sample gives I = 0.
    """
    total_B11 = P_BMK.sum(dim=(1, 2), keepdim=True)
    P = P_BMK / torch.where(total_B11 > 0, total_B11, torch.ones_like(total_B11))
    P_m = P.sum(2, keepdim=True)
    P_k = P.sum(1, keepdim=True)
    log_ratio = P.clamp_min(eps).log() - P_m.clamp_min(eps).log() - P_k.clamp_min(eps).log()
    return (P * log_ratio).sum(dim=(1, 2))


def mi_loss(M_BS2: Tensor, probs_BSE: Tensor, bin_of_expert_E: Tensor, num_bins: int) -> Tensor:
    """L_MI for one layer: scalar -mean_i I_i of the bin scores (shapes as `bin_scores`).

    Samples holding a single modality have I_i = 0 and still count in the mean. Gradients flow
    into M too if it requires grad; pass M detached to use it as a fixed guide.
    """
    return -mutual_information(bin_scores(M_BS2, probs_BSE, bin_of_expert_E, num_bins)).mean()


def _balance_inputs(probs_TE: Tensor, routing_map_TE: Tensor, bin_of_expert_E: Tensor,
                    num_bins: int, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(f_E, P_E, onehot_EK) after validating shapes: f_e = count_e / (T * topk), the share of
    routed (token, expert) assignments on expert e; P_e = mean_t g[t, e]."""
    T, E = probs_TE.shape
    if routing_map_TE.shape != (T, E) or bin_of_expert_E.shape != (E,):
        raise ValueError(f"expected probs [T, E], routing_map [T, E], bin_of_expert [E]; got "
                         f"{tuple(probs_TE.shape)}, {tuple(routing_map_TE.shape)}, "
                         f"{tuple(bin_of_expert_E.shape)}")
    if topk <= 0:
        raise ValueError(f"topk must be positive, got {topk}")
    onehot_EK = _bin_matrix_EK(bin_of_expert_E, num_bins, probs_TE.dtype)
    f_E = routing_map_TE.to(probs_TE.dtype).sum(0) / (max(T, 1) * topk)
    P_E = probs_TE.mean(0) if T else probs_TE.sum(0)
    return f_E, P_E, onehot_EK


def bin_balance_loss(probs_TE: Tensor, routing_map_TE: Tensor, bin_of_expert_E: Tensor,
                     num_bins: int, topk: int) -> Tensor:
    """Bin-level balance loss for one layer (scalar), per bin (DESIGN.md, `smoes.bal_form=bin`):

        L_bal = N_B * sum_k F_k P_k,
        F_k = sum_{e in B_k} count_e / (T * topk)   share of assignments landing in bin k,
        P_k = mean_t sum_{e in B_k} g[t, e]         mean router mass on bin k's experts.

    probs_TE [T, E] router probabilities (differentiable), routing_map_TE [T, E] bool. It
    balances load across bins (= EP ranks under `bins` placement), not inside them, so it
    depends on the binning. Uniform routing gives N_B / K (= E / K^2): N_B times the scale of
    the expert-level form below. If some tokens route to fewer than `topk` experts, the F_k sum
    to less than 1.
    """
    f_E, P_E, onehot_EK = _balance_inputs(probs_TE, routing_map_TE, bin_of_expert_E, num_bins,
                                          topk)
    F_K, P_K = f_E @ onehot_EK, P_E @ onehot_EK
    return (probs_TE.shape[1] // num_bins) * (F_K * P_K).sum()


def expert_balance_loss(probs_TE: Tensor, routing_map_TE: Tensor, bin_of_expert_E: Tensor,
                        num_bins: int, topk: int) -> Tensor:
    """The earlier form, kept for comparison (`smoes.bal_form=expert`), scalar:

        L = sum_k N_B * sum_{e in B_k} f_e P_e   (f_e, P_e as in `bin_balance_loss`'s F, P
                                                   for single experts)

    The bins partition the experts, so this is N_B * sum_e f_e P_e: megatron-core's
    expert-level aux loss (up to its coefficient) times N_B, whatever the bins are.
    """
    f_E, P_E, onehot_EK = _balance_inputs(probs_TE, routing_map_TE, bin_of_expert_E, num_bins,
                                          topk)
    return (probs_TE.shape[1] // num_bins) * ((f_E * P_E) @ onehot_EK).sum()


# smoes.bal_form -> the loss it selects
BALANCE_LOSSES = {"bin": bin_balance_loss, "expert": expert_balance_loss}
