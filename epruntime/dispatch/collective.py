"""All-to-all with variable splits, differentiable: the one place dispatchers exchange rows.

Rows go through the dispatcher's transport when it has one (dispatch.transport=shm: shared
memory between the ranks of a node, see epruntime.transport) or, by default, the process
group's all_to_all_single. The tiny counts exchange always uses the process group.

Timing (`epruntime.dispatch.timing`): the dispatcher times the forward call; the backward times
itself when given `timing` = (PhaseTimer, layer, phase).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
                transport, timing):
        ctx.splits, ctx.group, ctx.transport = (send_splits, recv_splits), group, transport
        ctx.timing = timing
        return exchange(x.contiguous(), send_splits, recv_splits, group, transport)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_splits, recv_splits = ctx.splits
        laps = None
        if ctx.timing is not None:
            timer, layer, phase = ctx.timing
            laps = timer.laps(layer, "backward", phase)
            laps.barrier(ctx.group)
        back = exchange(grad.contiguous(), recv_splits, send_splits, ctx.group, ctx.transport)
        if laps is not None:
            laps.lap("collective", last_wait_s(ctx.transport))
        return back, None, None, None, None, None


def last_wait_s(transport) -> float:
    """Seconds the transport's last call waited for its slowest peer, when it can tell (the
    shared-memory transport); 0.0 otherwise."""
    return getattr(transport, "last_wait_s", 0.0) if transport is not None else 0.0


def exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
             transport=None) -> torch.Tensor:
    """x [sum(send_splits), ...] -> [sum(recv_splits), ...]: rows send_splits[r] go to rank r
    (through `transport`, built for `group`, when given)."""
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    if dist.get_world_size(group) == 1:
        out.copy_(x)
    elif transport is not None:
        transport.all_to_all_single(out, x, recv_splits, send_splits)
    else:
        dist.all_to_all_single(out, x, recv_splits, send_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
               transport=None, timing=None) -> torch.Tensor:
    """Differentiable `exchange`: the backward sends gradients the reverse way (and times itself
    with timing = (PhaseTimer, layer, phase))."""
    return _AllToAll.apply(x, send_splits, recv_splits, group, transport, timing)


def exchange_counts(send_counts_R: torch.Tensor, group) -> torch.Tensor:
    """[R] int64 rows this rank sends to each rank -> [R] rows it receives from each."""
    recv = torch.empty_like(send_counts_R)
    if dist.get_world_size(group) == 1:
        recv.copy_(send_counts_R)
    else:
        dist.all_to_all_single(recv, send_counts_R.contiguous(), group=group)
    return recv
