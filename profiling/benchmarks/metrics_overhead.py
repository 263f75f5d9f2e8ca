"""Cost of the Prometheus exporter: training-step time with metrics off vs on, side by side.

Two real ranks (gloo, EP=2) build one Engine and alternate blocks of training steps without and
with a live MetricsExporter (router hooks, ledger deltas, a /metrics server on 127.0.0.1 and a
scraper thread pulling /metrics as soon as the block starts and then every `--scrape-interval`
seconds, as Prometheus would; with short blocks that is more scrapes than Prometheus makes, so
the figure errs high). A step's time is `train_step` plus, when on, `on_step`. Blocks are short
and alternate, and the headline ratio is the median over adjacent (off, on) block pairs, so load
from other processes drifting over the run cancels out. The exporter's own `on_step` time is
reported separately: on a noisy host it is the sharper figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from profiling.benchlib import (
    TINY_CONFIG,
    BenchResult,
    BenchUsageError,
    collect_env,
    register,
    resolve,
    spawn_ranks,
)

FULL = dict(layers=2, batch=64, steps=2, blocks=40, warmup=5, scrape_interval=1.0)
QUICK = dict(layers=1, batch=16, steps=2, blocks=3, warmup=2, scrape_interval=1.0)
WORLD = 2


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, help=f"MoE layers (default {FULL['layers']})")
    parser.add_argument("--batch", type=int, help=f"global batch (default {FULL['batch']})")
    parser.add_argument("--steps", type=int, help=f"steps per block (default {FULL['steps']})")
    parser.add_argument("--blocks", type=int,
                        help=f"off/on block pairs (default {FULL['blocks']})")
    parser.add_argument("--scrape-interval", type=float,
                        help=f"seconds between scrapes (default {FULL['scrape_interval']})")


def _config(p: dict[str, Any]):
    from epruntime.config import load_config

    return load_config(TINY_CONFIG, [
        f"model.num_layers={p['layers']}", f"data.global_batch_size={p['batch']}",
        "data.dataset=synthetic", "data.synthetic_items=1024", f"parallel.ep_size={WORLD}",
        "train.progress=false",
    ])


class _Scraper:
    """GETs /metrics every `interval` seconds on a thread, like a Prometheus scrape."""

    def __init__(self, port: int, interval: float):
        self.url, self.interval, self.count = f"http://127.0.0.1:{port}/metrics", interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with urllib.request.urlopen(self.url, timeout=10) as r:
                r.read()
            self.count += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _worker(rank: int, p: dict[str, Any], out_dir: str) -> None:
    from epruntime import distributed
    from epruntime.data import ShardedBatchIterator
    from epruntime.datasets import build_datasets
    from epruntime.engine import Engine
    from epruntime.metrics import MetricsExporter

    cfg = _config(p)
    env = distributed.init_distributed(cfg)
    train_ds, _ = build_datasets(cfg)
    engine = Engine(cfg, env, len(train_ds.vocab), train_ds.num_answers, train_ds.max_question_len)
    batches = ShardedBatchIterator(train_ds, cfg.data.global_batch_size, env.dp_rank,
                                   env.dp_size, seed=cfg.train.seed)
    step = 0

    def one_step(mx: Any) -> tuple[float, float]:
        nonlocal step
        batch = next(batches).to(env.device)
        t = time.perf_counter()
        result = engine.train_step(batch, step)
        dt = time.perf_counter() - t
        t_mx = time.perf_counter()
        if mx is not None:
            mx.on_step(step, result, dt)
        mx_s = time.perf_counter() - t_mx
        step += 1
        return dt + mx_s, mx_s

    for _ in range(p["warmup"]):
        one_step(None)
    off: list[float] = []
    on: list[float] = []
    on_step: list[float] = []
    scrapes = 0
    for _ in range(p["blocks"]):
        off += [one_step(None)[0] for _ in range(p["steps"])]
        mx = MetricsExporter(engine, port=0)  # hooks + server live only for this block
        scraper = _Scraper(mx.server.port, p["scrape_interval"])
        for _ in range(p["steps"]):
            total, mx_s = one_step(mx)
            on.append(total)
            on_step.append(mx_s)
        scraper.stop()
        scrapes += scraper.count
        mx.close()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"off": off, "on": on, "on_step": on_step, "scrapes": scrapes}))


@register("metrics", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Train-step time with the Prometheus exporter off vs on (2 gloo ranks, tiny MoE-VLM)."""
    p = resolve(args, FULL, QUICK)
    p["repeats"] = args.repeats if getattr(args, "repeats", None) else p["blocks"]
    if getattr(args, "warmup", None) is not None:
        p["warmup"] = args.warmup
    p["blocks"] = p["repeats"]
    if p["steps"] < 1 or p["blocks"] < 1 or p["warmup"] < 0 or p["scrape_interval"] <= 0:
        raise BenchUsageError("need --steps >= 1, --blocks/--repeats >= 1, --warmup >= 0 and "
                              "--scrape-interval > 0")
    with tempfile.TemporaryDirectory(prefix="bench_metrics_") as tmp:
        print(f"metrics: {p['blocks']} x ({p['steps']} steps off, {p['steps']} on) on "
              f"{WORLD} ranks...", file=sys.stderr, flush=True)
        spawn_ranks(_worker, WORLD, p, tmp)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]

    def slowest(key: str) -> list[float]:  # a step is as slow as its slowest rank
        return [max(r[key][i] for r in ranks) for i in range(len(ranks[0][key]))]

    off, on, mx = slowest("off"), slowest("on"), slowest("on_step")
    t_off, t_on = statistics.median(off), statistics.median(on)
    n = p["steps"]
    paired = [statistics.mean(on[i:i + n]) / statistics.mean(off[i:i + n])
              for i in range(0, len(off), n)]
    rows = [
        {"variant": "metrics_off", "step_time_s": t_off, "mean_step_time_s": statistics.mean(off),
         "steps": len(off), "samples": off},
        {"variant": "metrics_on", "step_time_s": t_on, "mean_step_time_s": statistics.mean(on),
         "on_step_s": statistics.median(mx), "steps": len(on),
         "scrapes": sum(r["scrapes"] for r in ranks), "samples": on},
    ]
    ratios = {"on/off_paired_blocks": statistics.median(paired),
              "on/off_step_time": t_on / t_off,
              "on/off_mean_step_time": statistics.mean(on) / statistics.mean(off),
              "on_step/off_step_time": statistics.median(mx) / t_off}
    params = {**{k: p[k] for k in ("layers", "batch", "steps", "blocks", "warmup",
                                   "scrape_interval")},
              "world": WORLD, "ep_size": WORLD, "quick": bool(getattr(args, "quick", False)),
              "model": "tiny-vqa", "data": "synthetic"}
    notes = ["step time = train_step (+ on_step when on), slowest rank, median over steps",
             "on/off_paired_blocks = median over adjacent (off, on) blocks of mean on / mean off",
             "on_step/off_step_time = the exporter's own per-step work over an off step"]
    return BenchResult(name="metrics", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
