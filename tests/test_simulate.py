"""Routing traces and the scale simulator: at the recorded EP size and placement the simulator's
rows and bytes equal the CommLedger's of real gloo runs, for every dispatcher; the alpha-beta
model, the JSONL loader, sampling, and a sweep to EP 256 / 32 nodes."""

from __future__ import annotations

import json

import pytest
import torch

from epruntime.placement import Placement
from epruntime.simulate import (LinkModel, PRESETS, exchange_time, main as simulate_main,
                                simulate, source_ranks, sweep)
from epruntime.traces import (RoutingTrace, TraceError, TraceHeader, load_jsonl, load_trace,
                              sample_mask)
from tests.dist import spawn
from tests.test_dedup_dispatch import GLOBAL_BATCH, small_config

# (name, dispatch kind, ranks_per_node as a fraction of EP, shuffled placement)
VARIANTS = [("alltoall", "alltoall", 1, False), ("dedup", "dedup", 1, False),
            ("dedup+shuffled", "dedup", 1, True), ("dedup@2nodes", "dedup", 2, False),
            ("dedup-hier@2nodes", "dedup-hier", 2, False)]


def _record_worker(rank: int, ep_size: int, out: str) -> None:
    from epruntime import distributed
    from epruntime.data import SyntheticVQA, shard_slice
    from epruntime.engine import Engine
    from epruntime.traces import TraceRecorder

    env = distributed.init_distributed(small_config(ep_size, "alltoall"))
    ds = SyntheticVQA(64, image_size=16, question_len=6, seed=3)
    summaries = {}
    for name, kind, nodes, shuffled in VARIANTS:
        distributed.seed_all(0)
        extra = (f"dispatch.ranks_per_node={ep_size // nodes}",) if nodes > 1 else ()
        engine = Engine(small_config(ep_size, kind, *extra), env, len(ds.vocab), ds.num_answers,
                        ds.max_question_len)
        if shuffled:
            order = torch.randperm(8, generator=torch.Generator().manual_seed(1))
            shuffled_p = Placement.from_rank_lists(order.view(ep_size, -1).tolist())
            engine.model.set_placements([shuffled_p] * 2)
        recorder = TraceRecorder(engine.model, env.ep_rank, ep_size, engine.ranks_per_node,
                                 sample_rate=1.0, seed=0, dispatch=kind)
        engine.ledger.reset()
        for step in range(2):  # two forward calls per layer, different batches
            idx = torch.arange(GLOBAL_BATCH) + step * GLOBAL_BATCH
            local = ds.batch(idx[shard_slice(GLOBAL_BATCH, env.dp_rank, env.dp_size)])
            engine.forward_backward(local, GLOBAL_BATCH)
        recorder.close()
        recorder.save(f"{out}/{name}", env.rank)
        summaries[name] = engine.comm_summary()
    if rank == 0:
        torch.save(summaries, f"{out}/summaries.pt")


def _assert_same(got, want, path="summary"):
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for k in want:
            if k != "forward_calls":  # the ledger's own call counter, not a traffic figure
                _assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-12), path
    else:
        assert got == want, path


@pytest.mark.parametrize("ep_size", [2, 4])
def test_simulator_equals_ledger_of_real_runs(tmp_path, ep_size):
    spawn(_record_worker, ep_size, ep_size, str(tmp_path))
    summaries = torch.load(tmp_path / "summaries.pt", weights_only=False)
    for name, kind, nodes, shuffled in VARIANTS:
        trace = load_trace(tmp_path / name)
        h = trace.header
        assert (h.ep_size, h.num_experts, h.topk, h.hidden) == (ep_size, 8, 3, 32)
        assert h.sample_rate == 1.0
        assert trace.calls_L.tolist() == [2, 2]
        tokens = (6 + 16) * GLOBAL_BATCH * 2  # per layer: seq x batch x 2 calls
        assert trace.tokens_seen_L.tolist() == [tokens, tokens]
        assert trace.num_records == 2 * tokens and bool((trace.experts_NK >= 0).all())
        placement = "trace" if shuffled else "contiguous"
        sim = simulate(trace, kind, ep_size, ep_size // nodes, placement)
        want = summaries[name]
        _assert_same(sim.summary(), want, name)
        # the headline facts, spelled out
        got = sim.summary()
        for key in ("rows_sent", "inter_node_rows", "payload_bytes", "meta_bytes", "control_bytes",
                    "cross_rank_bytes", "intra_node_bytes", "inter_node_bytes",
                    "dispatch_cross_rank_bytes", "combine_cross_rank_bytes"):
            assert got[key] == want[key], (name, key)
        assert got["rows_sent"] > 0
    # a trace recorded under one dispatcher predicts the others (routing does not depend on it)
    trace = load_trace(tmp_path / "dedup")
    assert simulate(trace, "alltoall", ep_size).summary()["rows_sent"] == \
        summaries["alltoall"]["rows_sent"]


# ---- start-up --------------------------------------------------------------------------------
_STARTUP = """
import sys, time
t0 = time.perf_counter()
import epruntime.simulate
seconds = time.perf_counter() - t0
try:
    epruntime.simulate.main(["--help"])
except SystemExit:
    pass
megatron = sorted(m for m in sys.modules if m.startswith("megatron"))
print(repr((bool(megatron), megatron[:3], seconds)))
"""


def test_the_simulator_starts_without_megatron_core_in_under_3_s(python_env):
    import subprocess
    import sys

    runs = []
    for _ in range(2):  # the better of two: these cores are shared
        out = subprocess.run([sys.executable, "-c", _STARTUP], env=python_env, check=True,
                             capture_output=True, text=True).stdout.splitlines()[-1]
        runs.append(eval(out))
    for imported, modules, _ in runs:
        assert not imported, modules  # the row plan and the ledger do not need megatron-core
    assert min(seconds for _, _, seconds in runs) <= 3.0, runs


# ---- alpha-beta model ------------------------------------------------------------------------
def test_alpha_beta_exchange_time_by_hand():
    link = LinkModel(intra_bandwidth=100.0, inter_bandwidth=10.0, intra_latency=1.0,
                     inter_latency=5.0, concurrent_links=True)
    # 4 ranks, 2 per node. Rank 0 sends 200 B to rank 1 (intra), 30 B to rank 2 (inter).
    b = torch.zeros(4, 4)
    b[0, 1], b[0, 2], b[0, 0] = 200, 30, 1e9  # the diagonal is local and free
    # send side of rank 0: intra 1 + 200/100 = 3, inter 5 + 30/10 = 8 -> max 8 (links overlap)
    assert exchange_time(b, 2, link) == pytest.approx(8.0)
    serial = link.model_copy(update={"concurrent_links": False})
    assert exchange_time(b, 2, serial) == pytest.approx(11.0)
    # receive side can be the bottleneck: ranks 0, 1, 3 each send 10 B to rank 2
    b = torch.zeros(4, 4)
    b[0, 2], b[1, 2], b[3, 2] = 10, 10, 10
    # rank 2 receives 2 inter messages (5 + 5 + 20/10 = 12) and 1 intra (1 + 10/100 = 1.1)
    assert exchange_time(b, 2, serial) == pytest.approx(12 + 1.1)
    assert exchange_time(torch.zeros(3, 3), 1, link) == 0.0


def test_presets_cite_sources():
    for name, link in PRESETS.items():
        assert link.source and link.intra_bandwidth >= link.inter_bandwidth, name
    assert PRESETS["cpu-gloo"].intra_bandwidth < 2e9  # measured ~0.6 GB/s per rank here


# ---- loaders and sampling --------------------------------------------------------------------
def _jsonl(tmp_path, lines):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_loader(tmp_path):
    path = _jsonl(tmp_path, [
        '{"layer": 0, "experts": [0, 5], "gating_probs": [0.6, 0.4], "modality": 1, "rank": 1}',
        '{"layer": 0, "experts": [2, 3], "gating_probs": [0.5, 0.5]}',
        '',
        '{"layer": 1, "experts": [7], "gating_probs": [1.0], "rank": 1}',
    ])
    t = load_jsonl(path, num_experts=8, hidden=16)
    h = t.header
    assert (h.num_experts, h.topk, h.num_layers, h.ep_size) == (8, 2, 2, 2)
    assert t.experts_NK.tolist() == [[0, 5], [2, 3], [7, -1]]
    assert t.rank_N.tolist() == [1, 0, 1] and t.modality_N.tolist() == [1, 255, 255]
    assert t.token_N.tolist() == [0, 0, 0]
    assert load_trace(path).header.num_experts == 8  # defaults to the largest id + 1
    # 2 ranks, 4 experts each: token 0 of rank 1 needs expert 0 on rank 0 (one remote row; 5 is
    # local); experts 2, 3 of rank 0's token and 7 of rank 1's are local.
    s = simulate(t, "alltoall", 2).summary()
    assert (s["rows_sent"], s["per_layer"][1]["rows_sent"]) == (1, 0)
    assert s["payload_bytes"] == 2 * 16 * 2 and s["meta_bytes"] == 4  # dispatch + combine, bf16
    assert s["dispatch_vision_cross_rank_rows"] == 1


@pytest.mark.parametrize("line, needle", [
    ('{"layer": 0, "experts": [1]}', "t.jsonl:2: missing field 'gating_probs'"),
    ('{"layer": -1, "experts": [1], "gating_probs": [1]}', "t.jsonl:2: field 'layer'"),
    ('{"layer": 0, "experts": [1, "x"], "gating_probs": [1, 1]}', "t.jsonl:2: field 'experts'"),
    ('{"layer": 0, "experts": [1, 1], "gating_probs": [1, 1]}', "repeats an expert"),
    ('{"layer": 0, "experts": [1, 2], "gating_probs": [1]}', "t.jsonl:2: field 'gating_probs'"),
    ('{"layer": 0, "experts": [1], "gating_probs": [1], "modality": 3}', "field 'modality'"),
    ('{"layer": 0, "experts": [1], "gating_probs": [1], "rank": "a"}', "field 'rank'"),
    ('{"layer": 0, "experts": [1], ', "t.jsonl:2: not JSON"),
    ('[1, 2]', "t.jsonl:2: expected an object"),
])
def test_jsonl_bad_lines_name_line_and_field(tmp_path, line, needle):
    good = '{"layer": 0, "experts": [0], "gating_probs": [1.0]}'
    with pytest.raises(TraceError, match=needle.replace("[", r"\[")):
        load_jsonl(_jsonl(tmp_path, [good, line]))


def test_missing_trace_and_cli_error(tmp_path, capsys):
    with pytest.raises(TraceError, match="no such trace"):
        load_trace(tmp_path / "nope")
    assert simulate_main(["--trace", str(tmp_path / "nope")]) == 2
    assert "no such trace" in capsys.readouterr().err


def test_sampling_rate_is_honoured_and_deterministic():
    keep = torch.cat([sample_mask(1000, 0.25, seed=7, rank=r, call=c)
                      for r in range(2) for c in range(10)])
    assert abs(keep.float().mean().item() - 0.25) < 0.02
    assert torch.equal(sample_mask(1000, 0.25, 7, 1, 3), sample_mask(1000, 0.25, 7, 1, 3))
    assert not torch.equal(sample_mask(1000, 0.25, 7, 1, 3), sample_mask(1000, 0.25, 8, 1, 3))
    assert sample_mask(5, 1.0, 0, 0, 0).all()


class _FakeRouter(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg

    def forward(self, x):
        scores = x[:, : self.config.num_moe_experts]
        top = scores.topk(self.config.moe_router_topk, dim=1).indices
        routing = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
        return torch.softmax(scores, 1) * routing, routing


def _fake_model(layers=2, experts=8, topk=2, hidden=16):
    """Routers and the model's one router tap, as TraceRecorder reads them."""
    from types import SimpleNamespace

    from epruntime.model.router_tap import RouterTap
    from epruntime.runtime import TokenStream

    cfg = SimpleNamespace(num_moe_experts=experts, moe_router_topk=topk, hidden_size=hidden)
    routers = [_FakeRouter(cfg) for _ in range(layers)]
    decoder_layers = [SimpleNamespace(mlp=SimpleNamespace(router=r)) for r in routers]
    return SimpleNamespace(gpt=SimpleNamespace(decoder=SimpleNamespace(layers=decoder_layers)),
                           router_tap=RouterTap(routers, TokenStream()))


def test_recorder_samples_same_tokens_in_every_layer_and_roundtrips(tmp_path):
    from epruntime.traces import TraceRecorder

    model = _fake_model()
    rec = TraceRecorder(model, ep_rank=1, ep_size=2, sample_rate=0.3, seed=5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(500, 16, generator=gen)
        for layer in model.gpt.decoder.layers:
            layer.mlp.router(x)
    rec.close()
    path = rec.save(tmp_path, world_rank=1)
    assert path.name == "rank00001.npz"
    t = load_trace(tmp_path)
    assert t.header.sample_rate == 0.3 and t.calls_L.tolist() == [4, 4]
    assert t.tokens_seen_L.tolist() == [2000, 2000]
    per_layer = [t.layer(i) for i in range(2)]
    assert torch.equal(per_layer[0].token_N, per_layer[1].token_N)  # same tokens each layer
    assert abs(per_layer[0].num_records / 2000 - 0.3) < 0.05
    assert (t.rank_N == 1).all() and (t.modality_N == 255).all()
    assert t.weights_NK.dtype == torch.float32 and (t.experts_NK >= 0).all()
    # the scale-up estimate is close to the full count
    res = simulate(t, "dedup", 2)
    assert res.scale == pytest.approx(1 / 0.3)


# ---- sweep -----------------------------------------------------------------------------------
def _random_trace(tokens=2048, experts=256, topk=8, layers=1, ranks=2, seed=0) -> RoutingTrace:
    gen = torch.Generator().manual_seed(seed)
    # a skewed router: tokens prefer a few experts, as trained routers do
    bias = torch.randn(experts, generator=gen) * 2
    logits = torch.randn(layers * tokens, experts, generator=gen) + bias
    top = logits.topk(topk, dim=1)
    n = layers * tokens
    header = TraceHeader(num_experts=experts, topk=topk, num_layers=layers, ep_size=ranks,
                         hidden=7168, hidden_dtype_bytes=2)
    position = torch.arange(tokens).repeat(layers)
    return RoutingTrace(header, torch.arange(layers).repeat_interleave(tokens),
                        torch.zeros(n, dtype=torch.long), position // ranks, position % ranks,
                        torch.randint(0, 2, (n,), generator=gen), top.indices,
                        torch.softmax(top.values, 1), torch.ones(layers, dtype=torch.long),
                        torch.full((layers,), tokens))


def test_sweep_to_ep256_and_32_nodes_gives_monotone_facts(tmp_path):
    trace = _random_trace()
    eps, nodes = [8, 16, 32, 64, 128, 256], [1, 2, 4, 8, 16, 32]
    out = sweep(trace, eps, nodes, link=PRESETS["nvlink-ib"])
    got = {(r["ep_size"], r["num_nodes"], r["kind"]): r for r in out["results"]}
    assert {(s["ep_size"], s["num_nodes"]) for s in out["skipped"]} == {(8, 16), (8, 32), (16, 32)}
    assert len(got) == (len(eps) * len(nodes) - 3) * 3
    pairs = 2048 * 8
    for (ep, n, kind), r in got.items():
        mega, dedup, hier = (got[(ep, n, k)] for k in ("alltoall", "dedup", "dedup-hier"))
        assert dedup["rows_sent"] <= mega["rows_sent"] <= pairs
        assert dedup["rows_sent"] == dedup["floor_rows"] == mega["floor_rows"]
        assert hier["inter_node_rows"] <= dedup["inter_node_rows"]
        assert hier["inter_node_bytes"] <= mega["inter_node_bytes"]
        if n == 1:
            assert r["inter_node_bytes"] == 0
        assert r["forward_comm_s"] > 0
    # more ranks: more of a token's experts are remote, and its k experts spread over more ranks
    for kind in ("alltoall", "dedup"):
        rows = [got[(ep, 1, kind)]["rows_sent"] for ep in eps]
        assert rows == sorted(rows)
    # at a fixed EP, more nodes: more inter-node traffic for the flat dispatchers
    inter = [got[(256, n, "dedup")]["inter_node_rows"] for n in nodes]
    assert inter == sorted(inter)
    # the CLI writes the same thing as JSON
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"layer": 0, "experts": e, "gating_probs": [0.125] * 8})
                              for e in trace.experts_NK[:256].tolist()))
    assert simulate_main(["--trace", str(path), "--num-experts", "256", "--ep", "8,256",
                          "--nodes", "1,32", "--preset", "cpu-gloo",
                          "--json", str(tmp_path / "s.json")]) == 0
    saved = json.loads((tmp_path / "s.json").read_text())
    assert len(saved["results"]) == 3 * 3 and saved["link"]["name"] == "cpu-gloo"


def test_round_robin_source_ranks_beyond_the_recorded_ep():
    trace = _random_trace(tokens=64, experts=16, topk=2, ranks=2)
    src = source_ranks(trace, 8)
    assert torch.bincount(src, minlength=8).tolist() == [8] * 8
    assert torch.equal(source_ranks(trace, 2), trace.rank_N)


# ---- empty traces ----------------------------------------------------------------------------
def _finish(rec, directory):
    """traces.finish_recording as train.py / infer.py call it, with trace.path=directory."""
    from types import SimpleNamespace

    from epruntime.traces import finish_recording

    cfg = SimpleNamespace(trace=SimpleNamespace(path=directory))
    return finish_recording(rec, cfg, SimpleNamespace(rank=0), directory.parent)


def test_tiny_sample_rate_warns_and_the_simulator_refuses_the_empty_trace(tmp_path, capsys):
    from epruntime.traces import TraceRecorder

    model = _fake_model()
    rec = TraceRecorder(model, ep_rank=0, ep_size=2, sample_rate=1e-9, seed=5)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for layer in model.gpt.decoder.layers:
            layer.mlp.router(x)
    path = _finish(rec, tmp_path / "traces")
    assert path == tmp_path / "traces/rank00000.npz"
    assert capsys.readouterr().err.splitlines() == [
        "epruntime: warning: trace.sample_rate=1e-09 sampled none of the 150 tokens routed in 3 "
        f"forward calls; the trace {path} is empty (raise trace.sample_rate)"]
    trace = load_trace(tmp_path / "traces")
    assert trace.num_records == 0 and trace.tokens_seen_L.tolist() == [150, 150]
    refusal = (f"{tmp_path / 'traces'}: the trace holds no tokens (recorded with "
               "trace.sample_rate=1e-09, 150 tokens routed before sampling), so there is nothing "
               "to simulate; record it again with a higher trace.sample_rate")
    assert simulate_main(["--trace", str(tmp_path / "traces")]) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [f"epruntime.simulate: {refusal}"] and out.out == ""
    with pytest.raises(ValueError, match="the trace holds no tokens"):
        simulate(trace, "dedup", 2)


def test_recording_without_forward_calls_warns(tmp_path, capsys):
    from epruntime.traces import TraceRecorder

    path = _finish(TraceRecorder(_fake_model(), ep_rank=0, ep_size=1), tmp_path / "traces")
    assert capsys.readouterr().err.splitlines() == [
        "epruntime: warning: trace.enabled recorded no forward calls on this rank (no steps ran "
        f"while recording?); the trace {path} is empty"]


def test_a_trace_with_tokens_records_without_a_warning(tmp_path, capsys):
    from epruntime.traces import TraceRecorder

    model = _fake_model()
    rec = TraceRecorder(model, ep_rank=0, ep_size=1, sample_rate=0.5)
    for layer in model.gpt.decoder.layers:
        layer.mlp.router(torch.randn(40, 16))
    _finish(rec, tmp_path / "traces")
    assert capsys.readouterr().err == ""
