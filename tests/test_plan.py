"""Planner, replicated placements, placement files and trace inputs (epruntime.plan, placement.*).

CPU-only, no ranks: pure functions and the CLIs' exit codes on small synthetic inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from epruntime import plan, simulate
from epruntime.model.placement_support import unsupported_reason
from epruntime.placement import Placement, PlacementError
from epruntime.placement.core import ReplicatedPlacementError
from epruntime.placement.file import load_placements, save_placements
from epruntime.placement.replicas import (eplb_placement, rank_loads_from_expert_loads,
                                          replicate, resolve_copies, traffic_replica_placement)
from epruntime.placement.strategies import traffic_aware_placement
from epruntime.traces import TraceError, load_trace

ROOT = Path(__file__).resolve().parents[1]


def balancedness(load_R) -> float:
    return float(np.mean(load_R) / np.max(load_R))


def skewed_loads(E=32, seed=0) -> np.ndarray:
    g = np.random.default_rng(seed)
    load = g.uniform(50, 150, E)
    load[3], load[E // 2 + 1] = 2000, 900  # hot experts: one alone outweighs a rank's fair share
    return load


# ---- Placement with copies ---------------------------------------------------------------------
def test_replicated_placement_maps():
    p = Placement.from_rank_lists([[0, 1, 2], [0, 3, 4]], 2)
    assert p.is_replicated and p.num_experts == 5 and p.num_redundant == 1
    assert p.logcnt_E.tolist() == [2, 1, 1, 1, 1]
    assert p.log2phy_EC[0].tolist() == [0, 3] and p.log2phy_EC[4].tolist() == [5, -1]
    with pytest.raises(ReplicatedPlacementError, match="rank_of_expert asked.*resolve_copies"):
        p.rank_of_expert
    with pytest.raises(ReplicatedPlacementError, match="copy-free accessor"):
        p.physical_E
    # EP larger than the number of logical experts
    q = Placement.from_rank_lists([[0], [1], [0], [1]], 2)
    assert q.num_ranks == 4 and q.num_experts == 2


@pytest.mark.parametrize("ranks, match", [
    ([[0, 0], [1, 2]], "two copies on rank 0"),
    ([[0, 1], [3, 4]], "logical expert 2 has no physical slot"),
    ([[0, 1], [2]], "same number"),
    ([[0, -1], [1, 2]], "ints >= 0"),
])
def test_bad_replicated_placement_named(ranks, match):
    with pytest.raises(PlacementError, match=match):
        Placement.from_rank_lists(ranks, 2)


def test_runtime_refuses_replicated_placement_by_name():
    """A dispatcher that does not route copies (megatron-core's) refuses them by name."""
    p = Placement.from_rank_lists([[0, 1, 2], [0, 3, 4]], 2)
    reason = unsupported_reason([object()], [p])
    assert reason is not None and "cannot route copies" in reason and "layer 0" in reason
    assert unsupported_reason([object()], [Placement.contiguous(4, 2)]) is None


def test_replicated_placement_round_trips_through_file(tmp_path):
    ps = [eplb_placement(skewed_loads(seed=s), 8, 4, redundant=8) for s in range(3)]
    path = save_placements(tmp_path / "p.json", ps, "abc123", "eplb")
    back, header = load_placements(path)
    assert back == ps and header["trace_sha256"] == "abc123"
    assert all(p.is_replicated and p.num_physical == 40 for p in back)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(format="nope"), "'format'"),
    (lambda d: d.update(num_ranks=0), "'num_ranks'"),
    (lambda d: d.update(layers=[]), "'layers'"),
    (lambda d: d["layers"][0].update(layer=3), "layers\\[0\\].*'layer'"),
    (lambda d: d["layers"][1]["phy2log"].__setitem__(0, 99), "layers\\[1\\].*expert 99"),
    (lambda d: d["layers"][0].update(phy2log=[0, 0, 1, 2, 3, 4, 5, 6]), "two copies on rank 0"),
    (lambda d: d["layers"][0].update(phy2log="x"), "'phy2log'"),
])
def test_bad_placement_file_named(tmp_path, edit, match):
    ps = [Placement.contiguous(8, 4)] * 2
    doc = json.loads(save_placements(tmp_path / "p.json", ps, None).read_text())
    edit(doc)
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(PlacementError, match=match):
        load_placements(tmp_path / "p.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlacementError, match="not JSON"):
        load_placements(tmp_path / "bad.json")


# ---- strategies --------------------------------------------------------------------------------
def test_replicate_gives_slots_to_heaviest_per_copy():
    assert replicate(np.array([100.0, 10, 10, 10]), 7).tolist() == [4, 1, 1, 1]


def test_replicas_balance_skewed_loads_and_beat_eplb_without_copies():
    load = skewed_loads()
    for red in (0, 8, 16):
        base = balancedness(rank_loads_from_expert_loads(load, eplb_placement(load, 8, 8, red)))
        ours = balancedness(rank_loads_from_expert_loads(
            load, traffic_replica_placement(None, load, 8, 8, red)))
        assert ours >= base - 1e-12
    # without copies, expert 3 alone caps the balance; 16 copies (6 slots per rank) fix it
    assert balancedness(rank_loads_from_expert_loads(
        load, traffic_replica_placement(None, load, 8, 8, 0))) < 0.5
    assert balancedness(rank_loads_from_expert_loads(
        load, traffic_replica_placement(None, load, 8, 8, 16))) >= 0.99


def test_copies_never_share_a_rank():
    load = skewed_loads(E=16)
    for fn in (lambda: eplb_placement(load, 4, 2, 12), lambda: traffic_replica_placement(
            torch.ones(16, 16), load, 4, 2, 12)):
        p = fn()
        for rank in p.experts_per_rank():
            assert len(set(rank)) == len(rank)


def test_traffic_aware_on_loads_only_does_not_stop_at_the_cap():
    """Diagonal co-activation (loads only): the 1.1 cap used to end the search at ~0.91."""
    load = torch.tensor(np.random.default_rng(3).uniform(1, 100, 64))
    p = traffic_aware_placement(torch.diag(load), 8, load_E=load)
    r = np.bincount(np.array(p.rank_of_expert), weights=load.numpy(), minlength=8)
    assert balancedness(r) >= 0.999


def test_resolve_copies_prefers_own_rank_then_node():
    # expert 0 on ranks 0 and 2; ranks 0,1 = node 0, ranks 2,3 = node 1
    p = Placement.from_rank_lists([[0, 1], [2, 3], [0, 4], [5, 6]], 2)
    idx = torch.tensor([[0], [0], [0], [0]])
    src = torch.tensor([0, 1, 2, 3])
    phys = resolve_copies(idx, p, src)
    assert (phys[:, 0] // 2).tolist() == [0, 0, 2, 2]
    # from outside the EP group: spread over both copies in turn
    phys = resolve_copies(torch.zeros(6, 1, dtype=torch.long), p, None)
    assert sorted((phys[:, 0] // 2).tolist()) == [0, 0, 0, 2, 2, 2]


# ---- trace inputs ------------------------------------------------------------------------------
def megatron_record(layer, rank, top, token_idx=None, step=0):
    rec = {"step": step, "stage": "train", "block": 0, "layer": layer, "rank": rank,
           "num_tokens": len(top), "topk": len(top[0]), "top_indices": top}
    if token_idx is not None:
        rec["token_idx"] = token_idx
    return rec


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_megatron_trace_keeps_token_identity_when_tokens_drop(tmp_path):
    # layer 1's collector dropped token 1 (padding): token_idx says which rows remain
    path = write_jsonl(tmp_path / "router_trace.json", [   # a JSONL named .json, on purpose
        megatron_record(0, 0, [[0, 1], [2, 3], [4, 5], [6, 7]], [0, 1, 2, 3]),
        megatron_record(1, 0, [[7, 6], [5, 4], [3, 2]], [0, 2, 3])])
    r = plan.load_routing(path)
    assert r.experts_LTK.shape == (2, 4, 2)
    assert r.experts_LTK[1, 1].tolist() == [-1, -1]  # token 1 absent from layer 1
    assert r.experts_LTK[1, 2].tolist() == [5, 4] and r.experts_LTK[0, 2].tolist() == [4, 5]
    trace = load_trace(path)  # the simulator reads it too, by content
    assert trace.num_records == 7 and trace.token_N.tolist() == [0, 1, 2, 3, 0, 2, 3]


def test_routed_experts_npy_and_split(tmp_path):
    g = np.random.default_rng(0)
    arr = np.stack([g.choice(16, (400, 2), replace=True) for _ in range(3)], axis=1)
    arr[:, :, 1] = (arr[:, :, 0] + 1) % 16  # distinct experts per token
    np.save(tmp_path / "routed.npy", arr)
    r = plan.load_routing(tmp_path / "routed.npy")
    fit, score = plan.split_routing(r, 0.5)
    assert fit.experts_LTK.shape == (3, 200, 2) and score.experts_LTK.shape == (3, 200, 2)
    assert torch.equal(score.experts_LTK, torch.from_numpy(arr[200:]).permute(1, 0, 2).long())


def run_cli(module, *args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def loads_file(path, loads_LE):
    path.write_text(json.dumps({"num_experts": loads_LE.shape[1], "expert_usage_by_layer": {
        str(l): {str(e): float(v) for e, v in enumerate(row)} for l, row in enumerate(loads_LE)}}))
    return path


def test_plan_cli_on_traffic_trace_held_out(tmp_path):
    """Tokens pick experts in planted groups of 4; fit on half, score on the rest: traffic+load
    with copies keeps rows low and balance high on the held-out half."""
    g = np.random.default_rng(1)
    T, E, K = 3000, 16, 4
    group = g.integers(0, 4, T)
    top = np.stack([g.permutation(4)[:K] + 4 * grp for grp in group])
    np.save(tmp_path / "r.npy", np.stack([top, top], axis=1))
    out = run_cli("epruntime.plan", "--fit", tmp_path / "r.npy", "--split", "0.5", "--ep", "4",
                  "--redundant", "4", "--json", tmp_path / "rep.json", "--out", tmp_path / "p.json")
    assert out.returncode == 0, out.stderr
    assert "held-out" in out.stdout
    rep = json.loads((tmp_path / "rep.json").read_text())
    rows = rep["rows"]
    keys = {"strategy", "layer", "redundant", "balancedness", "overload", "rows_per_token",
            "dedup_rows_per_token", "inter_node_rows"}
    assert all(keys <= set(r) for r in rows)
    by = {(r["strategy"], r["redundant"], r["layer"]): r for r in rows}
    for layer in (0, 1):
        contig, ours = by[("contiguous", 0, layer)], by[("traffic+load", 4, layer)]
        assert ours["dedup_rows_per_token"] < 0.5 * contig["rows_per_token"]
        assert ours["balancedness"] >= 0.9
    placements, header = load_placements(tmp_path / "p.json")
    assert len(placements) == 2 and placements[0].num_physical == 20
    assert len(header["trace_sha256"]) == 64


def test_plan_cli_loads_fit_and_score(tmp_path):
    load = np.stack([skewed_loads(seed=s) for s in range(2)])
    fit = loads_file(tmp_path / "fit.json", load)
    score = loads_file(tmp_path / "score.json", load * 1.01)
    out = run_cli("epruntime.plan", "--fit", fit, "--score", score, "--ep", "8", "--redundant",
                  "16", "--json", tmp_path / "rep.json")
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "rep.json").read_text())["rows"]
    ours = [r for r in rows if r["strategy"] == "traffic+load" and r["redundant"] == 16]
    assert len(ours) == 2 and all(r["balancedness"] >= 0.99 for r in ours)
    assert all(r["rows_per_token"] is None for r in rows)  # loads only: no row columns


@pytest.mark.parametrize("content, args, match", [
    ([megatron_record(0, 0, [[0, 1]])], [], None),  # sanity: the good record works
    ([{"step": 0, "layer": 0, "rank": 0, "num_tokens": 1, "topk": 2}], [], "'top_indices'"),
    ([megatron_record(0, 0, [[0, 1]]) | {"num_tokens": 2}], [], "'top_indices'"),
    ([megatron_record(0, 0, [[0, 1]]) | {"layer": -1}], [], "'layer'"),
    ([megatron_record(0, 0, [[0, 1], [2, 3]], [0, 0])], [], "'token_idx'"),
    ([megatron_record(0, 0, [[0, 9]])], ["--num-experts", "4"], "expert id 9"),
    ([megatron_record(0, 0, [[0, 1]])], ["--split", "0.5"], "--split"),
    ([megatron_record(0, 0, [[0, 1], [1, 2]])], ["--redundant", "-1"], "--redundant"),
    ([megatron_record(0, 0, [[0, 1], [1, 2]])], ["--ep", "5"], "no strategy fits"),
])
def test_plan_bad_inputs_named_exit_2(tmp_path, content, args, match):
    path = write_jsonl(tmp_path / "t.jsonl", content)
    ep = [] if "--ep" in args else ["--ep", "2"]
    out = run_cli("epruntime.plan", "--fit", path, *ep, *args)
    if match is None:
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode == 2 and match in out.stderr, out.stderr


@pytest.mark.parametrize("doc, match", [
    ({"expert_usage_by_layer": {"0": {"0": -5, "1": 3}}}, "loads must be finite"),
    ({"expert_usage_by_layer": {}}, "'expert_usage_by_layer'"),
    ({"num_experts": 2, "expert_usage_by_layer": {"0": {"0": 1, "5": 3}}}, "expert id 5"),
    ({"expert_usage_by_layer": {"x": {"0": 1}}}, "must be integers"),
])
def test_plan_bad_loads_named_exit_2(tmp_path, doc, match):
    (tmp_path / "l.json").write_text(json.dumps(doc))
    out = run_cli("epruntime.plan", "--fit", tmp_path / "l.json", "--ep", "2")
    assert out.returncode == 2 and match in out.stderr, out.stderr


def test_plan_bad_npy_named(tmp_path):
    np.save(tmp_path / "r.npy", np.zeros((4, 2)))
    out = run_cli("epruntime.plan", "--fit", tmp_path / "r.npy", "--ep", "2")
    assert out.returncode == 2 and "[tokens, layers, top_k]" in out.stderr


# ---- simulator ---------------------------------------------------------------------------------
def native_jsonl(path, experts_per_token, layers=2):
    path.write_text("".join(json.dumps({"layer": l, "experts": ex, "gating_probs":
                                        [1.0 / len(ex)] * len(ex)}) + "\n"
                            for l in range(layers) for ex in experts_per_token))
    return path


def test_simulate_jsonl_named_json_and_expert_count(tmp_path):
    path = native_jsonl(tmp_path / "trace.json", [[0, 1], [2, 3], [4, 5], [6, 7]])
    ok = run_cli("epruntime.simulate", "--trace", path, "--ep", "2")
    assert ok.returncode == 0, ok.stderr
    assert "pickle" not in ok.stderr
    phantom = run_cli("epruntime.simulate", "--trace", path, "--ep", "2", "--num-experts", "64")
    assert phantom.returncode == 0 and "56 of --num-experts=64 never routed" in phantom.stderr
    beyond = run_cli("epruntime.simulate", "--trace", path, "--ep", "2", "--num-experts", "4")
    assert beyond.returncode == 2 and "expert id 7" in beyond.stderr
    nothing = run_cli("epruntime.simulate", "--trace", path, "--ep", "3,5")
    assert nothing.returncode == 2 and "nothing to simulate" in nothing.stderr


def test_simulate_scores_replicated_placement_file(tmp_path):
    path = native_jsonl(tmp_path / "t.jsonl", [[0, 1], [0, 2], [0, 3], [0, 1]] * 8, layers=1)
    trace = load_trace(path)
    rep = [Placement.from_rank_lists([[0, 1], [0, 2], [0, 3], [4, 5]], 4)]
    rep = [Placement.from_rank_lists([[0, 1, 4], [0, 2, 5], [0, 3, 6], [0, 7, 4]], 4)]
    trace8 = load_trace(native_jsonl(tmp_path / "t8.jsonl",
                                     [[0, 1], [0, 2], [0, 3], [0, 7], [4, 5], [6, 0]] * 8, 1))
    save_placements(tmp_path / "p.json", rep, None)
    res = simulate.simulate(trace8, "dedup", 4, 4, f"file:{tmp_path / 'p.json'}")
    contiguous = simulate.simulate(trace8, "dedup", 4, 4, "contiguous")
    assert res.summary()["balancedness"] > contiguous.summary()["balancedness"]
    out = run_cli("epruntime.simulate", "--trace", tmp_path / "t8.jsonl", "--ep", "4",
                  "--placement", f"file:{tmp_path / 'p.json'}")
    assert out.returncode == 0, out.stderr
    assert trace.num_records == 32
    with pytest.raises(TraceError):
        load_trace(tmp_path / "missing")


def test_bench_plan_quick_writes_the_schema(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "profiling/bench.py", "plan", "--quick", "--sections",
                           "scale", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["name"] == "plan" and result["rows"]
    assert {"goal", "strategy", "layer", "redundant", "balancedness", "overload",
            "rows_per_token", "dedup_rows_per_token", "inter_node_rows"} <= set(result["rows"][0])
    assert result["ratios"]["scale_redundant_used"] == 64  # 256 + 32 does not fill 64 ranks


def test_dispatch_placement_spec_is_checked_by_name():
    from pydantic import ValidationError

    from epruntime.config import DispatchConfig
    assert DispatchConfig(kind="dedup", placement="file:p.json").placement == "file:p.json"
    for bad in ("foo", "file:", "file:  "):
        with pytest.raises(ValidationError, match="dispatch.placement"):
            DispatchConfig(kind="dedup", placement=bad)


def test_missing_placement_file_named(tmp_path):
    with pytest.raises(PlacementError, match="placement file .*missing.json"):
        load_placements(tmp_path / "missing.json")
