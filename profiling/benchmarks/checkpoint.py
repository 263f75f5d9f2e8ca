"""Checkpoint save and load, before and after the move to torch.distributed.checkpoint, on the
dispatch benchmark's fine-shape model (64 experts top-6, `dispatch.SHAPES["fine"]`) at EP=4 over
CPU ranks (gloo), after one training step so that AdamW state exists.

Variants, on the same ranks, weights and state, round-robin over repeats:
- `v1`: format version 1, as epruntime saved before (one torch.save file per rank, dense tensors
  by rank 0, each expert by its owner) and loaded (every rank reads every rank's file);
- `dcp`: DCP, synchronous: every rank writes a shard, each rank reads its own experts and the
  dense tensors, every tensor crc32-checked;
- `dcp-async`: DCP's async_save; `save_blocking_s` is what training waits for (a host snapshot),
  `save_s` until the checkpoint is committed.

Per variant: seconds (slowest rank, median of repeats), peak resident memory above the level
before the call (largest rank, median), bytes each rank read (largest rank), checkpoint size.
Loads read files the save just wrote (page cache), alike for every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from profiling.benchlib import (TINY_CONFIG, BenchResult, BenchUsageError, collect_env, register,
                                resolve, spawn_ranks)
from profiling.benchmarks.dispatch import SHAPES

VARIANTS = ("v1", "dcp", "dcp-async")
FULL = dict(ep=4, shape="fine", repeats=5, warmup=1)
QUICK = dict(ep=2, shape="tiny", repeats=1, warmup=0)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ep", type=int, help="EP size = ranks (default 4)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="fine (default) or tiny")


class PeakRSS:
    """Peak resident set size of this process above its level at entry, sampled every ms."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def above_base(self) -> int:
        return self.peak - self.base


def _measure(rank: int, p: dict[str, Any], workdir: str, result_path: str) -> None:
    import shutil

    import torch
    import torch.distributed as dist

    from epruntime import checkpoint, distributed
    from epruntime.checkpoint.legacy import load_v1, save_v1
    from epruntime.config import load_config
    from epruntime.data import ShardedBatchIterator
    from epruntime.datasets import build_datasets
    from epruntime.engine import Engine

    cfg = load_config(TINY_CONFIG, [*SHAPES[p["shape"]], f"parallel.ep_size={p['ep']}",
                                    f"train.output_dir={workdir}/run", "data.max_train_items=256",
                                    "data.max_eval_items=64", "dispatch.kind=dedup"])
    env = distributed.init_distributed(cfg)
    train_ds, _ = build_datasets(cfg)
    engine = Engine(cfg, env, len(train_ds.vocab), train_ds.num_answers, train_ds.max_question_len)
    batches = ShardedBatchIterator(train_ds, cfg.data.global_batch_size, env.dp_rank, env.dp_size,
                                   seed=cfg.train.seed)
    engine.train_step(next(batches), 0)  # AdamW state exists from here on
    saver = checkpoint.Checkpointer(engine, async_save=True)
    root = checkpoint.checkpoint_root(cfg.train.output_dir)

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def largest(n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    samples: dict[str, dict[str, list]] = {v: {} for v in VARIANTS}
    step = 0
    for i in range(p["warmup"] + p["repeats"]):
        for variant in VARIANTS:
            step += 1
            row: dict[str, float] = {}
            dist.barrier()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                if variant == "v1":
                    path = save_v1(engine, step, batches.state_dict(), root / f"v1_{step:06d}")
                    row["save_blocking_s"] = time.perf_counter() - t0
                elif variant == "dcp":
                    path = checkpoint.save_checkpoint(engine, step, batches.state_dict())
                    row["save_blocking_s"] = time.perf_counter() - t0
                else:
                    path = saver.save(step, batches.state_dict())
                    row["save_blocking_s"] = time.perf_counter() - t0
                    saver.wait()
                row["save_s"] = time.perf_counter() - t0
            row["save_peak_mib"] = mem.above_base / 2**20
            dist.barrier()
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                if variant == "v1":
                    load_v1(engine, path)
                    read = size  # every rank reads every rank file whole
                else:
                    _, stats = checkpoint.load_checkpoint_with_stats(
                        engine, path, apply_saved_placements=False)
                    read = stats.bytes_read
                row["load_s"] = time.perf_counter() - t0
            row["load_peak_mib"] = mem.above_base / 2**20
            row = {"save_s": slowest(row["save_s"]),
                   "save_blocking_s": slowest(row["save_blocking_s"]),
                   "load_s": slowest(row["load_s"]),
                   "save_peak_mib": largest(int(row["save_peak_mib"] * 2**20)) / 2**20,
                   "load_peak_mib": largest(int(row["load_peak_mib"] * 2**20)) / 2**20,
                   "max_bytes_read_per_rank": largest(read), "checkpoint_mib": size / 2**20}
            dist.barrier()
            if env.is_main:
                shutil.rmtree(path)
            if i >= p["warmup"]:
                for k, v in row.items():
                    samples[variant].setdefault(k, []).append(v)
    if env.is_main:
        rows = []
        for variant, s in samples.items():
            row = {"variant": variant}
            row.update({k: statistics.median(v) for k, v in s.items()})
            row["samples"] = s
            rows.append(row)
        Path(result_path).write_text(json.dumps(rows))


@register("checkpoint", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Checkpoint save/load time, peak memory and bytes read per rank: v1 vs DCP (sync, async)."""
    p = resolve(args, FULL, QUICK)
    if p["ep"] < 1:
        raise BenchUsageError(f"--ep must be at least 1, got {p['ep']}")
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as tmp:
        result_file = Path(tmp) / "rows.json"
        spawn_ranks(_measure, p["ep"], p, tmp, str(result_file))
        rows = json.loads(result_file.read_text())
    by = {r["variant"]: r for r in rows}
    ratios = {}
    for v in ("dcp", "dcp-async"):
        for key in ("save_s", "save_blocking_s", "load_s", "load_peak_mib",
                    "max_bytes_read_per_rank"):
            if by["v1"][key]:
                ratios[f"{v}/v1_{key}"] = by[v][key] / by["v1"][key]
    params = {"shape": p["shape"], "shape_overrides": SHAPES[p["shape"]], "ep_size": p["ep"],
              "repeats": p["repeats"], "warmup": p["warmup"], "quick": bool(args.quick)}
    notes = ["seconds: slowest rank, median of repeats; peak_mib: resident memory above the "
             "level before the call, largest rank; loads read what the save just wrote (page "
             "cache)",
             "v1 loads every rank's file on every rank; dcp reads this rank's experts and the "
             "dense tensors, verifying each tensor's crc32"]
    return BenchResult(name="checkpoint", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
