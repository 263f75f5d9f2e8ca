"""SMoES evaluation metrics: modality specialization index (MSI) and load balancedness.

SMoES: Soft Modality-guided Expert Specialization (arXiv 2604.23996) reports MSI (baseline
.177 -> SMoES .487). Here MSI is the normalised mutual information I(modality; group) /
H(modality) over routed (token, expert) assignments, where a group is an expert or a bin.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from epruntime.smoes.scores import NUM_MODALITIES, check_modality


def msi(assignments_modality_T: Tensor, group_T: Tensor, num_groups: int) -> float:
    """Modality specialization index in [0, 1] = I(modality; group) / H(modality).

    Each entry is one routed (token, expert) assignment: its token's modality (0 text,
    1 vision) and its group id in [0, num_groups). 0 when group is independent of modality,
    1 when every group serves a single modality. Defined as 0 when H(modality) = 0 (one
    modality only, or no assignments): there is nothing to specialise on.
    """
    check_modality(assignments_modality_T, "assignments_modality_T")
    if group_T.shape != assignments_modality_T.shape:
        raise ValueError(f"group_T must match assignments_modality_T "
                         f"{tuple(assignments_modality_T.shape)}, got {tuple(group_T.shape)}")
    if group_T.numel() and (group_T.min() < 0 or group_T.max() >= num_groups):
        raise ValueError(f"group_T must lie in [0, {num_groups}), got values in "
                         f"[{int(group_T.min())}, {int(group_T.max())}]")
    flat = assignments_modality_T.long().flatten() * num_groups + group_T.long().flatten()
    joint = torch.bincount(flat, minlength=NUM_MODALITIES * num_groups)
    return msi_from_joint(joint.view(NUM_MODALITIES, num_groups))


def msi_from_joint(counts_MG: Tensor) -> float:
    """MSI from assignment counts [2, G] (modality x group); see `msi`."""
    n = float(counts_MG.sum())
    if n == 0:
        return 0.0
    P_MG = counts_MG.double() / n
    P_M1, P_1G = P_MG.sum(1, keepdim=True), P_MG.sum(0, keepdim=True)
    h_mod = -float(torch.special.xlogy(P_M1, P_M1).sum())
    if h_mod <= 0.0:
        return 0.0
    nz = P_MG > 0
    mi = float((P_MG[nz] * (P_MG / (P_M1 * P_1G))[nz].log()).sum())
    return min(max(mi / h_mod, 0.0), 1.0)


def msi_from_routing(routing_map_TE: Tensor, modality_T: Tensor, group_of_expert_E: Tensor,
                     num_groups: int) -> float:
    """MSI from a routing map [T, E] (bool), modality ids [T] and each expert's group [E]
    (a `bin_of_expert_E`, or `torch.arange(E)` for expert-level MSI)."""
    if routing_map_TE.dim() != 2 or modality_T.shape != routing_map_TE.shape[:1]:
        raise ValueError(f"expected routing_map [T, E] and modality [T]; got "
                         f"{tuple(routing_map_TE.shape)} and {tuple(modality_T.shape)}")
    token_idx, expert_idx = routing_map_TE.nonzero(as_tuple=True)
    return msi(modality_T[token_idx], group_of_expert_E[expert_idx], num_groups)


def balancedness(load_K: Tensor | Sequence[float]) -> float:
    """mean(load) / max(load) in (0, 1]; 1.0 is perfectly balanced, and so is all-zero load."""
    load = torch.as_tensor(load_K, dtype=torch.float64).flatten()
    if load.numel() == 0:
        raise ValueError("load_K must not be empty")
    if bool((load < 0).any()):
        raise ValueError(f"load_K must be nonnegative, got {load.tolist()}")
    peak = float(load.max())
    return 1.0 if peak == 0.0 else float(load.mean()) / peak
