"""Compute while rows travel: the dedup dispatchers' asynchronous last hop (`dispatch.overlap`)
and the shared experts run during the dispatch all-to-all (`model.moe_shared_expert_overlap`).

A hop's all-to-all is started (`start_hop`, `epruntime.dispatch.collective.start_all_to_all`)
instead of waited for. Then, as DeepEP's and Comet's overlap do on GPUs:

- shared experts: every token goes through them, so they need nothing from the exchange; they
  run on the layer input while the rows travel, and their output is added after combine (the
  same add, in the same order, as megatron-core's MoELayer without overlap: bit-identical).
- local tokens first (`dispatch.overlap=true`): the rows a rank sends itself need no network. Its
  experts run on those rows (taken from the send buffer) while the remote rows travel, then on
  the remote rows once they have arrived. Each received row's expert outputs are summed in the
  same order as without overlap, and every row goes back in the same place, so the combine is
  unchanged.

What is and is not bit-identical to overlap off. The exchange moves the same bytes (the rows to
itself are still copied by the collective, as without overlap, and ignored: their gradient is 0).
The experts run as two calls (local rows, remote rows) instead of one, which changes the
floating-point summation order of the expert weight gradients (a weight's gradient sums over the
rows of the call) and, where a call has very few rows, may change the GEMM kernel the CPU BLAS
picks for the forward. So expert outputs, loss and logits agree to fp32 rounding, not bit for bit;
tests/test_overlap.py measures the gap. Shared-expert overlap alone is bit-identical.

On CPU (gloo) the exchange runs on gloo's own threads and the shared-memory transport's peers copy
their rows into this rank's segment themselves, so the compute really does proceed while rows
travel; with two cores shared by several ranks those threads compete with the compute for the
same cores (profiling/benchmarks/overlap.py measures what it buys).

Host syncs: starting the exchange needs none beyond the dispatch's split counts (already on the
host); local-first fans out twice (`nonzero` on each call's slots) and megatron-core's experts
read `tokens_per_expert` once per call, so those data-dependent syncs double.

Phase timing: the compute between start and wait is not communication; the dispatcher closes its
laps at the start and opens new ones after the compute, so `comm_time` is the exposed part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epruntime.dispatch.collective import InFlight, last_wait_s
from epruntime.dispatch.layout import fan_out
from epruntime.dispatch.timing import NULL_LAPS


@dataclass(frozen=True, eq=False)
class HopInFlight:
    """One hop's rows and metadata on the way (see the module docstring).

    sent      the hop as dispatched (epruntime.dispatch.dedup.SentHop)
    flights   (packed rows+meta,) or (rows, meta)
    width     payload columns (H) of the packed exchange
    local     (rows_LH, meta_LC): this rank's rows to itself, from the send buffer
    before    rows received from lower ranks (where the local rows sit among the received)
    """

    sent: object
    flights: tuple[InFlight, ...]
    width: int
    local: tuple[torch.Tensor, torch.Tensor]
    before: int
    transport: object = None

    def wait(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """-> (rows_XH, meta_XC, seconds the transport waited for its slowest peer)."""
        wait_s = 0.0
        got = []
        for flight in self.flights:
            got.append(flight.wait())
            wait_s += last_wait_s(self.transport)
        if len(got) == 1:
            rows_XH, meta_XC = got[0].split([self.width, got[0].shape[1] - self.width], dim=1)
        else:
            rows_XH, meta_XC = got
        return rows_XH, meta_XC, wait_s


def run_shared_experts(shared_experts, hidden_SBH: torch.Tensor) -> torch.Tensor:
    """megatron-core's shared experts on the layer input [S, B, H], called during the all-to-all.

    Without overlap MoELayer runs them before the router, so in backward their gradient reaches
    the layer input after the router's and the dispatch's (autograd runs ready nodes latest-
    created first), and the three are summed in that order. Run later, their nodes would come
    first and the input gradient would differ by rounding. So they read an alias of the input
    whose backward node takes the sequence number of the input's producer (megatron-core's own
    overlap sets sequence numbers the same way): it runs after every node of this layer, as
    before, and the sums are bit-identical."""
    alias = hidden_SBH.view_as(hidden_SBH)
    if alias.grad_fn is not None:
        producer = hidden_SBH.grad_fn
        alias.grad_fn._set_sequence_nr(producer._sequence_nr() if producer is not None else 0)
    return shared_experts(alias)


def backward_node_span(timer, layer: int, phase: str, part: str, inp: torch.Tensor,
                       out: torch.Tensor) -> None:
    """Time the backward of the single op that made `out` from `inp` as `part` (PhaseTimer's
    backward_span, but starting when autograd runs that op's node, a node pre-hook, not when
    `out`'s gradient is ready: the two expert calls' backward chains interleave, and the gradient
    of one call's output is ready while the other call's experts still run backward)."""
    if not (torch.is_grad_enabled() and inp.requires_grad and out.grad_fn is not None):
        return
    box: list = []

    def start(grad_outputs):
        box.append(timer.laps(layer, "backward", phase, first=True))

    def end(grad):
        if box:
            box.pop().lap(part)

    out.grad_fn.register_prehook(start)
    inp.register_hook(end)


def start_hop(rows_NH: torch.Tensor, meta_NC: torch.Tensor, sent, rank: int, start,
              transport=None) -> HopInFlight:
    """Start the exchange of a hop's send buffer (rows_NH [N, H], meta_NC [N, C]); `start(x)`
    starts one all-to-all by `sent`'s splits (-> InFlight) over `transport` (None: the group)."""
    if sent.hop.packed:
        flights = (start(torch.cat([rows_NH, meta_NC], dim=1)),)
    else:  # rows and metadata differ in dtype: two collectives
        flights = (start(rows_NH), start(meta_NC))
    off, n = sum(sent.send_splits[:rank]), sent.send_splits[rank]
    local = (rows_NH[off:off + n], meta_NC[off:off + n])
    return HopInFlight(sent, flights, rows_NH.shape[1], local, sum(sent.recv_splits[:rank]),
                       transport)


def expert_rows(experts, rows_XH: torch.Tensor, prob_XM: torch.Tensor, slot_XM: torch.Tensor,
                num_local: int, timing=None) -> torch.Tensor:
    """megatron-core's experts on received rows: rows_XH [X, H], their entries' weights prob_XM
    [X, M] and local slots slot_XM [X, M] (int64, -1 unused) -> [X, H] each row's weighted expert
    outputs summed (rows without entries: 0). The fan-out and sum of dispatch_postprocess and
    combine_preprocess, with the experts between. `timing` = (laps(phase), span(phase, part,
    inp, out)), the dispatcher's: the fan-out is timed as dispatch permute, the sum as combine,
    forward and backward; the experts are not communication."""
    laps, span = timing if timing is not None else (lambda phase: NULL_LAPS, None)
    lap = laps("dispatch")
    fan = fan_out(slot_XM, num_local)
    x_KH = rows_XH.index_select(0, fan.row_K)
    probs_K = prob_XM.reshape(-1).index_select(0, fan.entry_K)
    if span is not None:
        span("dispatch", "permute", rows_XH, x_KH)
    lap.lap("permute")
    out_KH, bias = experts(x_KH, fan.tokens_per_slot, probs_K)
    if bias is not None:
        raise ValueError("expert bias is not supported by the dedup dispatchers")
    lap = laps("combine")
    rows_out = out_KH.new_zeros(rows_XH.shape[0], out_KH.shape[-1]).index_add(0, fan.row_K,
                                                                              out_KH)
    if span is not None:
        span("combine", "combine", out_KH, rows_out)
    lap.lap("combine")
    return rows_out


def local_first(flight: HopInFlight, experts, num_local: int, max_entries: int, timing=None
                ) -> torch.Tensor:
    """The experts on this rank's own rows, then (after `flight.wait()`) on the remote rows ->
    [X, H] one summed row per received row, in the received order (combine_preprocess's output).
    `timing` as in `expert_rows`; the wait is timed as the dispatch collective."""
    m = max_entries
    rows_LH, meta_LC = flight.local
    local_LH = expert_rows(experts, rows_LH, meta_LC[:, :m], meta_LC[:, m:2 * m].detach().long(),
                           num_local, timing)
    lap = timing[0]("dispatch") if timing is not None else NULL_LAPS
    rows_XH, meta_XC, wait_s = flight.wait()
    lap.lap("collective", wait_s)
    lo, hi = flight.before, flight.before + rows_LH.shape[0]
    remote = torch.cat([torch.arange(lo, device=rows_XH.device),
                        torch.arange(hi, rows_XH.shape[0], device=rows_XH.device)])
    remote_RH = expert_rows(experts, rows_XH.index_select(0, remote),
                            meta_XC[:, :m].index_select(0, remote),
                            meta_XC[:, m:2 * m].detach().long().index_select(0, remote), num_local,
                            timing)
    return torch.cat([remote_RH[:lo], local_LH, remote_RH[lo:]])


__all__ = ["HopInFlight", "backward_node_span", "expert_rows", "local_first",
           "run_shared_experts", "start_hop"]
