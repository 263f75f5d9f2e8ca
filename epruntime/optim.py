"""Gradient reduction across expert- and data-parallel ranks, clipping, optimizer, LR schedule.

Loss convention: every rank's loss is (sum over its samples) / global_batch_size, so that the sum
of rank losses is the global mean. Gradients are then SUMMED:
- dense parameters (replicated on every rank) over the data-parallel group;
- expert parameters (sharded over EP, replicated over expert-data-parallel) over the
  expert-data-parallel group. Their all-to-all backward already summed the contributions of
  the tokens of every rank in the EP group.
The result equals the gradient of the global-batch mean loss on one process, at any EP size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from epruntime.config import TrainConfig
from epruntime.model.sharding import is_expert_param


def split_params(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(dense, expert) parameters that require grad."""
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (expert if is_expert_param(name) else dense).append(p)
    return dense, expert


def _all_reduce_grads(params: list[torch.nn.Parameter], group) -> None:
    """One flat all-reduce (sum) for the grads of `params` over `group`."""
    if dist.get_world_size(group) == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def reduce_gradients(dense: list, expert: list) -> None:
    _all_reduce_grads(dense, ps.get_data_parallel_group())
    if expert:
        _all_reduce_grads(expert, ps.get_expert_data_parallel_group())


def global_grad_norm(dense: list, expert: list) -> torch.Tensor:
    """L2 norm over the whole model: dense grads are replicated (count once), expert grads are
    sharded over the EP group (sum their squares over it)."""
    device = next(iter((*dense, *expert))).device if (dense or expert) else None

    def sq(params):
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return sum((p.grad.double().pow(2).sum() for p in params if p.grad is not None), zero)

    expert_sq = sq(expert)
    ep_group = ps.get_expert_model_parallel_group()
    if dist.get_world_size(ep_group) > 1:
        dist.all_reduce(expert_sq, group=ep_group)
    return (sq(dense) + expert_sq).sqrt()


def clip_gradients(dense: list, expert: list, max_norm: float) -> float:
    norm = global_grad_norm(dense, expert)
    norm_value = norm.item()  # host sync: the clip decision and the non-finite guard need it
    scale = max_norm / (norm_value + 1e-6)
    if scale < 1.0:
        for p in (*dense, *expert):
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm_value


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on 1-D parameters (norms, biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), foreach=False)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
