"""SMoES against megatron-core's router: a workload (default: the tiny easy-vqa config; any
config with `--config`) trained with the baseline TopKRouter and with SMoES (attention and
Gaussian modality scores; `smoes-gaussian-expert-bal` uses the earlier per-expert balance
form), each run as the real entry point (`torchrun -m epruntime.train`, EP over 2 CPU ranks),
once per seed of `--seeds` (every variant sees the same seeds: same initial weights and data).

With `--workdir DIR` every run trains into `DIR/<config>/<variant>-seed<seed>` and a run already
finished there (its summary.json) is reused, so a long sweep survives being stopped: run the same
command again and only the missing runs train (an interrupted one resumes from its last
checkpoint). Use a fresh DIR when the options change.

Per variant: eval accuracy, modality specialization index over bins (`msi`) and over experts
(`msi_expert`), bin balancedness, training tokens/s, as the mean over seeds with the sample
standard deviation (`<metric>_std`) and the per-seed values (`per_seed`). Paper
(arXiv 2604.23996): MSI .177 -> .487 and +0.9% multimodal accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from profiling.benchlib import (ROOT, BenchResult, BenchUsageError, collect_env, register, resolve,
                                torchrun_train)
from profiling.benchlib import TINY_CONFIG as TINY
VARIANTS = {
    "baseline": [],
    "smoes-attention": ["smoes.enabled=true", "smoes.score=attention"],
    "smoes-gaussian": ["smoes.enabled=true", "smoes.score=gaussian"],
    "smoes-gaussian-expert-bal": ["smoes.enabled=true", "smoes.score=gaussian",
                                  "smoes.bal_form=expert"],
}
DEFAULT_VARIANTS = ["baseline", "smoes-attention", "smoes-gaussian"]
FULL = dict(steps=None, eval_items=None, nproc=2, mi_coeff=None, variants=DEFAULT_VARIANTS,
            seeds=None, config=None, workdir=None)
QUICK = dict(steps=30, eval_items=256, nproc=2, mi_coeff=None, variants=DEFAULT_VARIANTS,
             seeds=None, config=None, workdir=None)
METRICS = ("eval_accuracy", "msi", "msi_expert", "bin_balancedness", "tokens_per_s", "final_loss")


def seed_list(text: str) -> list[int]:
    """argparse type for "1234,7,42" (non-negative integers, distinct)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds, got {text!r}")
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative seeds, got {text!r}")
    return values


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help="training steps (default: the tiny config's)")
    parser.add_argument("--eval-items", dest="eval_items", type=int,
                        help="first N test questions (default: all)")
    parser.add_argument("--nproc", type=int, help="ranks (EP size), default 2")
    parser.add_argument("--mi-coeff", dest="mi_coeff", type=float,
                        help="smoes.mi_coeff for the SMoES variants (default: the paper's 1e-4)")
    parser.add_argument("--variants", type=lambda s: s.split(","),
                        help=f"comma-separated subset of {','.join(VARIANTS)} "
                             f"(default {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--seeds", type=seed_list,
                        help="comma-separated train.seed values, one run per seed and variant "
                             "(default: the config's seed)")
    parser.add_argument("--config", type=Path,
                        help="workload config (default launch/configs/tiny-vqa.yaml)")
    parser.add_argument("--workdir", type=Path,
                        help="keep each run under DIR/<config>/<variant>-seed<seed> and reuse the "
                             "finished ones (default: a temporary directory, nothing kept)")


def _train(variant: str, p: dict[str, Any], seed: int | None, out: Path) -> dict[str, Any]:
    """summary.json of one training run into `out`, or of the run already finished there."""
    if (out / "summary.json").is_file():
        print(f"smoes: reusing {out}/summary.json", file=sys.stderr, flush=True)
        return json.loads((out / "summary.json").read_text())
    overrides = [*VARIANTS[variant], f"train.output_dir={out}", "train.progress=false",
                 f"parallel.ep_size={p['nproc']}"]
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    if p["steps"]:
        overrides.append(f"train.max_steps={p['steps']}")
    if p["eval_items"]:
        overrides.append(f"data.max_eval_items={p['eval_items']}")
    if p["mi_coeff"] is not None and variant != "baseline":
        overrides.append(f"smoes.mi_coeff={p['mi_coeff']}")
    return torchrun_train(p["config"] or TINY, overrides, p["nproc"], f"{variant} (seed {seed})")


def _aggregate(variant: str, runs: list[tuple[int | None, dict[str, Any]]]) -> dict[str, Any]:
    """One row: each metric's mean over seeds, its sample std (0 for one seed), per-seed values."""
    row: dict[str, Any] = {"variant": variant, "seeds": [seed for seed, _ in runs]}
    for k in METRICS:
        values = [s[k] for _, s in runs]
        row[k] = statistics.fmean(values)
        row[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    layers = [[layer["msi"] for layer in s["routing_per_layer"]] for _, s in runs]
    row["msi_per_layer"] = [statistics.fmean(v) for v in zip(*layers)]
    row["steps"] = runs[0][1]["steps"]
    row["seconds"] = sum(s["seconds"] for _, s in runs)
    row["per_seed"] = [{"seed": seed, **{k: s[k] for k in METRICS}} for seed, s in runs]
    return row


@register("smoes", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Baseline router vs SMoES (attention, gaussian): accuracy, MSI, balance, tokens/s."""
    p = resolve(args, FULL, QUICK)
    unknown = set(p["variants"]) - set(VARIANTS)
    if unknown:
        raise BenchUsageError(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if p["config"] is not None and not Path(p["config"]).is_file():
        raise BenchUsageError(f"--config {p['config']}: no such file")
    seeds = p["seeds"] or [None]  # None: the config's own train.seed
    rows = []
    config = Path(p["config"] or TINY).resolve()
    with contextlib.ExitStack() as stack:
        if p["workdir"] is not None:
            work = Path(p["workdir"]).resolve() / config.stem
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_smoes_")))
        for variant in p["variants"]:
            runs = []
            for seed in seeds:
                label = "config" if seed is None else seed
                print(f"smoes: training {variant} (seed {label})...", file=sys.stderr, flush=True)
                runs.append((seed, _train(variant, p, seed, work / f"{variant}-seed{label}")))
            rows.append(_aggregate(variant, runs))
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    ratios = {}
    if base is not None:
        for r in rows:
            if r is not base:
                ratios[f"{r['variant']}/baseline_msi"] = r["msi"] / max(base["msi"], 1e-12)
                ratios[f"{r['variant']}/baseline_accuracy"] = r["eval_accuracy"] / base["eval_accuracy"]
                ratios[f"{r['variant']}/baseline_tokens_per_s"] = r["tokens_per_s"] / base["tokens_per_s"]
    params = {"config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
              "seeds": p["seeds"] or "config", "steps": p["steps"] or "config",
              "eval_items": p["eval_items"] or "all", "ep_size": p["nproc"],
              "mi_coeff": p["mi_coeff"] if p["mi_coeff"] is not None else "config",
              "workdir": str(work) if p["workdir"] is not None else None,
              "quick": bool(args.quick)}
    notes = ["one training run per variant and seed (a seed gives every variant the same data "
             "order and initial weights); metrics are means over seeds, *_std the sample "
             "standard deviation; tokens_per_s is training throughput on a shared machine"]
    return BenchResult(name="smoes", params=params, rows=rows, ratios=ratios, env=collect_env(),
                       notes=notes)
