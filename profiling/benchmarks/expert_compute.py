"""Training-step time with megatron-core's per-expert loop vs the grouped local experts.

`world` real ranks (gloo) build two Engines of the tiny config (`model.expert_compute=loop`:
megatron-core's SequentialMLP, one MLP call per local expert; `model.expert_compute=grouped`:
the same parameters run as two grouped GEMMs, `epruntime.model.experts`) from the same seed.
They alternate short blocks of training steps on the same batches, so load drifting over the run
falls on both alike; the headline ratio is the median over adjacent (loop, grouped) block pairs.
Besides the whole `train_step`, each engine's expert modules are timed forward (their backward
runs inside autograd's engine, in the step time). A step is as slow as its slowest rank. The
grouped path computes the same bits as the loop, so both engines must end on the same loss.
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

FULL = dict(layers=2, batch=64, steps=5, blocks=15, warmup=3, world=2, ep=2,
            dataset="easy-vqa")
QUICK = dict(layers=1, batch=8, steps=2, blocks=2, warmup=1, world=2, ep=2,
             dataset="synthetic")
VARIANTS = ("loop", "grouped")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, help=f"MoE layers (default {FULL['layers']})")
    parser.add_argument("--batch", type=int, help=f"global batch (default {FULL['batch']})")
    parser.add_argument("--steps", type=int, help=f"steps per block (default {FULL['steps']})")
    parser.add_argument("--blocks", type=int, help=f"block pairs (default {FULL['blocks']})")
    parser.add_argument("--world", type=int, help=f"ranks (default {FULL['world']})")
    parser.add_argument("--ep", type=int, help=f"expert-parallel size (default {FULL['ep']})")
    parser.add_argument("--dataset", choices=("easy-vqa", "synthetic"),
                        help=f"training data (default {FULL['dataset']})")


class ForwardClock:
    """Sums the wall time of `modules`' forwards (a pre-hook starts, a hook stops)."""

    def __init__(self, modules: list[Any]):
        self.seconds, self._start = 0.0, 0.0
        for m in modules:
            m.register_forward_pre_hook(self._begin)
            m.register_forward_hook(self._end)

    def _begin(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _end(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._start


def _worker(rank: int, p: dict[str, Any], out_dir: str) -> None:
    from epruntime import distributed
    from epruntime.config import load_config
    from epruntime.data import ShardedBatchIterator
    from epruntime.datasets import build_datasets
    from epruntime.engine import Engine

    common = [f"model.num_layers={p['layers']}", f"data.global_batch_size={p['batch']}",
              f"data.dataset={p['dataset']}", "data.synthetic_items=1024",
              f"parallel.ep_size={p['ep']}", "train.progress=false"]
    cfgs = {v: load_config(TINY_CONFIG, [*common, f"model.expert_compute={v}"])
            for v in VARIANTS}
    env = distributed.init_distributed(cfgs["loop"])
    train_ds, _ = build_datasets(cfgs["loop"])
    engines, batches, clocks = {}, {}, {}
    for v in VARIANTS:
        engines[v] = Engine(cfgs[v], env, len(train_ds.vocab), train_ds.num_answers,
                            train_ds.max_question_len)
        batches[v] = ShardedBatchIterator(train_ds, p["batch"], env.dp_rank, env.dp_size, seed=1)
        clocks[v] = ForwardClock([m for m in engines[v].model.modules()
                                  if hasattr(m, "local_experts")])
    step = {v: 0 for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    fwd_times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def one_step(v: str, record: bool) -> None:
        batch = next(batches[v]).to(env.device)
        before = clocks[v].seconds
        t = time.perf_counter()
        result = engines[v].train_step(batch, step[v])
        dt = time.perf_counter() - t
        step[v] += 1
        if record:
            times[v].append(dt)
            fwd_times[v].append(clocks[v].seconds - before)
            losses[v].append(result.loss)

    alternate_blocks(one_step, VARIANTS, p)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"times": times, "expert_forward": fwd_times, "losses": losses}))
    distributed.shutdown()


@register("expert_compute", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Train-step time with megatron-core's per-expert loop vs the grouped local experts."""
    p = resolve_blocks(args, FULL, QUICK)
    with tempfile.TemporaryDirectory(prefix="bench_experts_") as tmp:
        print(f"expert_compute: {p['blocks']} x ({p['steps']} steps per variant) on "
              f"{p['world']} ranks, EP={p['ep']}...", file=sys.stderr, flush=True)
        spawn_ranks(_worker, p["world"], p, tmp)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(p["world"])]

    rows, step_s, fwd_s = [], {}, {}
    for v in VARIANTS:
        t, f = slowest_rank(ranks, "times", v), slowest_rank(ranks, "expert_forward", v)
        step_s[v], fwd_s[v] = statistics.median(t), statistics.median(f)
        rows.append({"variant": v, "step_time_s": step_s[v], "expert_forward_s": fwd_s[v],
                     "expert_forward_fraction": fwd_s[v] / step_s[v],
                     "final_loss": ranks[0]["losses"][v][-1], "steps": len(t), "samples": t})
    paired = paired_blocks(slowest_rank(ranks, "times", "grouped"),
                           slowest_rank(ranks, "times", "loop"), p["steps"])
    ratios = {"grouped/loop_paired_blocks": paired,
              "grouped/loop_step_time": step_s["grouped"] / step_s["loop"],
              "grouped/loop_expert_forward": fwd_s["grouped"] / fwd_s["loop"],
              "losses_identical": float(ranks[0]["losses"]["loop"]
                                        == ranks[0]["losses"]["grouped"])}
    params = {**{k: p[k] for k in ("layers", "batch", "steps", "blocks", "warmup", "world",
                                   "ep", "dataset")},
              "quick": bool(getattr(args, "quick", False)), "model": "tiny-vqa"}
    notes = ["loop = model.expert_compute=loop (megatron-core SequentialMLP); grouped = "
             "model.expert_compute=grouped (the same parameters, two torch._grouped_mm calls)",
             "step time = train_step, slowest rank, median over steps; expert forward = the "
             "MoE layers' expert modules' forward, slowest rank",
             "grouped/loop_paired_blocks = median over adjacent blocks of mean grouped / mean "
             "loop; losses_identical = 1.0 when every recorded loss is the same float"]
    return BenchResult(name="expert_compute", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
