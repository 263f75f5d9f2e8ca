"""Projected training step at cluster scale (`epruntime.scale.project`): megatron-core's alltoall
dispatcher against dedup, dedup-hier, traffic-aware placement and replicated experts, for a
DeepSeek-V3-like shape (256 experts top-8, node-limited to 4 nodes, EP=64 over 8 nodes) and a
Kimi-VL-like MoE-VLM shape (64 experts top-6, EP=16 over 2 nodes), overlap off and on.

Per row: step_s (MoE layers of one micro-batch, fwd + bwd), compute_s, a2a_s, a2a_share (of the
non-overlapped layer time), exposed_a2a_fraction, forward cross-rank MB per rank and layer,
balancedness (mean / max (token, expert) pairs per rank) and speedup_vs_megatron (same shape,
routing and overlap). Link preset h100-nccl (calibrated: `bench.py calibration`), compute at
368 TFLOP/s per GPU unless --tflops says otherwise.
"""

from __future__ import annotations

import argparse
import sys

from profiling.benchlib import (ROOT, BenchResult, BenchUsageError, collect_env, register,
                                resolve)

TRACE = ROOT / "profiling" / "results" / "traces" / "vlm-fine-smoes"
# (shape, EP, nodes, tokens per rank, routing)
SCENARIOS = {
    "deepseek-v3/olmoe": ("deepseek-v3", 64, 8, 4096, "olmoe"),
    "deepseek-v3/balanced": ("deepseek-v3", 64, 8, 4096, "balanced"),
    "kimi-vl/trace": ("kimi-vl", 16, 2, 8192, "trace"),
    "kimi-vl/olmoe": ("kimi-vl", 16, 2, 8192, "olmoe"),
}
FULL = dict(scenarios=list(SCENARIOS), sim_tokens=1024, tflops=None, preset="h100-nccl", seed=0)
QUICK = dict(scenarios=["deepseek-v3/balanced", "kimi-vl/trace"], sim_tokens=32, tflops=None,
             preset="h100-nccl", seed=0)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenarios", type=lambda s: [x for x in s.split(",") if x],
                        help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--sim-tokens", dest="sim_tokens", type=int,
                        help="tokens per rank drawn for generated routings (default 1024); "
                             "bytes and loads scale to the scenario's tokens per rank")
    parser.add_argument("--tflops", type=float, help="achieved TFLOP/s per GPU (default 368)")
    parser.add_argument("--preset", help="link preset (default h100-nccl)")
    parser.add_argument("--seed", type=int)


@register("projection", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Projected step time and all-to-all share at scale, megatron-core vs epruntime dispatch."""
    from epruntime.scale.compute import ACHIEVED_TFLOPS_H100, SHAPES
    from epruntime.scale.links import PRESETS
    from epruntime.scale.project import Scenario, project

    p = resolve(args, FULL, QUICK)
    unknown = set(p["scenarios"]) - set(SCENARIOS)
    if unknown:
        raise BenchUsageError(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    if p["preset"] not in PRESETS:
        raise BenchUsageError(f"--preset {p['preset']!r}: expected one of {sorted(PRESETS)}")
    if p["sim_tokens"] < 1 or (p["tflops"] is not None and p["tflops"] <= 0):
        raise BenchUsageError("--sim-tokens and --tflops must be positive")
    tflops = p["tflops"] or ACHIEVED_TFLOPS_H100
    rows = []
    for name in p["scenarios"]:
        shape, ep, nodes, tokens, routing = SCENARIOS[name]
        print(f"projection: {name}...", file=sys.stderr, flush=True)
        sc = Scenario(SHAPES[shape], ep, nodes, tokens, routing, sim_tokens_per_rank=p["sim_tokens"],
                      trace_path=str(TRACE) if routing == "trace" else None)
        try:
            rows += project(sc, p["preset"], tflops, seed=p["seed"])
        except (FileNotFoundError, ValueError) as err:
            raise BenchUsageError(f"scenario {name}: {err}")
    ratios = {f"{r['shape']}/{r['routing']}/{r['dispatcher']}/overlap-"
              f"{'on' if r['overlap'] else 'off'}/speedup": r["speedup_vs_megatron"]
              for r in rows if r["dispatcher"] != "megatron-alltoall"}
    notes = [
        "compute: 3 x forward FLOPs (attention + shared + router per token, routed per (token, "
        "expert) pair on the busiest rank) / achieved TFLOP/s; comm: 2 x (dispatch + combine) "
        "of the row plan's traffic under the link preset; overlap on = max(compute, comm), the "
        "ideal bound",
        "routing olmoe: OLMoE-1B-7B's measured per-expert loads (shared/data, layer 7), one text "
        "domain per rank, each expert split into E/64 equal finer experts; balanced: uniform "
        "loads; trace: this project's SMoES routing trace of the fine MoE-VLM (64 experts top-6, "
        f"{TRACE.relative_to(ROOT)}), tokens dealt round-robin to the ranks, placement fitted on "
        "calls 200-300 and scored on 300-400",
        "placement and replicas are fitted on one routing sample and scored on another; "
        "DeepSeek-V3's node limit is drawn under the contiguous layout (a placement that moves "
        "experts across nodes can break it; its bytes are counted as they fall)"]
    params = {"scenarios": {n: dict(zip(("shape", "ep", "nodes", "tokens_per_rank", "routing"),
                                        SCENARIOS[n])) for n in p["scenarios"]},
              "sim_tokens_per_rank": p["sim_tokens"], "tflops_per_gpu": tflops,
              "preset": p["preset"], "seed": p["seed"], "quick": bool(args.quick)}
    return BenchResult(name="projection", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
