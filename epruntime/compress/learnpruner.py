"""LearnPruner stage 1 (Takezoe et al., arXiv 2604.23950): a small learned module after the
vision encoder and projector scores every visual token and keeps a budget of them, so the
language model never sees the rest. The paper's stage 2 (text-to-vision attention at a middle
decoder layer) is the token reducer's `text2vision` policy (epruntime.fastmmoe), switched on by
`learnpruner.stage2`. Paper: about 95% of the performance at 5.5% of the visual tokens, 3.2x
faster (LLaVA-1.5, 576 visual tokens).

    visual rows [P, B, D] (projector output + the image positions' embeddings)
      -> scorer: LayerNorm, Linear(D, h), GELU, Linear(h, 1) -> logit [B, P], prob = sigmoid
      -> top (K - n_div) by score, kept as they are, gated straight-through (value 1, grad dprob)
      -> n_div diversity tokens from the P - (K - n_div) dropped ones
      -> [K, B, D] in position order (each keeps its learned position embedding)

What we assumed (the paper's module and its diversity tokens are described, not published as
code): the scorer is a two-layer MLP on each token alone (query-agnostic, as stage 1 is); the
straight-through estimator acts on the kept tokens' gates, so a kept token's score learns from
the loss's sensitivity to that token; the scorer reads the tokens detached (it does not train
the projector). Diversity tokens cover what the top scores miss: seeds are
picked among the dropped tokens by greedy farthest-point sampling (cosine) away from the kept
tokens, every other dropped token joins its most similar seed, and each group is merged into one
token by a softmax of its members' scores, placed at the seed's position. Through that softmax
the dropped tokens' scores get a gradient too. `learnpruner.diversity` is the share of the
budget they take (0: plain top-k).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from epruntime.compress.output import Compressed
from epruntime.compress.select import (farthest_seeds, gather_rows, segment_softmax_merge,
                                       straight_through_gate, top_k_ascending)


class LearnPrunerStage1(nn.Module):
    def __init__(self, hidden: int, num_vision: int, keep: int, diversity: float,
                 scorer_hidden: int):
        super().__init__()
        if not 1 <= keep <= num_vision:
            raise ValueError(f"learnpruner keeps {keep} of {num_vision} visual tokens: expected "
                             f"1..{num_vision}")
        self.num_vision, self.keep, self.hidden, self.scorer_hidden = (num_vision, keep, hidden,
                                                                       scorer_hidden)
        # diversity tokens only when something is dropped, and at least one top-scored token
        self.num_diverse = 0 if keep == num_vision else min(round(diversity * keep), keep - 1)
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, scorer_hidden)
        self.fc2 = nn.Linear(scorer_hidden, 1)

    def scores(self, x_BPD: torch.Tensor) -> torch.Tensor:
        """[B, P, D] -> [B, P] logits."""
        return self.fc2(F.gelu(self.fc1(self.norm(x_BPD)))).squeeze(-1)

    def forward(self, vision_PBD: torch.Tensor, text_LBD: torch.Tensor | None = None,
                text_valid_BL: torch.Tensor | None = None) -> torch.Tensor:
        """[P, B, D] -> [K, B, D]. The text arguments are unused (stage 1 is query-agnostic)."""
        x_BPD = vision_PBD.transpose(0, 1)
        # The scorer reads the tokens without sending gradient back into them: it learns from
        # the loss (straight-through), the projector only from the task, so at the full budget
        # training is the full model's, gradients included.
        logit_BP = self.scores(x_BPD.detach())
        prob_BP = torch.sigmoid(logit_BP)
        top = self.keep - self.num_diverse
        top_BK = top_k_ascending(logit_BP.detach(), top)
        kept_BKD = gather_rows(x_BPD, top_BK)
        if self.training:  # straight-through: the forward value is the hard selection
            kept_BKD = kept_BKD * straight_through_gate(prob_BP.gather(1, top_BK))[:, :, None]
        if self.num_diverse:
            index_BK, rows_BKD = self._with_diversity(x_BPD, logit_BP, top_BK, kept_BKD)
        else:
            index_BK, rows_BKD = top_BK, kept_BKD
        return Compressed(rows_BKD.transpose(0, 1), index_BK)

    def _with_diversity(self, x_BPD, logit_BP, top_BK, kept_BKD):
        """The top tokens plus the diversity tokens, in position order: ([B, K] positions,
        [B, K, D] rows)."""
        b, p, d = x_BPD.shape
        nd = self.num_diverse
        dropped_BP = torch.ones(b, p, dtype=torch.bool, device=x_BPD.device)
        dropped_BP.scatter_(1, top_BK, False)
        # the dropped positions, ascending (a stable sort, not nonzero(): no host sync)
        rest_BN = torch.sort(dropped_BP.to(torch.int8), dim=1, descending=True,
                             stable=True).indices[:, :p - top_BK.shape[1]]
        feat_BPD = F.normalize(x_BPD.detach().float(), dim=-1)
        rest_feat = gather_rows(feat_BPD, rest_BN)
        seed_BS = farthest_seeds(rest_feat, gather_rows(feat_BPD, top_BK), nd)  # into rest
        # every dropped token joins its most similar seed; a seed joins itself
        sim_BNS = rest_feat @ gather_rows(rest_feat, seed_BS).transpose(1, 2)
        group_BN = sim_BNS.argmax(dim=2)
        group_BN.scatter_(1, seed_BS, torch.arange(nd, device=x_BPD.device).expand(b, nd))
        merged_BSD = segment_softmax_merge(gather_rows(x_BPD, rest_BN),
                                           logit_BP.gather(1, rest_BN), group_BN, nd)
        index_BK = torch.cat([top_BK, rest_BN.gather(1, seed_BS)], dim=1)
        rows_BKD = torch.cat([kept_BKD, merged_BSD.to(kept_BKD.dtype)], dim=1)
        order_BK = index_BK.argsort(dim=1)
        return index_BK.gather(1, order_BK), gather_rows(rows_BKD, order_BK)

    def flops(self, batch: int) -> float:
        """Analytic FLOPs of one pass (2 x MACs): the scorer on every visual token, and with
        diversity tokens the token-to-seed similarities (seed choice and grouping)."""
        p, d, h = self.num_vision, self.hidden, self.scorer_hidden
        scorer = p * 2 * (d * h + h)
        rest = p - (self.keep - self.num_diverse)
        diverse = 2 * rest * d * (self.keep + self.num_diverse) if self.num_diverse else 0
        return float(batch * (scorer + diverse))
