"""Training-step time before and after megatron-core's DDP and optimizer, side by side.

`world` real ranks (gloo) build two Engines from the same config and seed: one with
`train.optimizer=epruntime` (the earlier flat all-reduce, float64 clipping loop and torch AdamW,
"before") and one with `train.optimizer=megatron` (megatron-core's DistributedDataParallel,
ChainedOptimizer and clipping, "after"). They alternate short blocks of training steps on the
same batches, so load from other processes drifting over the run falls on both alike; the
headline ratio is the median over adjacent (before, after) block pairs. Besides the whole
`train_step`, the gradient path alone (reduce + norm + clip + update: what the switch changes)
is timed by wrapping the Engine's `gradients` object. A step is as slow as its slowest rank.

A third engine runs the megatron path with the CPU adapters' shortcuts off
(`epruntime.compat.without_shortcuts`: megatron-core's collectives over one-rank groups and its
local multi-tensor clip), in the same alternation, so what the shortcuts save is measured in the
same processes; it must end on the bit-identical loss of the megatron row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from profiling.benchlib import (
    TINY_CONFIG,
    BenchResult,
    alternate_blocks,
    collect_env,
    paired_blocks,
    register,
    resolve_blocks,
    slowest_rank,
    spawn_ranks,
)

FULL = dict(layers=2, batch=32, steps=3, blocks=15, warmup=3, world=4, ep=2)
QUICK = dict(layers=1, batch=8, steps=2, blocks=2, warmup=1, world=2, ep=2)
VARIANTS = ("epruntime", "megatron", "megatron-no-shortcuts")  # before, after, after w/o
LABELS = {"epruntime": "epruntime (before)", "megatron": "megatron (after)",
          "megatron-no-shortcuts": "megatron without CPU shortcuts"}


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, help=f"MoE layers (default {FULL['layers']})")
    parser.add_argument("--batch", type=int, help=f"global batch (default {FULL['batch']})")
    parser.add_argument("--steps", type=int, help=f"steps per block (default {FULL['steps']})")
    parser.add_argument("--blocks", type=int, help=f"block pairs (default {FULL['blocks']})")
    parser.add_argument("--world", type=int, help=f"ranks (default {FULL['world']})")
    parser.add_argument("--ep", type=int, help=f"expert-parallel size (default {FULL['ep']})")


class _Timed:
    """The Engine's `gradients` object with the wall time of its after-backward work summed."""

    def __init__(self, inner: Any):
        self.inner, self.seconds = inner, 0.0
        self.optimizer = inner.optimizer

    def _timed(self, name: str, *args: Any) -> Any:
        t = time.perf_counter()
        out = getattr(self.inner, name)(*args)
        self.seconds += time.perf_counter() - t
        return out

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def reduce(self) -> None:
        self._timed("reduce")

    def grad_norm(self) -> float:
        return self._timed("grad_norm")

    def step(self, *args: Any) -> None:
        self._timed("step", *args)


def _worker(rank: int, p: dict[str, Any], out_dir: str) -> None:
    from epruntime import compat, distributed
    from epruntime.config import load_config
    from epruntime.data import ShardedBatchIterator
    from epruntime.datasets import build_datasets
    from epruntime.engine import Engine

    common = [f"model.num_layers={p['layers']}", f"data.global_batch_size={p['batch']}",
              "data.dataset=synthetic", "data.synthetic_items=1024",
              f"parallel.ep_size={p['ep']}", "train.progress=false"]
    cfgs = {v: load_config(TINY_CONFIG, [*common, f"train.optimizer={v.split('-')[0]}"])
            for v in VARIANTS}
    env = distributed.init_distributed(cfgs["megatron"])
    train_ds, _ = build_datasets(cfgs["megatron"])
    engines, timers, batches = {}, {}, {}
    for v in VARIANTS:
        engines[v] = Engine(cfgs[v], env, len(train_ds.vocab), train_ds.num_answers,
                            train_ds.max_question_len)
        timers[v] = engines[v].gradients = _Timed(engines[v].gradients)
        batches[v] = ShardedBatchIterator(train_ds, p["batch"], env.dp_rank, env.dp_size, seed=1)
    step = {v: 0 for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    grad_times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def one_step(v: str, record: bool) -> None:
        batch = next(batches[v]).to(env.device)
        before = timers[v].seconds
        shortcuts = (compat.without_shortcuts() if v == "megatron-no-shortcuts"
                     else contextlib.nullcontext())
        with shortcuts:
            t = time.perf_counter()
            result = engines[v].train_step(batch, step[v])
            dt = time.perf_counter() - t
        step[v] += 1
        if record:
            times[v].append(dt)
            grad_times[v].append(timers[v].seconds - before)
            losses[v].append(result.loss)

    alternate_blocks(one_step, VARIANTS, p)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"times": times, "grad_times": grad_times, "losses": losses}))


@register("optimizer_step", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Train-step time with the hand-written gradient path vs megatron-core's DDP + optimizer."""
    p = resolve_blocks(args, FULL, QUICK)
    with tempfile.TemporaryDirectory(prefix="bench_optimizer_") as tmp:
        print(f"optimizer_step: {p['blocks']} x ({p['steps']} steps per variant) on "
              f"{p['world']} ranks, EP={p['ep']}...", file=sys.stderr, flush=True)
        spawn_ranks(_worker, p["world"], p, tmp)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(p["world"])]

    def slowest(key: str, v: str) -> list[float]:
        return slowest_rank(ranks, key, v)

    rows, step_s, grad_s = [], {}, {}
    for v in VARIANTS:
        t, g = slowest("times", v), slowest("grad_times", v)
        step_s[v], grad_s[v] = statistics.median(t), statistics.median(g)
        rows.append({"variant": LABELS[v],
                     "step_time_s": step_s[v], "grad_path_s": grad_s[v],
                     "grad_path_fraction": grad_s[v] / step_s[v],
                     "final_loss": ranks[0]["losses"][v][-1], "steps": len(t), "samples": t})
    n = p["steps"]

    def paired(a: str, b: str) -> float:
        """Median over adjacent blocks of mean step time of `a` / of `b`."""
        return paired_blocks(slowest("times", a), slowest("times", b), n)

    ratios = {"after/before_paired_blocks": paired("megatron", "epruntime"),
              "after/before_step_time": step_s["megatron"] / step_s["epruntime"],
              "after/before_grad_path": grad_s["megatron"] / grad_s["epruntime"],
              "no_shortcuts/before_grad_path": grad_s["megatron-no-shortcuts"]
              / grad_s["epruntime"],
              "shortcuts/no_shortcuts_paired_blocks": paired("megatron",
                                                             "megatron-no-shortcuts"),
              "shortcuts/no_shortcuts_step_time": step_s["megatron"]
              / step_s["megatron-no-shortcuts"],
              "shortcuts/no_shortcuts_grad_path": grad_s["megatron"]
              / grad_s["megatron-no-shortcuts"]}
    params = {**{k: p[k] for k in ("layers", "batch", "steps", "blocks", "warmup", "world",
                                   "ep")},
              "quick": bool(getattr(args, "quick", False)), "model": "tiny-vqa",
              "data": "synthetic"}
    notes = ["before = train.optimizer=epruntime (flat all-reduce, fp64 norm, torch AdamW); "
             "after = train.optimizer=megatron (megatron-core DDP + ChainedOptimizer)",
             "step time = train_step, slowest rank, median over steps; grad path = reduce + "
             "norm + clip + update",
             "after/before_paired_blocks = median over adjacent blocks of mean after / mean "
             "before",
             "megatron without CPU shortcuts = the same megatron path inside "
             "compat.without_shortcuts() (collectives over one-rank groups issued, "
             "megatron-core's local clip)"]
    return BenchResult(name="optimizer_step", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
