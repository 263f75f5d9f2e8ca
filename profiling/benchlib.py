"""The pieces every benchmark shares: a registry of named benchmarks, the result schema written
as JSON, a median-of-repeats timer, the environment stamp, a table printer and a launcher of real
ranks (torch.multiprocessing + gloo).

A benchmark is a function `run(args) -> BenchResult` registered under a name:

    @register("moe_layer", add_arguments=add_options)
    def run(args: argparse.Namespace) -> BenchResult: ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel


ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "launch" / "configs" / "tiny-vqa.yaml"


class BenchUsageError(ValueError):
    """Options that cannot run (bad shape, unknown name); the CLI exits 2 with the message."""


class BenchResult(BaseModel):
    """What one benchmark run writes as JSON; keys keep this order (field, then insertion)."""

    name: str
    params: dict[str, Any]
    rows: list[dict[str, Any]]  # each {"variant": str, <metric>: value, ...}
    ratios: dict[str, float]
    env: dict[str, Any]
    notes: list[str] = []

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


RunFn = Callable[[argparse.Namespace], BenchResult]
AddArgsFn = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Benchmark:
    name: str
    run: RunFn
    add_arguments: AddArgsFn | None
    description: str


_REGISTRY: dict[str, Benchmark] = {}


def register(name: str, add_arguments: AddArgsFn | None = None) -> Callable[[RunFn], RunFn]:
    """Register `run` under `name`; `add_arguments` adds the benchmark's own CLI options."""

    def decorate(run: RunFn) -> RunFn:
        if name in _REGISTRY:
            raise ValueError(f"benchmark {name!r} is registered twice")
        doc = (run.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Benchmark(name, run, add_arguments, doc[0] if doc else "")
        return run

    return decorate


def benchmarks() -> dict[str, Benchmark]:
    """Registered benchmarks by name, sorted."""
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> Benchmark:
    if name not in _REGISTRY:
        known = ", ".join(benchmarks()) or "(none)"
        raise BenchUsageError(f"unknown benchmark {name!r}; known benchmarks: {known}")
    return _REGISTRY[name]


def median_of(
    fn: Callable[[], Any],
    repeats: int,
    warmup: int = 1,
    setup: Callable[[], Any] | None = None,
) -> tuple[float, list[float]]:
    """Median wall seconds of `fn()` over `repeats` timed calls after `warmup` untimed ones.

    `setup()` runs before every call, outside the timed region (zeroing grads, a barrier).
    Returns (median, samples), samples in call order.
    """
    if repeats < 1:
        raise BenchUsageError(f"repeats must be >= 1, got {repeats}")
    samples: list[float] = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            samples.append(elapsed)
    return statistics.median(samples), samples


def _version(dist_name: str) -> str | None:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def collect_env() -> dict[str, Any]:
    """Where the numbers came from; read from package metadata so torch is not imported."""
    return {
        "torch": _version("torch"),
        "megatron_core": _version("megatron-core"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def resolve(args: argparse.Namespace, full: dict[str, Any], quick: dict[str, Any]) -> dict[str, Any]:
    """Option values: what the user passed, else the --quick or the full-size default."""
    defaults = quick if getattr(args, "quick", False) else full
    return {k: (getattr(args, k, None) if getattr(args, k, None) is not None else v)
            for k, v in defaults.items()}


def int_list(text: str) -> list[int]:
    """argparse type for "1,2,4"."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _cell(key: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if key.endswith("_fraction"):
            return f"{100 * value:.1f}%"
        if math.isfinite(value) and abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def print_table(result: BenchResult) -> None:
    """Rows as a rich table (list- and dict-valued cells such as samples are left to the JSON)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # don't wrap the table when piped to a file or a test
    columns: list[str] = []
    for row in result.rows:
        columns += [k for k, v in row.items()
                    if k not in columns and not isinstance(v, (list, dict))]
    table = Table(title=result.name, title_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for row in result.rows:
        table.add_row(*(_cell(c, row.get(c, "")) for c in columns))
    console.print(table)
    console.print("  params: " + ", ".join(f"{k}={v}" for k, v in result.params.items()))
    for key, value in result.ratios.items():
        console.print(f"  {key}: {value:.3f}")
    for note in result.notes:
        console.print(f"  note: {note}")
    env = result.env
    console.print(f"  env: torch {env.get('torch')}, megatron-core {env.get('megatron_core')}, "
                  f"{env.get('cpu_count')} CPUs, {env.get('hostname')}")


# ---- real ranks ---------------------------------------------------------------------------------


def spawn_ranks(fn: Callable[..., None], world: int, *args: Any, threads: int = 1) -> None:
    """Run `fn(rank, *args)` on `world` fresh processes with the torchrun environment variables
    set (`fn` must be a module-level function so spawn can pickle it); raises if a rank fails."""
    from epruntime.distributed import spawn_local

    spawn_local(fn, world, *args, threads=threads)


def torchrun_train(config: Path, overrides: list[str], nproc: int, label: str) -> dict[str, Any]:
    """Run the real training entry point (`torchrun -m epruntime.train`) on `nproc` CPU ranks;
    returns its summary.json. `overrides` must set train.output_dir."""
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.output_dir="))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "epruntime.train", "--config", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-4000:]}")
    return json.loads((Path(out) / "summary.json").read_text())


class Subset:
    """The first `n` items of a dataset (what Engine.evaluate needs: len and batch)."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def batch(self, idx):
        return self.dataset.batch(idx)


def trained_checkpoint(config: Path, run_dir: Path, p: dict[str, Any], quick: bool, label: str,
                       extra: list[str] = ()) -> tuple[str, dict[str, Any]]:
    """(run_dir, its summary.json): `config` trained once at EP=`p["ep"]` with the real entry
    point into `run_dir` (`p["steps"]` steps when set, `extra` overrides after the bench's own;
    `quick`: 256 training items, batch 16), or the run already there."""
    if not (run_dir / "summary.json").is_file():
        overrides = [f"train.output_dir={run_dir}", f"parallel.ep_size={p['ep']}",
                     "train.progress=false", "train.eval_at_end=false", *extra]
        if p["steps"]:
            overrides += [f"train.max_steps={p['steps']}",
                          f"train.checkpoint_interval={p['steps']}"]
        if quick:
            overrides += ["data.max_train_items=256", "data.global_batch_size=16"]
        torchrun_train(config, overrides, p["ep"], label)
    return str(run_dir), json.loads((run_dir / "summary.json").read_text())
