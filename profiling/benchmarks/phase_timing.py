"""Cost of the phase timer (`dispatch.timing=on`): training-step time with it off vs on.

Two real ranks (gloo, EP=2) build one Engine per dispatcher (megatron-core's alltoall, dedup,
dedup over the shared-memory transport) with the timer built, and alternate training steps with
the timer detached from the dispatchers' observers (off: exactly the code of dispatch.timing=off,
`NULL_LAPS`) and attached (on). Steps alternate off/on and on/off in turn, round-robin over the
dispatchers, so drift of a shared host spreads over both; the headline is the median over
adjacent (off, on) pairs of on / off, slowest rank. The timer's own share of an on step (the
seconds it attributes, against the step) is reported too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from profiling.benchlib import (TINY_CONFIG, BenchResult, BenchUsageError, collect_env, register,
                                resolve_pairs, spawn_ranks)

FULL = dict(layers=2, batch=64, pairs=40, warmup=3)
QUICK = dict(layers=1, batch=16, pairs=3, warmup=1)
WORLD = 2
KINDS = {"alltoall": ("alltoall", "pg"), "dedup": ("dedup", "pg"), "dedup+shm": ("dedup", "shm")}


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, help=f"MoE layers (default {FULL['layers']})")
    parser.add_argument("--batch", type=int, help=f"global batch (default {FULL['batch']})")
    parser.add_argument("--pairs", type=int, help=f"off/on step pairs (default {FULL['pairs']})")


def _worker(rank: int, p: dict[str, Any], out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from epruntime import distributed
    from epruntime.config import load_config
    from epruntime.data import ShardedBatchIterator
    from epruntime.datasets import build_datasets
    from epruntime.engine import Engine

    def config(kind: str, transport: str):
        return load_config(TINY_CONFIG, [
            f"model.num_layers={p['layers']}", f"data.global_batch_size={p['batch']}",
            "data.dataset=synthetic", "data.synthetic_items=1024", f"parallel.ep_size={WORLD}",
            "train.progress=false", f"dispatch.kind={kind}", f"dispatch.transport={transport}",
            "dispatch.timing=on"])

    env = distributed.init_distributed(config("alltoall", "pg"))
    train_ds, _ = build_datasets(config("alltoall", "pg"))
    engines, iters = {}, {}
    for name, (kind, transport) in KINDS.items():
        distributed.seed_all(0)
        cfg = config(kind, transport)
        engines[name] = Engine(cfg, env, len(train_ds.vocab), train_ds.num_answers,
                               train_ds.max_question_len)
        iters[name] = ShardedBatchIterator(train_ds, cfg.data.global_batch_size, env.dp_rank,
                                           env.dp_size, seed=cfg.train.seed)
    steps = {name: 0 for name in KINDS}

    def one_step(name: str, timed: bool) -> tuple[float, float]:
        engine = engines[name]
        batch = next(iters[name]).to(env.device)
        engine.timer.reset()
        with engine.observers.observing(engine.observers.ledger,
                                        engine.timer if timed else None):
            dist.barrier()
            t = time.perf_counter()
            engine.train_step(batch, steps[name])
            dt = torch.tensor([time.perf_counter() - t, engine.timer.total_seconds()])
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        steps[name] += 1
        return dt[0].item(), dt[1].item()

    for name in KINDS:
        for i in range(p["warmup"]):
            one_step(name, i % 2 == 1)
    out = {name: {"off": [], "on": [], "timed_s": []} for name in KINDS}
    for i in range(p["pairs"]):
        for name in KINDS:
            for timed in ((False, True) if i % 2 == 0 else (True, False)):
                step_s, timed_s = one_step(name, timed)
                out[name]["on" if timed else "off"].append(step_s)
                if timed:
                    out[name]["timed_s"].append(timed_s)
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps(out))


@register("phase-timing", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Train-step time with the phase timer (dispatch.timing) off vs on, 2 gloo ranks."""
    p = resolve_pairs(args, FULL, QUICK, WORLD)
    with tempfile.TemporaryDirectory(prefix="bench_phase_timing_") as tmp:
        print(f"phase-timing: {p['pairs']} off/on step pairs x {len(KINDS)} dispatchers on "
              f"{WORLD} ranks...", file=sys.stderr, flush=True)
        spawn_ranks(_worker, WORLD, p, tmp)
        result = json.loads(Path(tmp, "result.json").read_text())
    rows, ratios = [], {}
    for name, r in result.items():
        paired = [on / off for on, off in zip(r["on"], r["off"])]
        t_off, t_on = statistics.median(r["off"]), statistics.median(r["on"])
        rows.append({"variant": name, "step_time_off_s": t_off, "step_time_on_s": t_on,
                     "on/off_paired": statistics.median(paired),
                     "comm_seconds": statistics.median(r["timed_s"]),
                     "comm_share": statistics.median(r["timed_s"]) / t_on,
                     "pairs": len(paired), "samples_off": r["off"], "samples_on": r["on"]})
        ratios[f"{name}:on/off_paired"] = statistics.median(paired)
        ratios[f"{name}:on/off_step_time"] = t_on / t_off
    ratios["worst:on/off_paired"] = max(ratios[f"{n}:on/off_paired"] for n in result)
    params = {**{k: p[k] for k in ("layers", "batch", "pairs", "warmup")}, "world": WORLD,
              "ep_size": WORLD, "model": "tiny-vqa", "data": "synthetic",
              "quick": bool(getattr(args, "quick", False))}
    notes = ["step = Engine.train_step (forward, backward, optimizer, timer settle), slowest rank",
             "on/off_paired = median over adjacent (off, on) steps of on / off; goal < 1.02",
             "comm_seconds = seconds the timer attributes to dispatch/combine phases per on step"]
    return BenchResult(name="phase-timing", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
