"""What overlap buys here: training-step and comm-phase time with it off vs on, side by side.

Two real ranks (gloo, EP=2) build one Engine per (variant, off/on) on the same seed, data order
and weights, and alternate training steps off/on and on/off in turn, round-robin over the
variants, so drift of a shared host spreads over both. Every engine times its phases
(`dispatch.timing=on`), so both sides pay the same timer; `comm_seconds` is what the timer
attributes to dispatch/combine (with overlap, only the exposed part: the compute between starting
and waiting for the all-to-all is not counted). Headlines: median over adjacent (off, on) steps of
on / off, slowest rank, for the step and for the comm phases.

Variants (epruntime.dispatch.overlap):
    dedup, dedup+shm, dedup-hier@2nodes   dispatch.overlap: own rows through the experts while
                                          the remote rows travel (two one-rank "nodes" for hier)
    dedup+shared                          model.moe_shared_expert_overlap: the shared experts run
                                          during the dispatch all-to-all
    dedup+shared+local-first              both

On CPU: gloo runs the asynchronous all-to-all on its own threads and the shared-memory transport's
peer copies its rows itself, so the compute really proceeds meanwhile, but with 2 ranks on 2
cores those threads and the peer compete with the compute for the same cores; see README.
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

FULL = dict(layers=2, batch=64, pairs=20, warmup=2, shared=64)
QUICK = dict(layers=1, batch=16, pairs=2, warmup=1, shared=16)
WORLD = 2
SHARED = "model.moe_shared_expert_intermediate_size={shared}"
# variant: (overrides of both sides, overrides of the "on" side)
VARIANTS = {
    "dedup": ([], ["dispatch.overlap=true"]),
    "dedup+shm": (["dispatch.transport=shm"], ["dispatch.overlap=true"]),
    "dedup-hier@2nodes": (["dispatch.kind=dedup-hier", "dispatch.ranks_per_node=1"],
                          ["dispatch.overlap=true"]),
    "dedup+shared": ([SHARED], ["model.moe_shared_expert_overlap=true"]),
    "dedup+shared+local-first": ([SHARED], ["model.moe_shared_expert_overlap=true",
                                            "dispatch.overlap=true"]),
}


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, help=f"MoE layers (default {FULL['layers']})")
    parser.add_argument("--batch", type=int, help=f"global batch (default {FULL['batch']})")
    parser.add_argument("--pairs", type=int, help=f"off/on step pairs (default {FULL['pairs']})")
    parser.add_argument("--variants", help="comma-separated subset of " + ", ".join(VARIANTS))


def _expert_split_cost(experts, rows: int, hidden: int, num_local: int, repeats: int
                       ) -> dict[str, float]:
    """Seconds of megatron-core's experts, forward + backward, on `rows` rows spread evenly over
    the local experts in one call, and in two calls of half the rows each (what local-first
    runs), with no communication: what splitting the expert compute costs by itself."""
    import torch

    per = rows // num_local
    x = torch.randn(per * num_local, hidden, requires_grad=True)
    probs = torch.ones(per * num_local)
    whole = torch.full((num_local,), per, dtype=torch.int64)
    first = torch.arange(per * num_local).view(num_local, per)[:, :per // 2].reshape(-1)
    second = torch.arange(per * num_local).view(num_local, per)[:, per // 2:].reshape(-1)
    halves = [(x[idx].detach().requires_grad_(), probs[idx],
               torch.full((num_local,), n, dtype=torch.int64))
              for idx, n in ((first, per // 2), (second, per - per // 2))]

    def one():
        out, _ = experts(x, whole, probs)
        out.sum().backward()

    def two():
        total = 0
        for x_half, probs_half, counts in halves:
            out, _ = experts(x_half, counts, probs_half)
            total = total + out.sum()
        total.backward()

    samples = {"one_call_s": [], "two_calls_s": []}
    for i in range(repeats + 1):
        for name, fn in (("one_call_s", one), ("two_calls_s", two)):
            t = time.perf_counter()
            fn()
            if i:  # the first round warms up
                samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in samples.items()}


def _worker(rank: int, p: dict[str, Any], out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from epruntime import distributed
    from epruntime.config import load_config
    from epruntime.data import ShardedBatchIterator
    from epruntime.datasets import build_datasets
    from epruntime.engine import Engine

    def config(*extra: str):
        return load_config(TINY_CONFIG, [
            f"model.num_layers={p['layers']}", f"data.global_batch_size={p['batch']}",
            "data.dataset=synthetic", "data.synthetic_items=1024", f"parallel.ep_size={WORLD}",
            "train.progress=false", "dispatch.kind=dedup", "dispatch.timing=on",
            *(e.format(shared=p["shared"]) for e in extra)])

    env = distributed.init_distributed(config())
    train_ds, _ = build_datasets(config())
    engines, iters = {}, {}
    for name in p["variants"]:
        both, on = VARIANTS[name]
        for side, extra in (("off", both), ("on", both + on)):
            distributed.seed_all(0)
            cfg = config(*extra)
            engines[name, side] = Engine(cfg, env, len(train_ds.vocab), train_ds.num_answers,
                                         train_ds.max_question_len)
            iters[name, side] = ShardedBatchIterator(train_ds, cfg.data.global_batch_size,
                                                     env.dp_rank, env.dp_size,
                                                     seed=cfg.train.seed)
    steps = {key: 0 for key in engines}

    def one_step(key) -> tuple[float, float, float]:
        engine = engines[key]
        batch = next(iters[key]).to(env.device)
        engine.timer.reset()
        dist.barrier()
        t = time.perf_counter()
        result = engine.train_step(batch, steps[key])
        dt = torch.tensor([time.perf_counter() - t, engine.timer.total_seconds()])
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        steps[key] += 1
        return dt[0].item(), dt[1].item(), float(result.loss)

    for key in engines:
        for _ in range(p["warmup"]):
            one_step(key)
    out = {name: {"off": [], "on": [], "comm_off": [], "comm_on": [], "loss_off": [],
                  "loss_on": []} for name in p["variants"]}
    for i in range(p["pairs"]):
        for name in p["variants"]:
            for side in (("off", "on") if i % 2 == 0 else ("on", "off")):
                step_s, comm_s, loss = one_step((name, side))
                out[name][side].append(step_s)
                out[name][f"comm_{side}"].append(comm_s)
                out[name][f"loss_{side}"].append(loss)
    if rank == 0:
        from epruntime.model.moe_layer import SpecMoELayer

        engine = engines[p["variants"][0], "off"]
        layer = next(m for m in engine.model.modules() if isinstance(m, SpecMoELayer))
        rows = p["batch"] // WORLD * engine.model.seq_len * layer.config.moe_router_topk
        cost = _expert_split_cost(layer.experts, rows, layer.config.hidden_size,
                                  layer.num_local_experts, max(3, p["pairs"]))
        Path(out_dir, "result.json").write_text(json.dumps(
            {"variants": out, "split": {**cost, "rows": rows,
                                        "local_experts": layer.num_local_experts}}))


@register("overlap", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Train-step and comm-phase time with overlap off vs on (dedup dispatchers), 2 gloo ranks."""
    p = resolve_pairs(args, FULL, QUICK, WORLD)
    names = (getattr(args, "variants", None) or ",".join(VARIANTS)).split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise BenchUsageError(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    p["variants"] = names
    with tempfile.TemporaryDirectory(prefix="bench_overlap_") as tmp:
        print(f"overlap: {p['pairs']} off/on step pairs x {len(names)} variants on {WORLD} "
              "ranks...", file=sys.stderr, flush=True)
        spawn_ranks(_worker, WORLD, p, tmp)
        result = json.loads(Path(tmp, "result.json").read_text())
    rows, ratios = [], {}
    for name, r in result["variants"].items():
        step = statistics.median(on / off for on, off in zip(r["on"], r["off"]))
        comm = statistics.median(on / off for on, off in zip(r["comm_on"], r["comm_off"]))
        rows.append({"variant": name, "step_time_off_s": statistics.median(r["off"]),
                     "step_time_on_s": statistics.median(r["on"]), "step_on/off": step,
                     "comm_seconds_off": statistics.median(r["comm_off"]),
                     "comm_seconds_on": statistics.median(r["comm_on"]), "comm_on/off": comm,
                     "comm_share_off": statistics.median(
                         c / s for c, s in zip(r["comm_off"], r["off"])),
                     "max_loss_gap": max(abs(a - b) for a, b in zip(r["loss_on"], r["loss_off"])),
                     "pairs": len(r["on"]), "samples_off": r["off"], "samples_on": r["on"]})
        ratios[f"{name}:step_on/off"] = step
        ratios[f"{name}:comm_on/off"] = comm
    split = result["split"]
    rows.append({"variant": "experts alone: two calls vs one (no communication)",
                 "step_time_off_s": split["one_call_s"], "step_time_on_s": split["two_calls_s"],
                 "step_on/off": split["two_calls_s"] / split["one_call_s"],
                 "rows": split["rows"], "local_experts": split["local_experts"]})
    ratios["experts:two_calls/one_call"] = split["two_calls_s"] / split["one_call_s"]
    params = {**{k: p[k] for k in ("layers", "batch", "pairs", "warmup", "shared")},
              "world": WORLD, "ep_size": WORLD, "model": "tiny-vqa", "data": "synthetic",
              "variants": names, "quick": bool(getattr(args, "quick", False))}
    notes = ["step = Engine.train_step (forward, backward, optimizer), slowest rank, "
             "dispatch.timing=on on both sides",
             "X_on/off = median over adjacent (off, on) steps of on / off (< 1: overlap helps)",
             "comm_seconds = dispatch/combine phase seconds per step (overlap on: exposed part)",
             "max_loss_gap = largest |loss_on - loss_off| over the paired steps (same data)",
             "experts alone: one MoE layer's experts, fwd + bwd, on its rows in one call (off) "
             "and as two calls of half the rows (on), rank 0, no communication"]
    return BenchResult(name="overlap", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
