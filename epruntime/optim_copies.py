"""Gradients of replicated experts: copies of one logical expert stay identical.

A replicated placement (EPLB's phy2log, `epruntime.placement.core`) puts copies of a hot expert
on several EP ranks; the dispatcher sends each (token, expert) pair to one of them, so each copy
sees only its share of the tokens. After the usual reduction (expert gradients summed over the
expert-data-parallel group) and before the optimizer step, `CopyGradients.reduce` sums each
replicated expert's gradients over its copies: ONE all-reduce over the EP group of a buffer
[replicated logical experts, expert numel] (every layer's together; only replicated experts
travel), and every copy takes the sum back. Every copy then holds the gradient the expert would
have had unreplicated, AdamW makes the same update on each (same parameters, gradient, state,
learning rate), so copies and their optimizer state stay bit-identical.

Gradient-norm clipping counts each logical expert once: the optimizers' norm sums the squares of
every copy, so `reduce` returns the excess sum_e (copies_e - 1) * ||g_e||^2 (float64), known on
every rank from the reduced buffer without another collective, and the optimizer paths subtract
it (`corrected_norm`).

Without replicated placements `reduce` does nothing and returns 0 (no collective).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def replicated_rows(model, ep_rank: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """The reduction buffer's rows: replicated experts of every layer in (layer, logical id)
    order, the same on every rank. Returns ([rows] copies of each row's expert, [(MoE layer,
    local slot, row)] of this rank's copies). A model without placements has none."""
    copies, slots = [], []
    for layer, placement in enumerate(getattr(model, "placements", ())):
        if not placement.is_replicated:
            continue
        row_of = {}
        for e, c in enumerate(placement.logcnt_E.tolist()):
            if c > 1:
                row_of[e] = len(copies)
                copies.append(c)
        slots += [(layer, slot, row_of[e])
                  for slot, e in enumerate(placement.experts_per_rank()[ep_rank]) if e in row_of]
    return copies, slots


class CopyGradients:
    """Sums copies' gradients over the EP ranks that hold them (module docstring). Reads the
    model's current placements at every call, so it follows migration."""

    def __init__(self, model):
        self.model = model

    def reduce(self, group=None) -> float:
        """After the expert gradients' own reduction, before the norm: each copy's `.grad` <- the
        sum over the copies of its expert (collective over the EP `group`, default megatron-
        core's; no collective without copies). Returns the norm excess (module docstring)."""
        if not any(p.is_replicated for p in getattr(self.model, "placements", ())):
            return 0.0
        group = group or ps.get_expert_model_parallel_group()
        copies, slots = replicated_rows(self.model, dist.get_rank(group))
        layers = self.model.moe_layers
        params = [list(layers[0].experts.local_experts[0].parameters())]
        numel = sum(p.numel() for p in params[0])
        device = params[0][0].device
        buf_RN = torch.zeros(len(copies), numel, dtype=torch.float32, device=device)
        for layer, slot, row in slots:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in
                     layers[layer].experts.local_experts[slot].parameters()]
            buf_RN[row] = torch.cat([g.reshape(-1).float() for g in grads])
        if dist.get_world_size(group) > 1:
            dist.all_reduce(buf_RN, group=group)
        for layer, slot, row in slots:
            offset = 0
            for p in layers[layer].experts.local_experts[slot].parameters():
                g = buf_RN[row, offset:offset + p.numel()].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
                offset += p.numel()
        extra_R = torch.tensor(copies, dtype=torch.float64, device=device) - 1
        # host sync: the norm excess (the clip decision is on the host anyway)
        return float((buf_RN.double().pow(2).sum(1) * extra_R).sum())


def corrected_norm(norm: float, excess_sq: float) -> float:
    """The gradient norm with each logical expert counted once: sqrt(norm^2 - excess)."""
    if not math.isfinite(norm):
        return norm
    return math.sqrt(max(norm * norm - excess_sq, 0.0))
