"""The hand-written gradient path that megatron-core's DistributedDataParallel and optimizer
replaced (epruntime.optim): one flat all-reduce per parameter kind, a float64 norm, a clipping
loop and torch's AdamW. Kept as `train.optimizer=epruntime` so that profiling/benchmarks/
optimizer_step.py can time both paths side by side; same loss convention (epruntime.optim).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from epruntime.config import TrainConfig
from epruntime.model.router_step import finish_router_step
from epruntime.model.sharding import split_params
from epruntime.optim_copies import CopyGradients, corrected_norm


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


class FlatGradients:
    """Same interface as epruntime.optim.MegatronGradients."""

    def __init__(self, model: torch.nn.Module, config, cfg: TrainConfig):
        self.model, self.config = model, config
        self.dense, self.expert = split_params(model)
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.dim() > 1 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.95), foreach=False)
        self.copies = CopyGradients(model)  # replicated experts (epruntime.optim_copies)
        self._copies_excess = 0.0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def reduce(self) -> None:
        _all_reduce_grads(self.dense, ps.get_data_parallel_group())
        if self.expert:
            _all_reduce_grads(self.expert, ps.get_expert_data_parallel_group())
        self._copies_excess = self.copies.reduce()  # copies' grads summed over their ranks
        # what megatron-core's finalize_model_grads does besides reducing (the megatron path
        # calls it): the expert-bias update and the routers' per-step counters reset
        finish_router_step(self.model, self.config, stepped=True)

    def grad_norm(self) -> float:
        """L2 norm over the whole model: dense grads are replicated (count once), expert grads
        are sharded over the EP group (sum their squares over it)."""
        params = (*self.dense, *self.expert)
        device = params[0].device if params else None

        def sq(ps_):
            zero = torch.zeros((), dtype=torch.float64, device=device)
            return sum((p.grad.double().pow(2).sum() for p in ps_ if p.grad is not None), zero)

        expert_sq = sq(self.expert)
        ep_group = ps.get_expert_model_parallel_group()
        if dist.get_world_size(ep_group) > 1:
            dist.all_reduce(expert_sq, group=ep_group)
        norm = (sq(self.dense) + expert_sq).sqrt().item()  # host sync: clip and skip decisions
        return corrected_norm(norm, self._copies_excess)

    def step(self, lr: float, grad_norm: float, max_norm: float) -> None:
        scale = max_norm / (grad_norm + 1e-6)
        if scale < 1.0:
            for p in (*self.dense, *self.expert):
                if p.grad is not None:
                    p.grad.mul_(scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
