"""All-to-all with variable splits, differentiable: the one place dispatchers exchange rows.

Rows go through the transport registered for the group (`use_transport`, e.g. shared memory
between the ranks of a node) or, by default, the process group's all_to_all_single. The tiny
counts exchange always uses the process group.
"""

from __future__ import annotations

import atexit

import torch
import torch.distributed as dist

# id(group) -> (group, transport); the group is kept so its id can't be reused while registered.
_transports: dict[int, tuple] = {}


def _key(group) -> int:
    return id(group if group is not None else dist.group.WORLD)


def use_transport(group, transport) -> None:
    """Route `exchange`/`all_to_all` on `group` through `transport` (None: back to the process
    group). A transport it replaces is closed."""
    old = _transports.pop(_key(group), (None, None))[1]
    if old is not None and old is not transport:
        old.close()
    if transport is not None:
        _transports[_key(group)] = (group, transport)


def transport_for(group):
    """The transport registered for `group`, or None (the process group's own all-to-all)."""
    return _transports.get(_key(group), (None, None))[1]


@atexit.register
def close_transports() -> None:
    """Close and forget every registered transport (local: no collective)."""
    while _transports:
        _, transport = _transports.popitem()[1]
        transport.close()


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
    elif (transport := transport_for(group)) is not None:
        transport.all_to_all_single(out, x, recv_splits, send_splits)
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
