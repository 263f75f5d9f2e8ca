"""PhaseTimer: wall time of every dispatch and combine phase, per layer, rank and direction.

An observer beside the CommLedger (`epruntime.runtime.Observers.timer`): the ledger says how many
bytes each phase moved, the timer how long it took. Off by default (`dispatch.timing`); when off,
dispatchers get `NULL_LAPS` and pay one attribute lookup per phase method.

A dispatcher method opens `laps = timer.laps(layer, direction, phase)` as its first statement and
calls `laps.lap(part)` after each piece of work: the time since the previous mark goes to `part`.
So the parts of a method partition its wall time exactly (the same clock marks bound both), and the
parts of all six phase methods sum to the MoE layer's communication time: everything the layer
does except the router and the experts.

Parts (PARTS):
    layout      the row plan / megatron-core's routing counts (no communication)
    wait        waiting for the slowest peer (see below)
    permute     gathering rows into the send buffer, fanning received rows out to local slots
    collective  the row all-to-all(s) themselves
    combine     summing expert outputs per row, and rows back into tokens

Waiting for the slowest peer, barrier-free (`dispatch.timing=on`): the first blocking collective
of a dedup dispatch is the exchange of the [R] split counts (8 bytes per rank); its time beyond one
latency is the time this rank waited for the last peer to arrive, so all of it counts as `wait`
(megatron-core's counterpart is the all-gather of the [E] routing counts in its preprocess). The
shared-memory transport does better for every call: each rank stamps its arrival (CLOCK_MONOTONIC,
one clock per host) into its segment, and the receiver's wait is the latest peer's arrival minus
its own (`ShmTransport.last_wait_s`), moved from `collective` to `wait`. Over gloo nothing tells
when a peer arrived, so combine and backward waits stay inside `collective`. With
`dispatch.timing=barrier` a timed 1-element all_reduce runs before every collective of a phase
and is the `wait`; the collective after it is then pure transfer. It costs one extra collective
per phase, hence an option.

Backward: the row all-to-all's autograd Function times its own backward (`collective`), the
permute and combine kernels' backwards are timed by tensor hooks (gradient reaches the op's output
-> gradient of its input is ready). megatron-core's dispatcher is timed by hooks throughout.

Clocks: `perf_counter` on CPU; on CUDA, events recorded on the current stream, resolved once per
step in `settle()` (one named host sync per step; none on CPU). Both behind `Clock`, one path.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

DIRECTIONS = ("forward", "backward")
PHASES = ("dispatch", "combine")
PARTS = ("layout", "wait", "permute", "collective", "combine")
MODES = ("off", "on", "barrier")


class HostClock:
    """perf_counter marks: seconds now, nothing to settle."""

    name = "perf_counter"

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def settle(self) -> None:
        pass


class CudaClock:
    """CUDA events on the current stream: device time, resolved in `settle`."""

    name = "cuda_event"

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3  # ms

    def settle(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()  # host sync: phase timing, per step


def clock_for(device: torch.device) -> HostClock | CudaClock:
    return CudaClock(device) if device.type == "cuda" else HostClock()


class Laps:
    """Consecutive intervals of one phase method (see the module docstring)."""

    __slots__ = ("timer", "index", "last")

    def __init__(self, timer: "PhaseTimer", index: tuple[int, int, int]):
        self.timer, self.index = timer, index
        self.last = timer.clock.mark()

    def lap(self, part: str, wait_s: float = 0.0) -> None:
        """The time since the previous mark was `part`; `wait_s` of it (measured by the
        transport) was waiting for the slowest peer."""
        now = self.timer.clock.mark()
        self.timer._pending.append((self.index, PARTS.index(part), self.last, now, wait_s))
        self.last = now

    def barrier(self, group) -> None:
        """dispatch.timing=barrier: a timed 1-element all_reduce over `group`, the phase's
        `wait`. Call it right after a mark (or first thing), before the phase's collective."""
        if self.timer.barrier and group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(self.timer._token(), group=group)
            self.lap("wait")

    def lap_first_collective(self) -> None:
        """The phase's first blocking collective (the split counts): barrier-free, its time is
        the wait for the slowest peer; after a barrier it is transfer."""
        self.lap("collective" if self.timer.barrier else "wait")


class _NullLaps:
    """Timing off: every mark is a no-op."""

    __slots__ = ()

    def lap(self, part: str, wait_s: float = 0.0) -> None:
        pass

    def barrier(self, group) -> None:
        pass

    def lap_first_collective(self) -> None:
        pass


NULL_LAPS = _NullLaps()


class PhaseTimer:
    """Seconds per (layer, direction, phase, part) on this rank since the last `reset`."""

    def __init__(self, num_layers: int, clock: HostClock | CudaClock | None = None,
                 barrier: bool = False, device: torch.device | None = None):
        self.num_layers = num_layers
        self.clock = clock or HostClock()
        self.barrier = barrier
        self.device = device or torch.device("cpu")
        self._barrier_token: torch.Tensor | None = None
        self.enabled = True
        self.reset()

    def reset(self) -> None:
        self._pending: list[tuple] = []
        # [layer, direction, phase, part] seconds (settled); calls [layer, direction, phase].
        # Marks go to a plain list and counts to a dict: tensor indexing per mark would cost
        # more than the mark (tens of microseconds on a busy CPU).
        self.seconds = torch.zeros(self.num_layers, len(DIRECTIONS), len(PHASES), len(PARTS),
                                   dtype=torch.float64)
        self._calls: dict[tuple[int, int, int], int] = {}

    @property
    def calls(self) -> torch.Tensor:
        """[layer, direction, phase] int64: phase calls (counted by each phase's first method)."""
        out = torch.zeros(self.num_layers, len(DIRECTIONS), len(PHASES), dtype=torch.int64)
        for index, n in self._calls.items():
            out[index] = n
        return out

    def _token(self) -> torch.Tensor:
        if self._barrier_token is None:
            self._barrier_token = torch.zeros(1, device=self.device)
        return self._barrier_token

    def laps(self, layer: int, direction: str, phase: str, first: bool = False) -> Laps:
        """Laps of one phase method; `first`: the phase's first method (counts a call)."""
        index = (layer, DIRECTIONS.index(direction), PHASES.index(phase))
        if first:
            self.count_call(layer, direction, phase)
        return Laps(self, index)

    def count_call(self, layer: int, direction: str, phase: str) -> None:
        """One more call of `phase` (its first method ran), with nothing timed here."""
        index = (layer, DIRECTIONS.index(direction), PHASES.index(phase))
        self._calls[index] = self._calls.get(index, 0) + 1

    def backward_span(self, layer: int, phase: str, part: str, inp: torch.Tensor,
                      out: torch.Tensor, group=None) -> None:
        """Time the backward of the op that made `out` from `inp` as `part`: from the moment the
        gradient reaches `out` until the gradient of `inp` is ready (tensor hooks; other
        backward nodes the autograd engine runs in between count too). With `group` (a
        collective) the barrier of dispatch.timing=barrier runs first, as `wait`."""
        if not (torch.is_grad_enabled() and inp.requires_grad and out.requires_grad):
            return
        box: list[Laps] = []

        def start(grad):
            laps = self.laps(layer, "backward", phase, first=True)
            laps.barrier(group)
            box.append(laps)
            return None

        def end(grad):
            if box:
                box.pop().lap(part)
            return None

        out.register_hook(start)
        inp.register_hook(end)

    def settle(self) -> None:
        """Resolve the pending marks into seconds (CUDA: the one host sync of timing, named in
        the clock). Call once per step; reading the figures calls it too."""
        if not self._pending:
            return
        self.clock.settle()
        shape = self.seconds.shape
        acc = [0.0] * self.seconds.numel()
        wait = PARTS.index("wait")
        for (layer, d, p), part, start, end, wait_s in self._pending:
            s = self.clock.seconds(start, end)
            wait_s = min(max(wait_s, 0.0), s)
            cell = ((layer * shape[1] + d) * shape[2] + p) * shape[3]
            acc[cell + part] += s - wait_s
            acc[cell + wait] += wait_s
        self._pending.clear()
        self.seconds += torch.tensor(acc, dtype=torch.float64).view(shape)

    def total_seconds(self) -> float:
        """This rank's communication seconds (all layers, directions, phases, parts)."""
        self.settle()
        return float(self.seconds.sum())

    def summary(self, group=None) -> dict:
        """Per-rank figures gathered over `group` (collective when given): JSON-able."""
        self.settle()
        mine = self.seconds.clone()
        if group is not None and dist.get_world_size(group) > 1:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if dist.get_backend(group) == "nccl" else torch.device("cpu"))
            everyone = [torch.empty_like(mine, device=device)
                        for _ in range(dist.get_world_size(group))]
            dist.all_gather(everyone, mine.to(device), group=group)
            per_rank = torch.stack([t.cpu() for t in everyone])
        else:
            per_rank = mine[None]
        return timing_summary(per_rank, self.calls, self.clock.name, self.barrier)


def _parts(x_PQ: torch.Tensor) -> dict:
    """[phase, part] seconds -> {phase: {part: s, "total": s}}."""
    out = {}
    for p, phase in enumerate(PHASES):
        row = {part: float(x_PQ[p, q]) for q, part in enumerate(PARTS)}
        row["total"] = float(x_PQ[p].sum())
        out[phase] = row
    return out


def timing_summary(per_rank: torch.Tensor, calls: torch.Tensor, clock: str,
                   barrier: bool) -> dict:
    """per_rank [ranks, layer, direction, phase, part] seconds -> the summary's `comm_time`.

    `seconds` is the slowest rank's total (a collective lasts as long as its slowest rank);
    `parts` breaks down the slowest rank's time; `mean_parts` the mean over ranks."""
    per_rank = per_rank.double()
    totals_R = per_rank.sum(dim=(1, 2, 3, 4))
    slow = int(totals_R.argmax()) if totals_R.numel() else 0
    worst = per_rank[slow]
    mean = per_rank.mean(0)
    return {
        "clock": clock,
        "wait": "barrier" if barrier else "barrier-free",
        "seconds": float(totals_R.max()),  # forward + backward, slowest rank
        "forward_seconds": float(per_rank[:, :, 0].sum(dim=(1, 2, 3)).max()),
        "backward_seconds": float(per_rank[:, :, 1].sum(dim=(1, 2, 3)).max()),
        "slowest_rank": slow,
        "per_rank_seconds": totals_R.tolist(),
        "calls": int(calls[:, 0, 0].max()) if calls.numel() else 0,  # forwards of a layer
        "parts": {d: _parts(worst[:, i].sum(0)) for i, d in enumerate(DIRECTIONS)},
        "mean_parts": {d: _parts(mean[:, i].sum(0)) for i, d in enumerate(DIRECTIONS)},
        "per_layer": [{d: _parts(worst[layer, i]) for i, d in enumerate(DIRECTIONS)}
                      for layer in range(per_rank.shape[1])],
    }

