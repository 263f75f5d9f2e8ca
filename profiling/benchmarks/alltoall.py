"""Raw row all-to-all bandwidth: gloo's all_to_all_single against epruntime's shared-memory
transport (dispatch.transport=shm), at several message sizes and EP sizes, on spawned CPU ranks
of one host (one torch thread each).

Each rank sends `bytes` per call, split evenly over the other ranks (1 KiB float32 rows), and
nothing to itself, so `bytes` is the off-rank traffic per rank. Per repeat: a barrier, then a few
back-to-back all-to-alls (32 of 64 KiB down to 4 of 4 MiB and 2 above, as a dispatcher would)
timed on every rank, divided by their number; a repeat lasts as long as its slowest rank;
`seconds` is the median over repeats and `gbytes_per_s` = bytes / seconds / 1e9 (per rank). Sizes and the two
transports are interleaved so background load hits both alike. Before timing, every size checks
that shm's output equals gloo's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from profiling.benchlib import (BenchResult, BenchUsageError, collect_env, int_list, register,
                                resolve, spawn_ranks)

FULL = dict(ep=[2, 4], sizes_kib=[64, 256, 1024, 4096, 16384], repeats=15, warmup=3, shm_mib=None)
QUICK = dict(ep=[2], sizes_kib=[64, 256], repeats=3, warmup=1, shm_mib=None)
ROW_BYTES = 1024  # 256 float32
TRANSPORTS = ("gloo", "shm")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ep", type=int_list, help="EP sizes = ranks, e.g. 2,4 (default 2,4)")
    parser.add_argument("--sizes-kib", type=int_list, dest="sizes_kib",
                        help="off-rank KiB each rank sends per call "
                        "(default 64,256,1024,4096,16384)")
    parser.add_argument("--shm-mib", type=int, dest="shm_mib",
                        help="dispatch.shm_mib (default: the smallest that fits, at least 64)")


def size_label(kib: int) -> str:
    return f"{kib // 1024}MiB" if kib % 1024 == 0 else f"{kib}KiB"


def calls_per_repeat(kib: int) -> int:
    """Back-to-back calls timed together: the barrier before a repeat releases ranks up to a few
    hundred us apart, which would swamp a small message's time."""
    return max(2, min(32, 16384 // kib))


def shm_mib_for(p: dict[str, Any], ep: int) -> int:
    """Smallest dispatch.shm_mib whose double-buffered per-peer region holds the largest message."""
    per_peer = -(-max(p["sizes_kib"]) * 1024 // (ep - 1) // ROW_BYTES) * ROW_BYTES
    return p["shm_mib"] or max(64, -(-2 * (ep - 1) * per_peer // 2**20))


def _worker(rank: int, p: dict[str, Any], ep: int, out_dir: str) -> None:
    import time

    import torch
    import torch.distributed as dist

    from epruntime.transport.shm import ShmTransport

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    shm = ShmTransport(group, ep, shm_mib_for(p, ep), timeout_s=120)
    gen = torch.Generator().manual_seed(rank)
    record: dict[str, list[float]] = {}
    cases = []
    for kib in p["sizes_kib"]:
        per_peer = -(-kib * 1024 // (ep - 1) // ROW_BYTES)  # rows to each other rank
        splits = [0 if r == rank else per_peer for r in range(ep)]
        x = torch.randn(sum(splits), ROW_BYTES // 4, generator=gen)
        out = torch.empty_like(x)  # every rank sends the same per peer: recv == send splits
        want = torch.empty_like(x)
        dist.all_to_all_single(want, x, splits, splits, group=group)
        shm.all_to_all_single(out, x, splits, splits)
        if not torch.equal(out.view(torch.int32), want.view(torch.int32)):
            raise RuntimeError(f"rank {rank}: shm all-to-all differs from gloo at {kib} KiB")
        cases.append((kib, x, out, splits))

    def call(transport: str, x, out, splits) -> None:
        if transport == "gloo":
            dist.all_to_all_single(out, x, splits, splits, group=group)
        else:
            shm.all_to_all_single(out, x, splits, splits)

    for i in range(p["warmup"] + p["repeats"]):
        for kib, x, out, splits in cases:
            for transport in TRANSPORTS:
                dist.barrier()
                start = time.perf_counter()
                for _ in range(calls_per_repeat(kib)):
                    call(transport, x, out, splits)
                elapsed = (time.perf_counter() - start) / calls_per_repeat(kib)
                if i >= p["warmup"]:
                    record.setdefault(f"{transport}@{kib}", []).append(elapsed)
    sent = {str(kib): x.numel() * x.element_size() for kib, x, _, _ in cases}
    shm.close()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"samples": record, "bytes": sent}))


def _rows(ep: int, p: dict[str, Any], ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for kib in p["sizes_kib"]:
        for transport in TRANSPORTS:
            key = f"{transport}@{kib}"
            slowest = [max(r["samples"][key][i] for r in ranks) for i in range(p["repeats"])]
            seconds = statistics.median(slowest)
            nbytes = ranks[0]["bytes"][str(kib)]
            rows.append({"variant": f"{transport}@{size_label(kib)}/ep{ep}",
                         "transport": transport, "ep": ep, "bytes": nbytes, "seconds": seconds,
                         "gbytes_per_s": nbytes / seconds / 1e9, "samples": slowest})
    return rows


@register("alltoall", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Row all-to-all bandwidth per rank: gloo all_to_all_single vs the shm transport."""
    p = resolve(args, FULL, QUICK)
    if p["repeats"] < 1 or p["warmup"] < 0:
        raise BenchUsageError("need --repeats >= 1 and --warmup >= 0")
    if min(p["ep"]) < 2:
        raise BenchUsageError(f"--ep needs sizes >= 2 (an all-to-all of one rank moves nothing), "
                              f"got {p['ep']}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_alltoall_") as tmp:
        for ep in p["ep"]:
            print(f"alltoall: ep{ep} on {ep} ranks...", file=sys.stderr, flush=True)
            out = Path(tmp, f"ep{ep}")
            out.mkdir()
            spawn_ranks(_worker, ep, p, ep, str(out), threads=1)
            rows += _rows(ep, p, [json.loads(Path(out, f"rank{r}.json").read_text())
                                  for r in range(ep)])
    by_variant = {r["variant"]: r for r in rows}
    ratios = {}
    for ep in p["ep"]:
        for kib in p["sizes_kib"]:
            label = f"{size_label(kib)}/ep{ep}"
            shm, gloo = by_variant[f"shm@{label}"], by_variant[f"gloo@{label}"]
            ratios[f"shm/gloo_gbytes_per_s@{label}"] = shm["gbytes_per_s"] / gloo["gbytes_per_s"]
    notes = ["bytes = off-rank bytes each rank sends per call (received the same); seconds = "
             "median over repeats of the slowest rank's time per call, over calls_per_repeat "
             "back-to-back calls after a barrier"]
    if max(p["ep"]) > (os.cpu_count() or 1):
        notes.append(f"ep > {os.cpu_count()} CPUs: ranks time-share cores, so a waiting "
                     "rank sleeps (futex) and latency includes being scheduled again")
    params = {"ep_sizes": p["ep"], "sizes_kib": p["sizes_kib"], "row_bytes": ROW_BYTES,
              "repeats": p["repeats"], "warmup": p["warmup"], "threads_per_rank": 1,
              "shm_mib": {str(ep): shm_mib_for(p, ep) for ep in p["ep"]},
              "calls_per_repeat": {size_label(k): calls_per_repeat(k) for k in p["sizes_kib"]},
              "quick": bool(args.quick)}
    return BenchResult(name="alltoall", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
