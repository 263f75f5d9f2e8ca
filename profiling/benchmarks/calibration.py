"""Calibration of the scale simulator's time model (`epruntime.scale`) against published GPU
all-to-all measurements and against this machine.

Rows (stable schema: kind, source, published, simulated, relative_error, split, ...):
- kind "normal": DeepEP's normal kernels on H800 (4096 tokens, hidden 7168, top-8, FP8 dispatch,
  BF16 combine), bottleneck bandwidth in GB/s as DeepEP's test counts it;
- kind "low-latency": DeepEP's low-latency kernels (128 tokens, top-8), time in us;
- kind "nccl": nccl-tests alltoall bus bandwidth on 8xH100 NVLink and across 2-8 nodes;
- kind "cpu-gloo" / "cpu-shm": `bench.py alltoall` rows of this machine (the JSON given with
  --alltoall-json), time in us;
- kind "cpu-validate-gloo" / "cpu-validate-shm" (with --measure): a skewed traffic matrix sent
  by real ranks with gloo's all_to_all_single and the shm transport at EP=2 and EP=4, time of
  the slowest rank against `timemodel.predict_phase_seconds` (never fitted on).
split "fit": the row chose a preset parameter (links.PRESETS[...].fitted says which); "score":
it did not. Goal: |relative_error| <= 15% on every normal and nccl row, 25% on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from profiling.benchlib import (ROOT, BenchResult, BenchUsageError, collect_env, int_list, register,
                                resolve, spawn_ranks)

ALLTOALL_JSON = ROOT / "profiling" / "results" / "alltoall_cpu_fit.json"
FULL = dict(normal_tokens=4096, seed=0, alltoall_json=str(ALLTOALL_JSON), measure=False,
            ep=[2, 4], repeats=9, warmup=2)
QUICK = dict(normal_tokens=256, seed=0, alltoall_json=str(ALLTOALL_JSON), measure=False,
             ep=[2], repeats=2, warmup=1)
ROW_BYTES = 1024  # 256 float32 per row
GOALS = {"normal": 0.15, "nccl": 0.15, "cpu-validate-gloo": 0.25, "cpu-validate-shm": 0.25}


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--normal-tokens", dest="normal_tokens", type=int,
                        help="tokens per rank replayed for DeepEP's normal rows (default 4096)")
    parser.add_argument("--seed", type=int, help="routing seed (default 0)")
    parser.add_argument("--alltoall-json", dest="alltoall_json",
                        help="`bench.py alltoall` JSON scored against cpu-gloo / cpu-shm")
    parser.add_argument("--measure", action="store_true", default=None,
                        help="also time a skewed traffic matrix on real ranks (gloo and shm)")
    parser.add_argument("--ep", type=int_list, help="EP sizes for --measure (default 2,4)")


def traffic_rows(ep: int, scale: int) -> list[list[int]]:
    """[ep][ep] rows (of ROW_BYTES) rank i sends rank j: skewed towards higher ranks, none to
    itself, so one rank is the slowest: rows = scale * (1 + i + 2 j)."""
    return [[0 if i == j else scale * (1 + i + 2 * j) for j in range(ep)] for i in range(ep)]


def _worker(rank: int, ep: int, scales: list[int], p: dict[str, Any], out_dir: str) -> None:
    import time

    import torch
    import torch.distributed as dist

    from epruntime.transport.shm import ShmTransport

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    biggest = max(sum(r) for s in scales for r in traffic_rows(ep, s)) * ROW_BYTES
    shm = ShmTransport(dist.group.WORLD, ep, max(64, -(-4 * biggest // 2**20)), timeout_s=120)
    samples: dict[str, list[float]] = {}
    for scale in scales:
        rows = traffic_rows(ep, scale)
        send = rows[rank]
        recv = [rows[i][rank] for i in range(ep)]
        x = torch.randn(sum(send), ROW_BYTES // 4)
        out = torch.empty(sum(recv), ROW_BYTES // 4)
        calls = {"gloo": lambda: dist.all_to_all_single(out, x, recv, send),
                 "shm": lambda: shm.all_to_all_single(out, x, recv, send)}
        for i in range(p["warmup"] + p["repeats"]):
            for transport, call in calls.items():  # interleaved: background load hits both
                dist.barrier()
                start = time.perf_counter()
                for _ in range(4):
                    call()
                if i >= p["warmup"]:
                    samples.setdefault(f"{transport}@{scale}", []).append(
                        (time.perf_counter() - start) / 4)
    shm.close()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(samples))


def measured_rows(p: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from epruntime.scale.timemodel import predict_phase_seconds

    rows = []
    for ep in p["ep"]:
        scales = [16, 256]  # ~0.1 MB and ~2-10 MB per rank
        with tempfile.TemporaryDirectory(prefix="bench_calibration_") as tmp:
            print(f"calibration: timing skewed all-to-alls on {ep} ranks...", file=sys.stderr,
                  flush=True)
            spawn_ranks(_worker, ep, ep, scales, p, tmp, threads=1)
            ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(ep)]
        for scale in scales:
            traffic = torch.tensor(traffic_rows(ep, scale), dtype=torch.float64) * ROW_BYTES
            for transport in ("gloo", "shm"):
                key = f"{transport}@{scale}"
                slowest = [max(r[key][i] for r in ranks) for i in range(p["repeats"])]
                measured = statistics.median(slowest)
                sim = predict_phase_seconds(traffic, f"cpu-{transport}", ep)["dispatch"]
                rows.append({"variant": f"cpu-validate-{transport}/ep{ep}/{int(traffic.sum())}B",
                             "kind": f"cpu-validate-{transport}", "ep": ep, "phase": "alltoall",
                             "metric": "us", "bytes": int(traffic.sum()), "split": "score",
                             "source": "measured now on this machine (median of the slowest "
                                       "rank over repeats)",
                             "preset": f"cpu-{transport}", "published": round(measured * 1e6, 1),
                             "simulated": round(sim * 1e6, 1),
                             "relative_error": (sim - measured) / measured,
                             "samples": slowest})
    return rows


@register("calibration", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Scale simulator vs published DeepEP / NCCL figures and this machine's all-to-all."""
    from epruntime.scale import calibrate
    from epruntime.scale.links import PRESETS

    p = resolve(args, FULL, QUICK)
    if p["normal_tokens"] < 8:
        raise BenchUsageError(f"--normal-tokens must be >= 8, got {p['normal_tokens']}")
    print("calibration: replaying published rows...", file=sys.stderr, flush=True)
    rows = []
    for r in calibrate.replay_all(p["seed"], p["normal_tokens"]):
        rows.append({"variant": f"{r['kind']}/ep{r['ep']}/{r['phase']}", **r})
    path = Path(p["alltoall_json"])
    if not path.is_file():
        raise BenchUsageError(f"--alltoall-json {path}: no such file (run `bench.py alltoall "
                              "--json FILE` first)")
    try:
        measured = json.loads(path.read_text())["rows"]
    except (json.JSONDecodeError, KeyError) as err:
        raise BenchUsageError(f"--alltoall-json {path}: not a bench.py alltoall result ({err})")
    rel = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    for r in calibrate.replay_cpu(measured, f"`bench.py alltoall` on this machine ({rel})"):
        rows.append({"variant": f"{r['kind']}/ep{r['ep']}/{r['bytes']}B", **r})
    if p["measure"]:
        rows += measured_rows(p)
    ratios = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        scored = [abs(r["relative_error"]) for r in rows if r["kind"] == kind
                  and r["split"] == "score"]
        if scored:
            ratios[f"{kind}/max_abs_relative_error_scored"] = max(scored)
    outside = [f"{r['variant']} ({100 * r['relative_error']:+.1f}%)" for r in rows
               if r["kind"] in GOALS and abs(r["relative_error"]) > GOALS[r["kind"]]]
    notes = ["published: the figure a source reports (GB/s, us or busbw GB/s, see `metric`); "
             "simulated: the same quantity from the time model; relative_error = simulated / "
             "published - 1",
             "outside the goal (15% normal/nccl, 25% this machine): "
             + (", ".join(outside) if outside else "none")]
    params = {"normal_tokens": p["normal_tokens"], "seed": p["seed"],
              "alltoall_json": str(rel), "measure": bool(p["measure"]),
              "presets": {k: {"intra_GBps": v.intra_bandwidth / 1e9,
                              "inter_GBps": v.inter_bandwidth / 1e9, "latency_us": v.latency * 1e6,
                              "message_latency_us": v.message_latency * 1e6}
                          for k, v in PRESETS.items()},
              "quick": bool(args.quick)}
    return BenchResult(name="calibration", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
