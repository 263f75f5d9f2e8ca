"""The scale simulator (epruntime.scale): time model properties, presets against the fits that
chose them, the FLOPs model against a published throughput, the projection for both shapes, and
the calibration benchmark's JSON schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epruntime.scale import calibrate
from epruntime.scale.compute import ACHIEVED_TFLOPS_H100, SHAPES, layer_flops
from epruntime.scale.links import PRESETS, get_preset
from epruntime.scale.project import Scenario, assign_copies, project, replicate
from epruntime.scale.timemodel import (collective_seconds, phase_seconds, predict_phase_seconds,
                                       rank_tier_seconds)
from epruntime.placement import Placement

ROOT = Path(__file__).resolve().parents[1]
GPU = PRESETS["h800-deepep"]


def uniform(r: int, nbytes: float) -> torch.Tensor:
    return torch.full((r, r), nbytes, dtype=torch.float64).fill_diagonal_(0)


# ---- time model ----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_time_is_monotone_in_bytes(preset):
    p = PRESETS[preset]
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(16, 16, generator=gen, dtype=torch.float64) * 1e6
    t0 = collective_seconds(base, 8, p)
    for i, j in [(0, 1), (3, 12), (15, 0)]:
        more = base.clone()
        more[i, j] *= 10
        assert collective_seconds(more, 8, p) >= t0
    assert collective_seconds(base * 2, 8, p) > t0


def test_slowest_rank_sets_the_time_and_the_diagonal_is_free():
    r = 8
    light = uniform(r, 1e5)
    heavy = light.clone()
    heavy[5, :] = 4e6  # rank 5 sends a lot (to itself too, which costs nothing)
    t_heavy = collective_seconds(heavy, r, GPU)
    only5 = torch.zeros(r, r, dtype=torch.float64)
    only5[5, :] = 4e6
    assert t_heavy == pytest.approx(collective_seconds(only5, r, GPU))
    assert t_heavy == pytest.approx(GPU.latency + 7 * 4e6 / GPU.intra_bandwidth)
    assert predict_phase_seconds(heavy, GPU, r)["slowest_rank_dispatch"] == 5
    diag = torch.diag(torch.full((r,), 1e9, dtype=torch.float64))
    assert collective_seconds(diag, r, GPU) == 0.0


def test_inter_node_tier_is_the_nic_and_tiers_run_at_once_on_gpus():
    r = 16  # two nodes of 8
    cross = torch.zeros(r, r, dtype=torch.float64)
    cross[0, 8] = 1e7  # node 0 -> node 1
    inside = torch.zeros(r, r, dtype=torch.float64)
    inside[0, 1] = 1e7
    t_cross, t_inside = collective_seconds(cross, 8, GPU), collective_seconds(inside, 8, GPU)
    assert t_cross == pytest.approx(GPU.latency + 1e7 / GPU.inter_bandwidth)
    assert t_inside == pytest.approx(GPU.latency + 1e7 / GPU.intra_bandwidth)
    assert t_cross > 2 * t_inside
    both = collective_seconds(cross + inside, 8, GPU)
    assert both == pytest.approx(t_cross)  # NVLink and the NIC overlap
    cpu = PRESETS["cpu-gloo"]  # one shared path: they add up
    intra, inter = rank_tier_seconds(cross + inside, 8, cpu)
    assert collective_seconds(cross + inside, 8, cpu) == pytest.approx(
        cpu.latency * 4 + float((intra + inter).max()))


def test_pipelined_phase_is_at_most_the_sequential_one():
    gen = torch.Generator().manual_seed(1)
    hops = [torch.rand(16, 16, generator=gen, dtype=torch.float64) * 1e6 for _ in range(2)]
    seq = phase_seconds(hops, 8, GPU)
    pipe = phase_seconds(hops, 8, GPU, pipelined=True)
    assert pipe <= seq
    assert seq == pytest.approx(sum(collective_seconds(h, 8, GPU) for h in hops))


def test_cpu_ranks_beyond_the_cores_slow_down():
    gloo = get_preset("cpu-gloo")
    assert collective_seconds(uniform(4, 1e6), 4, gloo) > collective_seconds(uniform(2, 3e6), 2, gloo)


def test_predict_phase_seconds_uses_the_transpose_for_combine_and_rejects_bad_traffic():
    t = torch.zeros(4, 4, dtype=torch.float64)
    t[0, 1:] = 1e6  # rank 0 sends: its combine receives the same
    out = predict_phase_seconds(t, "cpu-shm")
    assert out["dispatch"] == pytest.approx(out["combine"]) and out["total"] > 0
    with pytest.raises(ValueError, match="square"):
        predict_phase_seconds(torch.zeros(3, 4), "cpu-shm")
    with pytest.raises(ValueError, match="ranks_per_node"):
        collective_seconds(torch.zeros(6, 6), 4, GPU)
    with pytest.raises(ValueError, match="link preset"):
        get_preset("no-such-link")


# ---- presets are what their fits give -------------------------------------------------------
def test_cpu_presets_equal_their_fit_on_the_committed_measurement():
    rows = json.loads((ROOT / "profiling/results/alltoall_cpu_fit.json").read_text())["rows"]
    gloo, shm = calibrate.fit_cpu_preset(rows, "gloo"), calibrate.fit_cpu_preset(rows, "shm")
    assert PRESETS["cpu-gloo"].latency == pytest.approx(gloo["fixed_seconds"], rel=0.01)
    assert PRESETS["cpu-gloo"].intra_bandwidth == pytest.approx(gloo["bandwidth"], rel=0.01)
    assert PRESETS["cpu-shm"].message_latency == pytest.approx(shm["fixed_seconds"], rel=0.01)
    assert PRESETS["cpu-shm"].intra_bandwidth == pytest.approx(shm["bandwidth"], rel=0.01)


def test_cpu_ranks_pay_both_sides_gpu_ranks_the_larger():
    """A rank that sends 3 MB and receives 1 MB: on a CPU host both are copies on its own core
    (the mean of the sides at the per-direction bandwidth), on GPU links the sides overlap."""
    t = torch.tensor([[0.0, 3e6], [1e6, 0.0]])
    cpu = PRESETS["cpu-shm"]
    intra, _ = rank_tier_seconds(t, 2, cpu)  # 2 ranks on 2 cores: no time-sharing
    assert float(intra[0]) == pytest.approx(cpu.message_latency + 2e6 / cpu.intra_bandwidth)
    duplex = cpu.model_copy(update={"full_duplex": True})
    intra_d, _ = rank_tier_seconds(t, 2, duplex)
    assert float(intra_d[0]) == pytest.approx(cpu.message_latency + 3e6 / cpu.intra_bandwidth)
    assert float(intra[0]) < float(intra_d[0])


def test_refitted_cpu_preset_reproduces_its_fit_rows():
    rows = [{"transport": "shm", "ep": 2, "bytes": b, "seconds": s}
            for b, s in ((65536, 50e-6), (1048576, 130e-6), (4194304, 800e-6))]
    preset = calibrate.fitted_cpu_preset(rows, "shm", (65536, 1048576), "cpu-shm@test")
    assert preset.name == "cpu-shm@test" and not preset.full_duplex
    for b, s in ((65536, 50e-6), (1048576, 130e-6)):
        assert phase_seconds([calibrate._uniform_alltoall(2, b)], 2, preset) == pytest.approx(s)
    with pytest.raises(ValueError, match="need gloo rows"):
        calibrate.fitted_cpu_preset(rows, "gloo", (65536, 1048576))


def test_h800_preset_equals_its_fit_on_the_fit_rows():
    lat = calibrate.fit_ll_latencies()
    assert GPU.latency == pytest.approx(lat["dispatch"], abs=1.5e-6)
    assert GPU.combine_latency == pytest.approx(lat["combine"], abs=1.5e-6)
    assert GPU.intra_bandwidth == pytest.approx(calibrate.fit_intra_bandwidth(), rel=0.02)


def test_deepep_routing_respects_the_node_limit():
    experts, src = calibrate.deepep_routing(64, 64, topk_groups=4)
    nodes_per_token = torch.stack([(experts // 32 == n).any(1) for n in range(8)], 1).sum(1)
    assert int(nodes_per_token.max()) <= 4 and experts.shape == (64 * 64, 8)
    assert src.bincount().tolist() == [64] * 64


# ---- compute model ---------------------------------------------------------------------------
def test_flops_model_matches_deepseek_v3s_published_throughput():
    """Megatron-Core's DeepSeek-V3 run: 368 TFLOP/s at 1,412 tokens/s per GPU, i.e. ~261 TFLOP
    per token trained. Ours: 58 MoE layers + 3 dense layers (FFN 18432) + the LM head."""
    ds = SHAPES["deepseek-v3"]
    f = layer_flops(ds)
    assert f["routed"] == 8 * 2 * 3 * 7168 * 2048
    dense_layer = f["attention"] + 2 * 3 * 7168 * 18432
    per_token = 3 * (ds.moe_layers * f["total"] + 3 * dense_layer + 2 * 7168 * 129280)
    assert per_token * 1412 / 1e12 == pytest.approx(ACHIEVED_TFLOPS_H100, rel=0.10)


# ---- projection ------------------------------------------------------------------------------
def test_replicas_add_slots_and_keep_tokens_on_their_rank():
    placement = Placement.contiguous(8, 4, 2)
    load = torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 50])
    lists = replicate(placement, load, 1)
    assert all(len(x) == 3 for x in lists) and sum(x.count(0) for x in lists) >= 2
    experts = torch.tensor([[0, 7], [0, 1], [0, 7], [0, 2]])
    src = torch.tensor([0, 1, 2, 3])
    slots, phys = assign_copies(experts, src, lists, 2)
    logical = torch.tensor([e for ranks in lists for e in ranks])
    assert torch.equal(logical[slots], experts)  # a copy of the same expert
    rank_of = phys.rank_E
    for t in range(4):
        for k in range(2):
            if experts[t, k].item() in lists[src[t]]:
                assert rank_of[slots[t, k]] == src[t]


@pytest.mark.parametrize("shape,ep,nodes,tokens,routing", [
    ("deepseek-v3", 64, 8, 4096, "balanced"),
    ("kimi-vl", 16, 2, 8192, "trace"),
])
def test_projection_runs_for_both_shapes(shape, ep, nodes, tokens, routing):
    trace = str(ROOT / "profiling/results/traces/vlm-fine-smoes") if routing == "trace" else None
    sc = Scenario(SHAPES[shape], ep, nodes, tokens, routing, sim_tokens_per_rank=8,
                  trace_path=trace)
    rows = project(sc, variants=["megatron-alltoall", "dedup", "dedup-hier"])
    assert len(rows) == 6
    by = {(r["dispatcher"], r["overlap"]): r for r in rows}
    for (v, overlap), r in by.items():
        assert 0 < r["a2a_share"] < 1 and r["step_s"] > 0
        assert r["step_s"] <= by[(v, False)]["step_s"] + 1e-12
        if v == "megatron-alltoall":
            assert r["speedup_vs_megatron"] == 1.0
        assert r["step_s"] == pytest.approx(
            by[("megatron-alltoall", overlap)]["step_s"] / r["speedup_vs_megatron"])
    # Same placement, same routing: the same busiest rank, so the same compute.
    assert by[("dedup", False)]["compute_s"] == pytest.approx(
        by[("megatron-alltoall", False)]["compute_s"])
    faster = project(sc, tflops=2 * ACHIEVED_TFLOPS_H100, variants=["megatron-alltoall"])
    assert faster[0]["compute_s"] == pytest.approx(by[("megatron-alltoall", False)]["compute_s"] / 2)


# ---- calibration benchmark schema ------------------------------------------------------------
def test_calibration_json_schema_and_sources(python_env, tmp_path):
    out = tmp_path / "cal.json"
    proc = subprocess.run([sys.executable, str(ROOT / "profiling/bench.py"), "calibration",
                           "--quick", "--normal-tokens", "32", "--json", str(out)],
                          env=python_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert list(result) == ["name", "params", "rows", "ratios", "env", "notes"]
    kinds = {r["kind"] for r in result["rows"]}
    assert {"normal", "low-latency", "nccl", "cpu-gloo", "cpu-shm"} <= kinds
    for r in result["rows"]:
        assert {"variant", "kind", "source", "published", "simulated", "relative_error",
                "split", "preset", "metric"} <= set(r)
        assert r["source"].strip() and r["split"] in ("fit", "score")
        assert r["relative_error"] == pytest.approx(r["simulated"] / r["published"] - 1, abs=0.01)
    normal = [r for r in result["rows"] if r["kind"] == "normal"]
    assert [(r["ep"], r["phase"], r["published"]) for r in normal] == [
        (8, "dispatch", 153), (8, "combine", 158), (16, "dispatch", 43), (16, "combine", 43),
        (32, "dispatch", 58), (32, "combine", 57), (64, "dispatch", 51), (64, "combine", 50)]


def test_calibration_measure_fits_on_uniform_rows_and_scores_the_rest(python_env, tmp_path):
    out = tmp_path / "cal.json"
    proc = subprocess.run([sys.executable, str(ROOT / "profiling/bench.py"), "calibration",
                           "--quick", "--normal-tokens", "8", "--measure", "--ep", "2",
                           "--json", str(out)],
                          env=python_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in json.loads(out.read_text())["rows"] if r["kind"].startswith("cpu-valid")]
    assert {r["kind"] for r in rows} == {"cpu-validate-gloo", "cpu-validate-shm"}
    fit = [r for r in rows if r["split"] == "fit"]
    assert sorted(r["case"] for r in fit) == sorted(["uniform-64KiB", "uniform-1024KiB"] * 2)
    for r in fit:  # two points, two parameters: the fit rows are reproduced
        assert r["relative_error"] == pytest.approx(0.0, abs=1e-6)
    scored = [r for r in rows if r["split"] == "score"]
    assert len(scored) == 6 and all(r["case"].startswith("skewed") for r in scored)
    for r in rows:
        assert r["preset"].endswith("@this-run") and r["committed_preset"] in PRESETS
        assert r["published"] > 0 and r["simulated"] > 0


def test_calibration_bad_alltoall_json_exits_2(python_env, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = subprocess.run([sys.executable, str(ROOT / "profiling/bench.py"), "calibration",
                           "--quick", "--normal-tokens", "8", "--alltoall-json", str(bad)],
                          env=python_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "bad.json" in proc.stderr


def test_gumbel_routing_draws_distinct_experts_within_the_node_limit():
    from epruntime.scale.project import gumbel_routing

    pop = torch.softmax(torch.randn(2, 256, generator=torch.Generator().manual_seed(0)), 1)
    group = torch.arange(4000) % 2
    experts = gumbel_routing(pop, group, 8, 8, 4, seed=3)
    assert experts.shape == (4000, 8)
    assert all(len(set(row)) == 8 for row in experts.tolist())
    nodes = torch.stack([(experts // 32 == n).any(1) for n in range(8)], 1).sum(1)
    assert int(nodes.max()) <= 4
    # Popular experts are drawn more often (Gumbel top-k samples in proportion to load).
    counts = torch.bincount(experts[group == 0].flatten(), minlength=256).double()
    assert torch.corrcoef(torch.stack([counts, pop[0]]))[0, 1] > 0.5


def test_olmoe_popularity_keeps_the_measured_skew():
    from epruntime.scale.project import OLMOE_SUBDIR, olmoe_popularity, shared_data_dir

    if not (shared_data_dir() / OLMOE_SUBDIR).is_dir():
        pytest.skip("shared/data (OLMoE routing loads) is not beside this checkout")
    pop = olmoe_popularity(256)
    assert pop.shape == (3, 256) and torch.allclose(pop.sum(1), torch.ones(3, dtype=pop.dtype))
    skew = (pop.max(1).values / pop.mean(1)).tolist()  # shared/data README: 2.5-7.8x per layer
    assert all(1.5 < s < 8.5 for s in skew)
