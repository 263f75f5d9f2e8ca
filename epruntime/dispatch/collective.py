"""All-to-all with variable splits, differentiable: the one place dispatchers exchange rows.

Rows go through the dispatcher's transport when it has one (dispatch.transport=shm: shared
memory between the ranks of a node, see epruntime.transport) or, by default, the process
group's all_to_all_single; so does the split-count exchange before them.

Timing (`epruntime.dispatch.timing`): the dispatcher times the forward call; the backward times
itself when given `timing` = (PhaseTimer, layer, phase).

Asynchronous (`dispatch.overlap`, shared-expert overlap): `start_all_to_all` issues the exchange
and returns an `InFlight`; the caller computes, then `InFlight.wait()` gives the received rows
(differentiable, as `all_to_all`). Over a process group this is `all_to_all_single(async_op=True)`
(gloo runs it on its own threads; NCCL on its stream); the shared-memory transport copies this
rank's rows into its peers' segments at start and its peers' rows out at wait. A transport
without `all_to_all_start` (CUDA IPC) exchanges at start: nothing overlaps, results are the same.
Every wait gives up after `timeout_s` (the group's timeout, parallel.timeout_s). The backward
exchange is synchronous (autograd orders backward by itself).
"""

from __future__ import annotations

from datetime import timedelta

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
        back = exchange_back(grad, ctx.splits, ctx.group, ctx.transport, ctx.timing)
        return back, None, None, None, None, None


def exchange_back(grad: torch.Tensor, splits: tuple[list[int], list[int]], group, transport,
                  timing) -> torch.Tensor:
    """Backward of an all-to-all with (send, recv) `splits`: the gradient rows travel the
    reverse way, timed as the phase's backward collective when `timing` is (timer, layer,
    phase)."""
    send_splits, recv_splits = splits
    laps = None
    if timing is not None:
        timer, layer, phase = timing
        laps = timer.laps(layer, "backward", phase)
        laps.barrier(group)
    back = exchange(grad.contiguous(), recv_splits, send_splits, group, transport)
    if laps is not None:
        laps.lap("collective", last_wait_s(transport))
    return back


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


def exchange_counts(send_counts_R: torch.Tensor, group, transport=None) -> torch.Tensor:
    """[R] int64 rows this rank sends to each rank -> [R] rows it receives from each, through
    the rows' `transport` when given (shared memory moves R counts in microseconds; a gloo
    all-to-all costs a loopback round trip per call)."""
    ones = [1] * send_counts_R.shape[0]
    return exchange(send_counts_R.contiguous(), ones, ones, group, transport)


class InFlight:
    """A started row all-to-all (see the module docstring): `wait()` -> received rows."""

    def __init__(self, x: torch.Tensor, out: torch.Tensor, send_splits: list[int],
                 recv_splits: list[int], group, transport, timing, pending, timeout_s: float):
        self._x, self._out, self._pending = x, out, pending
        self._splits, self._group, self._transport = (send_splits, recv_splits), group, transport
        self._timing, self._timeout_s = timing, timeout_s

    def wait(self) -> torch.Tensor:
        """[sum(recv_splits), ...] the received rows, differentiable w.r.t. the sent ones."""
        return _AwaitAllToAll.apply(self._x, self)

    def _finish(self) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is None:
            return self._out
        if isinstance(pending, dist.Work):
            # wait: the exchange's remote rows (gloo: its threads; NCCL: stream-ordered)
            pending.wait(timedelta(seconds=self._timeout_s))
        else:
            self._transport.all_to_all_finish(pending)
        return self._out


class _AwaitAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, flight: InFlight):
        ctx.flight = flight
        return flight._finish()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        f = ctx.flight
        return exchange_back(grad, f._splits, f._group, f._transport, f._timing), None


def start_all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
                     transport=None, timing=None, timeout_s: float = 1800.0) -> InFlight:
    """Issue `all_to_all(x, ...)` and return at once (see the module docstring)."""
    send, recv = list(send_splits), list(recv_splits)
    x = x.contiguous()
    with torch.no_grad():
        out = x.new_empty((sum(recv), *x.shape[1:]))
        pending = None
        if dist.get_world_size(group) == 1:
            out.copy_(x)
        elif transport is None:
            pending = dist.all_to_all_single(out, x, recv, send, group=group, async_op=True)
        elif hasattr(transport, "all_to_all_start"):
            pending = transport.all_to_all_start(out, x, recv, send)
        else:  # no asynchronous path (CUDA IPC): exchange now
            transport.all_to_all_single(out, x, recv, send)
    return InFlight(x, out, send, recv, group, transport, timing, pending, timeout_s)
