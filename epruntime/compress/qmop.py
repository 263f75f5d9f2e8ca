"""QMoP, Query Guided Mixture-of-Projector (Li et al., arXiv 2603.21232): three ways to turn P
visual tokens into K, mixed per sample by a router that looks at the image and the question.

    visual rows x [P, B, D] (projector output + the image positions' embeddings), question rows
    t [L, B, D] (word + position embeddings) with their valid mask
      pooling   : adaptive average pooling of the token sequence to K (coarse, global)
      resampler : K learned queries cross-attend to LayerNorm(x) (Perceiver/Q-Former style);
                  query + attention output
      pruning   : a linear scorer keeps the top-K tokens in position order, gated straight-
                  through (value 1, gradient to the score), as LearnPruner's stage 1
      router    : w = softmax(Linear([mean_P x, masked mean_L t])) over the 3 branches; with
                  qmop.router_topk < 3 only the top branches keep weight (renormalised)
      out [K, B, D] = sum_b w_b * branch_b  (MoE-style fusion, token k of every branch)

Trained with the model (the branches, the scorer and the router are ordinary dense parameters).
The number of output tokens K is the budget. At the full budget (K = P) QMoP is not built: the
projector's P tokens pass unchanged, i.e. "full" is the model without QMoP (mixing a resampler's
re-encoding in at K = P would change the model, not compress it).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from epruntime.compress.output import Compressed
from epruntime.compress.select import gather_rows, straight_through_gate, top_k_ascending

BRANCHES = ("pooling", "resampler", "pruning")


def pool_tokens(x_BPD: torch.Tensor, keep: int) -> torch.Tensor:
    """[B, P, D] -> [B, K, D]: adaptive average pooling along the token order (row-major
    patches), each output the mean of a run of about P/K neighbouring tokens."""
    return F.adaptive_avg_pool1d(x_BPD.transpose(1, 2), keep).transpose(1, 2)


def masked_mean(x_BLD: torch.Tensor, valid_BL: torch.Tensor) -> torch.Tensor:
    """[B, L, D], [B, L] bool -> [B, D] mean over the valid rows (at least one per sample)."""
    w = valid_BL.to(x_BLD.dtype)[:, :, None]
    return (x_BLD * w).sum(1) / w.sum(1).clamp_min(1.0)


def branch_weights(logits_B3: torch.Tensor, topk: int) -> torch.Tensor:
    """[B, 3] router logits -> [B, 3] mixing weights: softmax, then only the top-`topk` branches
    kept and renormalised (topk = 3: plain softmax)."""
    w = torch.softmax(logits_B3.float(), dim=-1)
    if topk < w.shape[1]:
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.topk(topk, 1).indices, True)
        w = w * keep
        w = w / w.sum(1, keepdim=True)
    return w.to(logits_B3.dtype)


class QMoP(nn.Module):
    def __init__(self, hidden: int, num_vision: int, keep: int, heads: int, router_topk: int):
        super().__init__()
        if not 1 <= keep < num_vision:
            raise ValueError(f"qmop outputs {keep} of {num_vision} visual tokens: expected "
                             f"1..{num_vision - 1} (at {num_vision} QMoP is not built)")
        self.hidden, self.num_vision, self.keep, self.router_topk = (hidden, num_vision, keep,
                                                                     router_topk)
        self.queries = nn.Parameter(torch.zeros(keep, hidden))
        self.resampler_norm = nn.LayerNorm(hidden)
        self.resampler = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.prune_norm = nn.LayerNorm(hidden)
        self.prune_score = nn.Linear(hidden, 1)
        self.router = nn.Linear(2 * hidden, len(BRANCHES))

    def branches(self, x_BPD: torch.Tensor) -> torch.Tensor:
        """[B, P, D] -> [3, B, K, D]: pooling, resampler, pruning outputs."""
        b = x_BPD.shape[0]
        pooled = pool_tokens(x_BPD, self.keep)
        kv = self.resampler_norm(x_BPD)
        q_BKD = self.queries[None].expand(b, -1, -1)
        attended, _ = self.resampler(q_BKD, kv, kv, need_weights=False)
        resampled = q_BKD + attended
        logit_BP = self.prune_score(self.prune_norm(x_BPD)).squeeze(-1)
        top_BK = top_k_ascending(logit_BP.detach(), self.keep)
        pruned = gather_rows(x_BPD, top_BK)
        if self.training:  # straight-through: hard top-K forward, gradient to the scores
            pruned = pruned * straight_through_gate(torch.sigmoid(logit_BP).gather(1, top_BK))[
                :, :, None]
        return torch.stack([pooled, resampled, pruned])

    def route(self, x_BPD: torch.Tensor, text_BLD: torch.Tensor,
              text_valid_BL: torch.Tensor) -> torch.Tensor:
        """Query-guided router: [B, 3] branch weights from the image and the question."""
        summary = torch.cat([x_BPD.mean(1), masked_mean(text_BLD, text_valid_BL)], dim=-1)
        return branch_weights(self.router(summary), self.router_topk)

    def forward(self, vision_PBD: torch.Tensor, text_LBD: torch.Tensor,
                text_valid_BL: torch.Tensor) -> Compressed:
        """[P, B, D], [L, B, D], [B, L] bool -> Compressed([K, B, D])."""
        x_BPD = vision_PBD.transpose(0, 1)
        w_B3 = self.route(x_BPD, text_LBD.transpose(0, 1), text_valid_BL)
        mixed_BKD = torch.einsum("nbkd,bn->bkd", self.branches(x_BPD), w_B3)
        return Compressed(mixed_BKD.transpose(0, 1))

    def flops(self, batch: int) -> float:
        """Analytic FLOPs of one pass (2 x MACs): resampler projections and attention, the
        pruning scorer, the router (pooling and the mixing are additions, left out)."""
        p, k, d = self.num_vision, self.keep, self.hidden
        resampler = 2 * (k * d * d + 2 * p * d * d + 2 * k * p * d + k * d * d)
        return float(batch * (resampler + 2 * p * d + 2 * 2 * d * len(BRANCHES)))
