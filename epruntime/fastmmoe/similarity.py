"""Pairwise similarity of routing distributions (FastMMoE's redundancy measure).

Two visual tokens whose router sends them to the same experts with the same weights are
redundant for the MoE: FastMMoE (arXiv 2511.17885) prunes by that. Its exact measure is not
public; cosine and Jensen-Shannon are both here and configurable (`fastmmoe.similarity`).
"""

from __future__ import annotations

import math

import torch


def cosine_similarity(p_BPE: torch.Tensor) -> torch.Tensor:
    """[B, P, E] -> [B, P, P] cosine similarity of every pair of rows."""
    unit = p_BPE / p_BPE.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.transpose(1, 2)


def js_similarity(p_BPE: torch.Tensor) -> torch.Tensor:
    """[B, P, E] probability rows -> [B, P, P] 1 - JS(p_i, p_j) / ln 2, in [0, 1].

    JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2 with natural logs; 1 for identical rows.
    """
    def entropy(x):
        return -(x * x.clamp_min(1e-30).log()).sum(-1)

    mix_BPPE = (p_BPE[:, :, None, :] + p_BPE[:, None, :, :]) / 2
    h_BP = entropy(p_BPE)
    js = entropy(mix_BPPE) - (h_BP[:, :, None] + h_BP[:, None, :]) / 2
    return 1 - js.clamp_min(0) / math.log(2)


SIMILARITIES = {"cosine": cosine_similarity, "js": js_similarity}
