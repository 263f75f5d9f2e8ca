"""The phase timer (`dispatch.timing`, epruntime.dispatch.timing) on real gloo ranks (EP 2).

Each dispatcher (megatron-core's alltoall, dedup over the process group and over shared memory,
dedup-hier) runs its six phase methods on the same inputs with timing off and on; around every
method call the test reads perf_counter itself. What must hold:
- the timer's parts of a forward sum to the time measured around the phase methods (the MoE
  layer's communication time) within timer resolution plus the call overhead of the methods,
- the ledger's bytes and the results are the same with timing on as with it off,
- the backward's collective and permute/combine parts are timed,
- timing on adds no host sync to the dedup path (the budget of tests/test_host_syncs.py).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from epruntime.dispatch.timing import PARTS, HostClock, PhaseTimer, timing_summary
from tests.dist import spawn_reports, write_report

EP = 2
# (name, dispatch kind, transport, ranks per node, timing mode)
CONFIGS = [("alltoall", "alltoall", "pg", EP, "on"), ("dedup", "dedup", "pg", EP, "on"),
           ("dedup/shm", "dedup", "shm", EP, "on"), ("dedup/barrier", "dedup", "pg", EP, "barrier"),
           ("dedup-hier", "dedup-hier", "pg", 1, "on"), ("alltoall/barrier", "alltoall", "pg", EP,
                                                         "barrier")]
PHASE_METHODS = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess",
                 "combine_preprocess", "token_combine", "combine_postprocess")
CALLS = 5
# Per phase method: perf_counter's resolution (ns) plus a Python call and return, on a loaded host.
CALL_OVERHEAD_S = 50e-6


def test_laps_partition_the_interval_they_cover():
    timer = PhaseTimer(2, HostClock())
    start = time.perf_counter()
    laps = timer.laps(1, "forward", "dispatch", first=True)
    sum(range(20000))
    laps.lap("layout")
    sum(range(20000))
    laps.lap("collective", wait_s=1e-9)
    elapsed = time.perf_counter() - start
    timer.settle()
    s = timer.seconds
    assert s[0].sum() == 0 and s[1, 1].sum() == 0  # nothing in other layers or the backward
    assert 0 < float(s.sum()) <= elapsed
    assert s[1, 0, 0, PARTS.index("wait")] == pytest.approx(1e-9)
    assert int(timer.calls[1, 0, 0]) == 1


def test_summary_reports_the_slowest_rank():
    per_rank = torch.zeros(3, 2, 2, 2, len(PARTS), dtype=torch.float64)
    per_rank[0, 0, 0, 0, PARTS.index("collective")] = 1.0
    per_rank[2, 1, 1, 1, PARTS.index("wait")] = 2.5
    out = timing_summary(per_rank, torch.ones(2, 2, 2, dtype=torch.int64), "perf_counter", False)
    assert out["seconds"] == 2.5 and out["slowest_rank"] == 2
    assert out["per_rank_seconds"] == [1.0, 0.0, 2.5]
    assert out["forward_seconds"] == 1.0 and out["backward_seconds"] == 2.5
    assert out["parts"]["backward"]["combine"]["wait"] == 2.5
    assert out["per_layer"][1]["backward"]["combine"]["total"] == 2.5


def _run_layer(d, tokens, gen, external: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward (every phase method timed from outside into `external`) and backward."""
    t = 32
    x = torch.randn(t, 1, 16, generator=gen, requires_grad=True)
    logits = torch.randn(t, 8, generator=gen)
    routing = torch.zeros(t, 8, dtype=torch.bool).scatter_(1, logits.topk(3, 1).indices, True)
    probs = torch.softmax(logits, 1) * routing
    tokens.enter(torch.randint(0, 2, (t, 1), generator=gen))
    value: object = None
    for phase in PHASE_METHODS:
        if phase == "combine_preprocess":
            x_K, _, p_K = value
            value = x_K * p_K[:, None].to(x_K.dtype)  # the "experts": not communication
        start = time.perf_counter()
        if phase == "dispatch_preprocess":
            value = d.dispatch_preprocess(x, routing, probs)
        elif phase in ("token_dispatch", "dispatch_postprocess"):
            value = getattr(d, phase)(*value)
        else:
            value = getattr(d, phase)(value)
        external.append(time.perf_counter() - start)
    out = value
    out.float().pow(2).sum().backward()
    return out.detach(), x.grad


def _worker(rank: int, out_dir: str) -> None:
    from megatron.core.transformer.moe.moe_layer import get_default_pg_collection

    from epruntime import distributed
    from epruntime.config import load_config
    from epruntime.dispatch import CommLedger, dispatcher_class
    from epruntime.model.spec import transformer_config
    from epruntime.placement import Placement
    from epruntime.runtime import LayerRuntime, Observers, TokenStream
    from epruntime.transport import setup_transport
    from tests.test_host_syncs import counting_host_syncs

    base = ["model.num_experts=8", "model.moe_topk=3", "model.hidden_size=16",
            f"parallel.ep_size={EP}", "parallel.timeout_s=60", "model.num_attention_heads=2"]
    cfg = load_config(None, base)
    env = distributed.init_distributed(cfg)
    shm_cfg = load_config(None, [*base, "dispatch.kind=dedup", "dispatch.transport=shm"])
    shm = setup_transport(shm_cfg, torch.distributed.group.WORLD, EP)
    n_local = 8 // EP
    report = {}
    for name, kind, transport, per_node, mode in CONFIGS:
        results = {}
        for timing in ("off", mode):
            tokens = TokenStream()
            ledger = CommLedger(1, EP, env.ep_rank, per_node)
            timer = None if timing == "off" else PhaseTimer(1, HostClock(),
                                                            barrier=timing == "barrier")
            runtime = LayerRuntime(0, transport=shm if transport == "shm" else None,
                                   tokens=tokens, observers=Observers(ledger, timer))
            d = dispatcher_class(kind)(n_local, list(range(rank * n_local, (rank + 1) * n_local)),
                                       config=transformer_config(cfg),
                                       pg_collection=get_default_pg_collection(), runtime=runtime)
            if kind != "alltoall":
                d.set_placement(Placement.contiguous(8, EP, per_node))
            gen = torch.Generator().manual_seed(rank)
            outs, gaps, totals, syncs = [], [], [], []
            _run_layer(d, tokens, gen, [])  # warm-up: kernels load, first-call costs
            if timer is not None:
                timer.reset()
            ledger.reset()
            for _ in range(CALLS):
                external: list[float] = []
                with counting_host_syncs() as counts:
                    out, grad = _run_layer(d, tokens, gen, external)
                syncs.append(sum(counts.values()))
                outs.append((out, grad))
                if timer is not None:
                    before = float(timer.seconds[:, 0].sum())
                    timer.settle()
                    inside = float(timer.seconds[:, 0].sum()) - before
                    measured = sum(external)
                    gaps.append(measured - inside)
                    totals.append(measured)
            results[timing] = dict(outs=outs, ledger=ledger.summary(), syncs=syncs, gaps=gaps,
                                   totals=totals, timer=timer)
        off, on = results["off"], results[mode]
        timer = on["timer"]
        report[name] = {
            "same_results": all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                for a, b in zip(off["outs"], on["outs"])),
            "same_bytes": off["ledger"] == on["ledger"],
            "cross_rank_bytes": on["ledger"]["cross_rank_bytes"],
            "syncs_off": off["syncs"], "syncs_on": on["syncs"],
            "gaps": on["gaps"], "totals": on["totals"],
            "summary": timer.summary(torch.distributed.group.WORLD),
            "seconds": timer.seconds.tolist(),
        }
    shm.close()
    write_report(out_dir, rank, report)


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    return spawn_reports(_worker, EP, tmp_path_factory.mktemp("phase_timing"))


NAMES = [c[0] for c in CONFIGS]


@pytest.mark.parametrize("name", NAMES)
def test_phase_times_sum_to_the_measured_communication_time(timed, name):
    for rank_report in timed:
        r = rank_report[name]
        # Each part is an interval between two marks inside the phase methods: never more than
        # the time measured around them.
        assert all(g >= -1e-9 for g in r["gaps"]), r["gaps"]
        # The rest is the call overhead of six methods. Work the timer misses would be in every
        # call; a preemption of a rank (2 ranks on 2 cores, shared memory polling) hits some
        # calls and not others, so the quietest call is the one that tells.
        assert min(r["gaps"]) <= len(PHASE_METHODS) * CALL_OVERHEAD_S, r
        assert statistics.median(r["totals"]) > 0


@pytest.mark.parametrize("name", NAMES)
def test_timing_changes_neither_bytes_nor_results(timed, name):
    for rank_report in timed:
        r = rank_report[name]
        assert r["cross_rank_bytes"] > 0
        assert r["same_bytes"]
        assert r["same_results"]


@pytest.mark.parametrize("name", NAMES)
def test_every_phase_and_direction_is_timed(timed, name):
    for rank_report in timed:
        parts = rank_report[name]["summary"]["mean_parts"]
        for direction in ("forward", "backward"):
            for phase in ("dispatch", "combine"):
                assert parts[direction][phase]["collective"] > 0, (direction, phase)
        assert parts["forward"]["dispatch"]["wait"] > 0  # counts exchange / barrier
        assert parts["forward"]["combine"]["combine"] > 0
        mode = dict((c[0], c[4]) for c in CONFIGS)[name]
        if mode == "barrier":  # the timed barrier is the wait of every collective phase
            for direction in ("forward", "backward"):
                for phase in ("dispatch", "combine"):
                    assert parts[direction][phase]["wait"] > 0, (direction, phase)
        summary = rank_report[name]["summary"]
        assert summary["calls"] == CALLS
        assert summary["seconds"] == pytest.approx(max(summary["per_rank_seconds"]))


def test_the_shm_transport_reports_its_wait_for_the_slowest_peer(timed):
    # Barrier-free: a rank waits only when it arrives before its peer, so over both ranks and
    # every call of combine (which has no counts exchange) some wait shows.
    waits = [rank_report["dedup/shm"]["summary"]["mean_parts"][d]["combine"]["wait"]
             for rank_report in timed for d in ("forward", "backward")]
    assert sum(waits) > 0
    pg = [rank_report["dedup"]["summary"]["mean_parts"][d]["combine"]["wait"]
          for rank_report in timed for d in ("forward", "backward")]
    assert sum(pg) == 0  # gloo can't tell: inside the collective


@pytest.mark.parametrize("name", ["dedup", "dedup/shm", "dedup-hier"])
def test_timing_on_adds_no_host_sync(timed, name):
    for rank_report in timed:
        r = rank_report[name]
        assert r["syncs_on"] == r["syncs_off"]
