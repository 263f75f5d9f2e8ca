"""SMoES against megatron-core's router: the tiny easy-vqa model trained from the same seed and
data with the baseline TopKRouter and with SMoES (attention and Gaussian modality scores), each
run as the real entry point (`torchrun -m epruntime.train`, EP over 2 CPU ranks).

Per variant: eval accuracy, modality specialization index over bins (`msi`) and over experts
(`msi_expert`), bin balancedness, training tokens/s. Paper (arXiv 2604.23996): MSI .177 -> .487
and +0.9% multimodal accuracy; goal here: SMoES msi >= 2.5x the baseline's at no lower accuracy.
"""

from __future__ import annotations

import argparse
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
}
FULL = dict(steps=None, eval_items=None, nproc=2, mi_coeff=None, variants=list(VARIANTS))
QUICK = dict(steps=30, eval_items=256, nproc=2, mi_coeff=None, variants=list(VARIANTS))
METRICS = ("eval_accuracy", "msi", "msi_expert", "bin_balancedness", "tokens_per_s", "final_loss")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help="training steps (default: the tiny config's)")
    parser.add_argument("--eval-items", dest="eval_items", type=int,
                        help="first N test questions (default: all)")
    parser.add_argument("--nproc", type=int, help="ranks (EP size), default 2")
    parser.add_argument("--mi-coeff", dest="mi_coeff", type=float,
                        help="smoes.mi_coeff for the SMoES variants (default: the paper's 1e-4)")
    parser.add_argument("--variants", type=lambda s: s.split(","),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")


def _train(variant: str, p: dict[str, Any], out: Path) -> dict[str, Any]:
    overrides = [*VARIANTS[variant], f"train.output_dir={out}", "train.progress=false",
                 f"parallel.ep_size={p['nproc']}"]
    if p["steps"]:
        overrides.append(f"train.max_steps={p['steps']}")
    if p["eval_items"]:
        overrides.append(f"data.max_eval_items={p['eval_items']}")
    if p["mi_coeff"] is not None and variant != "baseline":
        overrides.append(f"smoes.mi_coeff={p['mi_coeff']}")
    return torchrun_train(TINY, overrides, p["nproc"], variant)


@register("smoes", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Baseline router vs SMoES (attention, gaussian): accuracy, MSI, balance, tokens/s."""
    p = resolve(args, FULL, QUICK)
    unknown = set(p["variants"]) - set(VARIANTS)
    if unknown:
        raise BenchUsageError(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_smoes_") as tmp:
        for variant in p["variants"]:
            print(f"smoes: training {variant}...", file=sys.stderr, flush=True)
            s = _train(variant, p, Path(tmp, variant))
            rows.append({"variant": variant, **{k: s[k] for k in METRICS},
                         "msi_per_layer": [layer["msi"] for layer in s["routing_per_layer"]],
                         "steps": s["steps"], "seconds": s["seconds"]})
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    ratios = {}
    if base is not None:
        for r in rows:
            if r is not base:
                ratios[f"{r['variant']}/baseline_msi"] = r["msi"] / max(base["msi"], 1e-12)
                ratios[f"{r['variant']}/baseline_accuracy"] = r["eval_accuracy"] / base["eval_accuracy"]
                ratios[f"{r['variant']}/baseline_tokens_per_s"] = r["tokens_per_s"] / base["tokens_per_s"]
    params = {"config": str(TINY.relative_to(ROOT)), "steps": p["steps"] or "config",
              "eval_items": p["eval_items"] or "all", "ep_size": p["nproc"],
              "mi_coeff": p["mi_coeff"] if p["mi_coeff"] is not None else "config",
              "quick": bool(args.quick)}
    notes = ["one training run per variant (same seed, data and initial weights); "
             "tokens_per_s is the training throughput of that run"]
    return BenchResult(name="smoes", params=params, rows=rows, ratios=ratios, env=collect_env(),
                       notes=notes)
