"""All-to-all with variable splits, differentiable: the one place dispatchers exchange rows."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return exchange(x.contiguous(), send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_splits, recv_splits = ctx.splits
        return exchange(grad.contiguous(), recv_splits, send_splits, ctx.group), None, None, None


def exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """x [sum(send_splits), ...] -> [sum(recv_splits), ...]: rows send_splits[r] go to rank r."""
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    if dist.get_world_size(group) == 1:
        out.copy_(x)
    else:
        dist.all_to_all_single(out, x, recv_splits, send_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """Differentiable `exchange`: the backward sends gradients the reverse way."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def exchange_counts(send_counts_R: torch.Tensor, group) -> torch.Tensor:
    """[R] int64 rows this rank sends to each rank -> [R] rows it receives from each."""
    recv = torch.empty_like(send_counts_R)
    if dist.get_world_size(group) == 1:
        recv.copy_(send_counts_R)
    else:
        dist.all_to_all_single(recv, send_counts_R.contiguous(), group=group)
    return recv
