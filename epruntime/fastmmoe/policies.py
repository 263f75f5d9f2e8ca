"""Token-reduction policies: which visual tokens stay after a pruning layer.

Every policy sees the same per-layer observations and returns, per sample, the indices (into the
sample's current visual tokens) of the tokens to keep, ascending, exactly `keep` of them. The
TokenReducer (reducer.py) owns the mechanics (capturing observations, shrinking the sequence, the
modality vector and answer positions), so policies differ only in how they rank tokens:

- `fastmmoe` (FastMMoE, arXiv 2511.17885): routing-aware. Visual tokens whose routing
  distributions are most similar to another remaining token's are redundant; remove the most
  redundant one, re-score, repeat (greedy), so of two identical tokens one stays.
- `fastv` (FastV, Chen et al. 2024): drop the visual tokens that receive the least attention
  (mean over heads and over the non-padding query tokens) at the pruning layer.
- `text2vision` (LearnPruner's second stage): keep the visual tokens with the most attention
  from the question's (non-padding) text tokens at the pruning layer.
- `random`: keep a uniformly random subset (seeded), the control any ranking has to beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epruntime.fastmmoe.similarity import SIMILARITIES


@dataclass
class Observation:
    """What a pruning layer saw, for the current sequence [S = P visual + L text tokens]."""

    num_vision: int  # P: visual tokens are positions 0..P-1 of every sample
    query_valid_BS: torch.Tensor  # [B, S] bool: not question padding
    routing_BPE: torch.Tensor | None = None  # full router softmax of the visual tokens
    attention_BSS: torch.Tensor | None = None  # attention probs, mean over heads [B, Sq, Sk]


@dataclass
class Selection:
    keep_BK: torch.Tensor  # [B, K] int64 ascending: visual tokens that stay
    merge_into_BP: torch.Tensor | None = None  # [B, P] int64: kept slot (0..K-1) each token joins


class Policy:
    name = "base"
    needs_routing = False
    needs_attention = False

    def select(self, obs: Observation, keep: int, merge: bool = False) -> Selection:
        raise NotImplementedError


def top_scores(score_BP: torch.Tensor, keep: int) -> torch.Tensor:
    """[B, P] -> [B, keep] ascending indices of the highest scores (ties: lower index)."""
    order = torch.sort(score_BP, dim=1, descending=True, stable=True).indices[:, :keep]
    return order.sort(dim=1).values


class FastMMoEPolicy(Policy):
    name = "fastmmoe"
    needs_routing = True

    def __init__(self, similarity: str = "cosine", kernels: str | None = None):
        self.similarity = SIMILARITIES[similarity]
        self.kernels = kernels  # epruntime.kernels backend of the greedy selection

    def select(self, obs: Observation, keep: int, merge: bool = False) -> Selection:
        sim_BPP = self.similarity(obs.routing_BPE.float())
        b, p, _ = sim_BPP.shape
        keep_BK = greedy_keep(sim_BPP, keep, self.kernels)
        merge_into = None
        if merge and keep:
            # Each token joins its most similar kept token (a kept token joins itself).
            rows = torch.arange(b, device=sim_BPP.device)
            to_kept_BPK = sim_BPP.gather(2, keep_BK[:, None, :].expand(b, p, keep))
            merge_into = to_kept_BPK.argmax(dim=2)
            merge_into[rows[:, None], keep_BK] = torch.arange(keep, device=sim_BPP.device)
        return Selection(keep_BK, merge_into)


def greedy_keep(sim_BPP: torch.Tensor, keep: int, kernels: str | None = None) -> torch.Tensor:
    """[B, P, P] pairwise similarity -> [B, keep] ascending indices that stay.

    Repeatedly drop the token most similar to another remaining token (its redundancy), first
    index on ties, until `keep` remain. Runs as `epruntime.kernels.greedy_keep` (`kernels`: the
    backend, None for automatic): a C++ loop on CPU, every sample at once in torch elsewhere.
    """
    from epruntime.kernels import greedy_keep as kernel

    return kernel(sim_BPP, keep, kernels)


class FastVPolicy(Policy):
    name = "fastv"
    needs_attention = True

    def select(self, obs: Observation, keep: int, merge: bool = False) -> Selection:
        a_BSS, valid_BS = obs.attention_BSS.float(), obs.query_valid_BS
        received_BS = (a_BSS * valid_BS[:, :, None]).sum(1) / valid_BS.sum(1, keepdim=True)
        return Selection(top_scores(received_BS[:, :obs.num_vision], keep))


class Text2VisionPolicy(Policy):
    name = "text2vision"
    needs_attention = True

    def select(self, obs: Observation, keep: int, merge: bool = False) -> Selection:
        p = obs.num_vision
        text_BS = obs.query_valid_BS.clone()
        text_BS[:, :p] = False
        a_BSP = obs.attention_BSS.float()[:, :, :p]
        score_BP = (a_BSP * text_BS[:, :, None]).sum(1)
        return Selection(top_scores(score_BP, keep))


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, obs: Observation, keep: int, merge: bool = False) -> Selection:
        b = obs.query_valid_BS.shape[0]
        score_BP = torch.rand(b, obs.num_vision, generator=self.generator)
        return Selection(top_scores(score_BP, keep).to(obs.query_valid_BS.device))


def build_policy(name: str, similarity: str = "cosine", kernels: str | None = None
                 ) -> Policy | None:
    """`fastmmoe.policy` -> Policy (None for "none"); `kernels`: the epruntime.kernels backend
    of FastMMoE's selection (None: automatic)."""
    if name == "none":
        return None
    if name == "fastmmoe":
        return FastMMoEPolicy(similarity, kernels)
    policies = {"fastv": FastVPolicy, "text2vision": Text2VisionPolicy, "random": RandomPolicy}
    if name not in policies:
        raise ValueError(f"fastmmoe.policy={name!r}: expected none, fastmmoe, fastv, "
                         "text2vision or random")
    return policies[name]()
