"""Soft modality scores for SMoES routing.

SMoES: Soft Modality-guided Expert Specialization (arXiv 2604.23996). Every scorer returns
`M_T2` (or `M_BS2`): one row per token, column 0 = text, column 1 = vision, rows summing to 1.
Modality ids are int64: 0 text, 1 vision.

Three scorers, as in the paper:
- `hard_scores`: one-hot of the input modality (the baseline).
- `attention_accumulate`: modality mass carried by attention, mixed into the residual stream.
- `GaussianModalityStats`: per-modality diagonal Gaussians of the hidden states, scored by
  log-likelihood under a temperature softmax.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from epruntime.modality import TEXT, VISION  # noqa: F401  (re-exported)

NUM_MODALITIES = 2


def check_modality(modality_T: Tensor, name: str = "modality_T") -> None:
    if modality_T.dtype == torch.bool or modality_T.is_floating_point():
        raise TypeError(f"{name} must be an integer tensor of 0 (text) / 1 (vision), "
                        f"got dtype {modality_T.dtype}")
    if modality_T.numel() and (modality_T.min() < 0 or modality_T.max() > 1):
        raise ValueError(f"{name} must hold only 0 (text) or 1 (vision), got values in "
                         f"[{int(modality_T.min())}, {int(modality_T.max())}]")


def hard_scores(modality_T: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot modality scores: [T] int64 ids -> M_T2 [T, 2] (any leading shape is kept)."""
    check_modality(modality_T)
    return torch.nn.functional.one_hot(modality_T.long(), NUM_MODALITIES).to(dtype)


def attention_accumulate(M_BS2: Tensor, attn_probs_BSS: Tensor, attn_out_norm_BS: Tensor,
                         residual_norm_BS: Tensor) -> Tensor:
    """One layer of attention-accumulated modality scores.

    Shapes (a leading batch dim B is optional; without it every tensor is one sample):
      M_BS2            [B, S, 2]  scores entering the layer (M^(0) = `hard_scores`).
      attn_probs_BSS   [B, S, S]  attention probabilities averaged over heads; row = query.
      attn_out_norm_BS [B, S]     |x_attn|, norm of the attention output per token.
      residual_norm_BS [B, S]     |x|, norm of the residual stream entering the layer.
    Returns M_next [B, S, 2]:
      M~ = A @ M;  M_next = (|x_attn| * M~ + |x| * M) / (|x_attn| + |x|)  per token,
    mirroring x^(l+1) = x^(l) + x_attn^(l). Where |x_attn| + |x| == 0 the token keeps M.
    """
    unbatched = M_BS2.dim() == 2
    if unbatched:
        M_BS2, attn_probs_BSS = M_BS2.unsqueeze(0), attn_probs_BSS.unsqueeze(0)
        attn_out_norm_BS = attn_out_norm_BS.unsqueeze(0)
        residual_norm_BS = residual_norm_BS.unsqueeze(0)
    B, S, two = M_BS2.shape
    if two != NUM_MODALITIES or attn_probs_BSS.shape != (B, S, S):
        raise ValueError(f"expected M [B, S, 2] and attn_probs [B, S, S]; got M "
                         f"{tuple(M_BS2.shape)} and attn_probs {tuple(attn_probs_BSS.shape)}")
    if attn_out_norm_BS.shape != (B, S) or residual_norm_BS.shape != (B, S):
        raise ValueError(f"expected norms [B, S] = [{B}, {S}]; got attn_out_norm "
                         f"{tuple(attn_out_norm_BS.shape)}, "
                         f"residual_norm {tuple(residual_norm_BS.shape)}")
    mixed_BS2 = torch.bmm(attn_probs_BSS.to(M_BS2.dtype), M_BS2)
    w_attn = attn_out_norm_BS.to(M_BS2.dtype).unsqueeze(-1)
    w_res = residual_norm_BS.to(M_BS2.dtype).unsqueeze(-1)
    denom = w_attn + w_res
    zero = denom == 0
    out = (w_attn * mixed_BS2 + w_res * M_BS2) / torch.where(zero, torch.ones_like(denom), denom)
    out = torch.where(zero, M_BS2, out)
    return out.squeeze(0) if unbatched else out


class GaussianModalityStats(torch.nn.Module):
    """Per-modality diagonal Gaussian of one layer's hidden states, EMA-Welford updated.

    Buffers (saved in state_dict): `mu` [2, D], `var` [2, D], `initialized` [2] bool.

    For each modality m present in a batch, with batch mean `mean_b` and (population) batch
    variance `var_b` of that modality's tokens, and delta = mean_b - mu:
        mu  <- beta * mu  + (1 - beta) * mean_b
        var <- beta * var + (1 - beta) * var_b + beta * (1 - beta) * delta^2
    Why: the new statistics are those of the mixture "old Gaussian with weight beta, batch with
    weight 1 - beta". A mixture's mean is the weighted mean; its variance is the weighted
    within-component variance plus the weighted spread of component means around the new mean:
    beta * ((1-beta) delta)^2 + (1-beta) * (beta delta)^2 = beta (1-beta) delta^2. This is
    Welford's parallel combine with weights (beta, 1-beta) in place of counts.
    A modality's first batch initialises it (mu = mean_b, var = var_b). Stored values are the
    exact EMA; `var` is floored at `eps` where it is used.
    """

    mu: Tensor
    var: Tensor
    initialized: Tensor

    def __init__(self, hidden_size: int, beta: float = 0.99, eps: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"smoes beta must be in [0, 1), got {beta}")
        self.hidden_size, self.beta, self.eps = hidden_size, beta, eps
        self.register_buffer("mu", torch.zeros(NUM_MODALITIES, hidden_size))
        self.register_buffer("var", torch.ones(NUM_MODALITIES, hidden_size))
        self.register_buffer("initialized", torch.zeros(NUM_MODALITIES, dtype=torch.bool))

    @torch.no_grad()
    def update(self, x_TD: Tensor, modality_T: Tensor,
               group: dist.ProcessGroup | None = None) -> None:
        """Fold a batch of hidden states x_TD [T, D] with modality ids [T] into the stats.

        With `group`, the batch moments are summed over its ranks first, so every rank folds in
        the same global batch and the stats stay identical (and equal to one process's)."""
        if x_TD.dim() != 2 or x_TD.shape[1] != self.hidden_size:
            raise ValueError(f"x_TD must be [T, {self.hidden_size}], got {tuple(x_TD.shape)}")
        if modality_T.shape != x_TD.shape[:1]:
            raise ValueError(f"modality_T must be [{x_TD.shape[0]}], got {tuple(modality_T.shape)}")
        check_modality(modality_T)
        x_TD = x_TD.detach().to(torch.float64)
        onehot_T2 = torch.nn.functional.one_hot(modality_T.long(), NUM_MODALITIES).to(x_TD.dtype)
        # moments [2, 1 + 2D]: count, sum, sum of squares per modality
        moments = torch.cat([onehot_T2.sum(0)[:, None], onehot_T2.T @ x_TD,
                             onehot_T2.T @ x_TD.square()], dim=1)
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(moments, group=group)
        # On the device, no branch on device values (no host sync): a modality absent from the
        # batch keeps its stats, one seen for the first time takes the batch's.
        D = self.hidden_size
        n_M1 = moments[:, :1]
        seen_M1 = n_M1 > 0
        n_safe = n_M1.clamp_min(1)
        mean64 = moments[:, 1:1 + D] / n_safe
        mean_b = mean64.to(self.mu.dtype)
        var_b = (moments[:, 1 + D:] / n_safe - mean64.square()).clamp_min(0).to(self.var.dtype)
        b = self.beta
        delta = mean_b - self.mu
        mu_ema = b * self.mu + (1 - b) * mean_b
        var_ema = b * self.var + (1 - b) * var_b + b * (1 - b) * delta.square()
        was_M1 = self.initialized[:, None]
        self.mu.copy_(torch.where(seen_M1, torch.where(was_M1, mu_ema, mean_b), self.mu))
        self.var.copy_(torch.where(seen_M1, torch.where(was_M1, var_ema, var_b), self.var))
        self.initialized |= seen_M1[:, 0]

    def scores(self, x_TD: Tensor, tau: float | None = None) -> Tensor:
        """M_T2 = softmax_m(LL / tau), LL[t, m] = -1/2 sum_d (log var_m + (x - mu_m)^2 / var_m).

        tau defaults to 0.5 * D. A modality never seen scores 0 (the other takes all the mass);
        with neither seen every row is (0.5, 0.5).
        """
        if x_TD.dim() != 2 or x_TD.shape[1] != self.hidden_size:
            raise ValueError(f"x_TD must be [T, {self.hidden_size}], got {tuple(x_TD.shape)}")
        tau = 0.5 * self.hidden_size if tau is None else tau
        dtype = torch.promote_types(x_TD.dtype, self.mu.dtype)
        mu, var = self.mu.to(dtype), self.var.to(dtype).clamp_min(self.eps)
        diff_T2D = x_TD.to(dtype).unsqueeze(1) - mu
        ll_T2 = -0.5 * (var.log().sum(-1) + (diff_T2D.square() / var).sum(-1))
        if not bool(self.initialized.any()):
            return torch.full_like(ll_T2, 1.0 / NUM_MODALITIES)
        ll_T2 = ll_T2.masked_fill(~self.initialized, float("-inf"))
        return torch.softmax(ll_T2 / tau, dim=-1)

    @torch.no_grad()
    def sync_(self, group: dist.ProcessGroup | None = None) -> None:
        """Average mu and var over the ranks of `group` (all_reduce SUM, then divide).

        Only ranks that have seen a modality take part in its average, so a rank that saw no
        vision tokens yet ends with the others' statistics; afterwards every rank holds the same
        buffers. No-op when torch.distributed is not initialized.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        w_21 = self.initialized.to(self.mu.dtype).unsqueeze(1)
        packed = torch.cat([self.mu * w_21, self.var * w_21, w_21], dim=1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        D = self.hidden_size
        n_21 = packed[:, 2 * D:]
        seen = n_21.squeeze(1) > 0
        n_safe = n_21.clamp_min(1)
        self.mu.copy_(torch.where(seen.unsqueeze(1), packed[:, :D] / n_safe, self.mu))
        self.var.copy_(torch.where(seen.unsqueeze(1), packed[:, D:2 * D] / n_safe, self.var))
        self.initialized.copy_(seen)
