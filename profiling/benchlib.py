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


def resolve_pairs(args: argparse.Namespace, full: dict[str, Any], quick: dict[str, Any],
                  world: int) -> dict[str, Any]:
    """`resolve` for the off/on paired-step benchmarks (keys layers, batch, pairs, warmup): the
    common --repeats / --warmup options override pairs / warmup; bad sizes are a usage error."""
    p = resolve(args, full, quick)
    if getattr(args, "repeats", None):
        p["pairs"] = args.repeats
    if getattr(args, "warmup", None) is not None:
        p["warmup"] = args.warmup
    if p["pairs"] < 1 or p["warmup"] < 0 or p["layers"] < 1 or p["batch"] < world:
        raise BenchUsageError("need --pairs/--repeats >= 1, --warmup >= 0, --layers >= 1 and "
                              f"--batch >= {world}")
    return p


def resolve_blocks(args: argparse.Namespace, full: dict[str, Any],
                   quick: dict[str, Any]) -> dict[str, Any]:
    """`resolve` for the benchmarks whose engines alternate blocks of training steps in one world
    (keys layers, batch, steps, blocks, warmup, world, ep): the common --repeats / --warmup
    options override blocks / warmup; sizes that cannot run are a usage error."""
    p = resolve(args, full, quick)
    if getattr(args, "repeats", None):
        p["blocks"] = args.repeats
    if getattr(args, "warmup", None) is not None:
        p["warmup"] = args.warmup
    if min(p["steps"], p["blocks"], p["world"], p["ep"], p["layers"]) < 1 or p["warmup"] < 0:
        raise BenchUsageError("need --steps, --blocks, --world, --ep, --layers >= 1 and "
                              "--warmup >= 0")
    if p["world"] % p["ep"] or p["batch"] % p["world"]:
        raise BenchUsageError(f"--ep {p['ep']} and --batch {p['batch']} must divide "
                              f"--world {p['world']} / be divisible by it")
    return p


def alternate_blocks(one_step: Callable[[str, bool], None], variants: tuple[str, ...],
                     p: dict[str, Any]) -> None:
    """`p["warmup"]` unrecorded steps per variant, then `p["blocks"]` rounds in which every
    variant runs `p["steps"]` recorded steps in turn: `one_step(variant, record)`."""
    for v in variants:
        for _ in range(p["warmup"]):
            one_step(v, False)
    for _ in range(p["blocks"]):
        for v in variants:
            for _ in range(p["steps"]):
                one_step(v, True)


def slowest_rank(ranks: list[dict[str, Any]], key: str, variant: str) -> list[float]:
    """Per recorded step, the largest of the ranks' `ranks[r][key][variant][step]` (a step is
    as slow as its slowest rank)."""
    steps = len(ranks[0][key][variant])
    return [max(r[key][variant][i] for r in ranks) for i in range(steps)]


def paired_blocks(times_a: list[float], times_b: list[float], steps: int) -> float:
    """Median over adjacent blocks of `steps` steps of mean(a) / mean(b): the ratio of two
    variants that alternated blocks, so load drifting over the run falls on both alike."""
    return statistics.median(statistics.mean(times_a[i:i + steps])
                             / statistics.mean(times_b[i:i + steps])
                             for i in range(0, len(times_a), steps))


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


class Spread(Subset):
    """`n` items spread evenly over a dataset (items 0, s, 2s, ... with s = len // n): a sample
    of a whole split where its first items would be a few images' questions."""

    def __init__(self, dataset, n: int):
        super().__init__(dataset, n)
        self.stride = max(1, len(dataset) // max(self.n, 1))

    def batch(self, idx):
        return self.dataset.batch(idx * self.stride)


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


# ---- ranks that evaluate a trained checkpoint ------------------------------------------------


def add_checkpoint_options(parser: argparse.ArgumentParser, full: dict[str, Any], *,
                           checkpoint: bool = True, transport: bool = False,
                           variants: str | None = None) -> None:
    """The options every checkpoint-evaluating benchmark takes (fastmmoe, modes, reducers,
    compress), their help naming the full-size default in `full`: --ep, --steps, --workdir,
    --eval-items, --timing-items; --checkpoint, --transport and --variants (`variants`: its
    help) where the benchmark has them."""
    parser.add_argument("--ep", type=int, help=f"EP size = ranks (default {full['ep']})")
    parser.add_argument("--steps", type=int, help="training steps of the full model (default: "
                        "the config's)")
    if checkpoint:
        parser.add_argument("--checkpoint", help="evaluate this checkpoint instead of training one")
    parser.add_argument("--workdir", help="trained checkpoints (and what is derived from them) "
                        "are kept here and reused")
    eval_items = full["eval_items"] or "all"
    parser.add_argument("--eval-items", dest="eval_items", type=int,
                        help=f"test items for accuracy (default {eval_items})")
    parser.add_argument("--timing-items", dest="timing_items", type=int,
                        help=f"test items per timed pass (default {full['timing_items']})")
    if transport:
        parser.add_argument("--transport", choices=("pg", "shm"),
                            help="dispatch.transport of the dedup dispatcher (default pg)")
    if variants is not None:
        parser.add_argument("--variants", help=variants)


def checkpoint_or_train(p: dict[str, Any], work: Path, quick: bool,
                        label: str = "training the checkpoint") -> tuple[str, dict | None]:
    """(checkpoint, summary.json of the run trained here or None): `p["checkpoint"]` when given,
    else the tiny config trained once into `work/train` (trained_checkpoint)."""
    if p.get("checkpoint"):
        return p["checkpoint"], None
    return trained_checkpoint(TINY_CONFIG, work / "train", p, quick, label)


@dataclass
class RankSetup:
    """What a benchmark's rank holds once it has opened a checkpoint: the checkpoint's config
    with the benchmark's overrides, the process group's environment, the datasets and this
    rank's share of an evaluation batch."""

    path: Path
    meta: dict[str, Any]
    overrides: list[str]
    cfg: Any  # epruntime.config.Config
    env: Any  # epruntime.distributed environment
    train_ds: Any
    eval_ds: Any
    batch: int

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(text vocabulary, answers, question length): what Engine needs from the data."""
        return len(self.train_ds.vocab), self.train_ds.num_answers, self.train_ds.max_question_len

    def engine(self, cfg: Any = None, load: bool = True):
        """Collective. An Engine of `cfg` (default: the checkpoint's), loaded with the
        checkpoint's weights unless `load` is false (restore_training_state off)."""
        from epruntime.engine import Engine

        engine = Engine(cfg if cfg is not None else self.cfg, self.env, *self.sizes)
        if load:
            self.load(engine)
        return engine

    def load(self, engine, path: str | Path | None = None) -> None:
        """Collective. The weights of `path` (default: this checkpoint) into `engine`."""
        from epruntime import checkpoint as ckpt

        ckpt.load_checkpoint(engine, path or self.path, restore_training_state=False)

    def other(self, checkpoint: str | Path):
        """Collective. An Engine of another checkpoint on the same data (its own config, the same
        overrides), loaded: e.g. a model fine-tuned from this one."""
        from epruntime import checkpoint as ckpt
        from epruntime.config import apply_overrides, config_from_dict

        path = ckpt.resolve_checkpoint(checkpoint)
        cfg = config_from_dict(apply_overrides(ckpt.read_meta(path)["config"], self.overrides))
        engine = self.engine(cfg, load=False)
        self.load(engine, path)
        return engine


def open_checkpoint(checkpoint: str | Path, p: dict[str, Any],
                    extra: list[str] | tuple[str, ...] = ()) -> RankSetup:
    """Collective, on every rank of a spawned benchmark: the checkpoint's config at EP=`p["ep"]`
    with the dedup dispatcher (`p["transport"]` when given), `p["eval_items"]` test items when
    set and `extra` overrides last; initialises the process group and builds the datasets."""
    from epruntime import checkpoint as ckpt
    from epruntime import distributed
    from epruntime.config import apply_overrides, config_from_dict
    from epruntime.datasets import build_datasets

    path = ckpt.resolve_checkpoint(checkpoint)
    meta = ckpt.read_meta(path)
    overrides = [f"parallel.ep_size={p['ep']}", "train.progress=false", "dispatch.kind=dedup"]
    if p.get("transport"):
        overrides.append(f"dispatch.transport={p['transport']}")
    if p.get("eval_items"):
        overrides.append(f"data.max_eval_items={p['eval_items']}")
    overrides += list(extra)
    cfg = config_from_dict(apply_overrides(meta["config"], overrides))
    env = distributed.init_distributed(cfg)
    train_ds, eval_ds = build_datasets(cfg)
    batch = max(1, cfg.data.eval_batch_size // env.dp_size)
    return RankSetup(path, meta, overrides, cfg, env, train_ds, eval_ds, batch)
