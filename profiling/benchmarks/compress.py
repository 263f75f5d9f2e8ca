"""Learned visual-token compression on tiny easy-vqa: LearnPruner (arXiv 2604.23950, stage 1
learned pruning + stage 2 text-to-vision attention) and QMoP (arXiv 2603.21232, query-guided
mixture of pooling / resampler / pruning projectors), each fine-tuned from one trained full
checkpoint with its module on (epruntime.compress.finetune), EP over CPU ranks (gloo).

A full MoE-VLM is trained first with the real entry point (or `--checkpoint` reuses one). Every
variant then starts from that checkpoint's weights (its module at initialisation) and trains
`--finetune-steps` steps; `full+ft` trains the full model as many steps, the control for the
extra training. Rows: accuracy and its retention against `full`, analytic FLOPs ratio (the
module's own cost included), visual tokens kept, prefill tokens/s (median of round-robin repeats
on a fixed subset) and speedup, cross-rank bytes, fine-tuning seconds.

Variants: `full`, `full+ft`, `learnpruner@b` (stage 1 keeps b of the visual tokens, stage 2
keeps `--stage2-retention` of those after the middle layer), `learnpruner-s1@b` (stage 1
only), `qmop@b` (b of the visual tokens out of the mixed projector).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from profiling.benchlib import (ROOT, TINY_CONFIG, BenchResult, Subset, add_checkpoint_options,
                                checkpoint_or_train, collect_env, open_checkpoint, register,
                                resolve, spawn_ranks)

FULL = dict(ep=2, steps=None, checkpoint=None, workdir=None, finetune_steps=300,
            finetune_lr=1e-3, stage2_retention=0.25, eval_items=None, timing_items=512,
            repeats=5, warmup=1)
QUICK = dict(ep=2, steps=6, checkpoint=None, workdir=None, finetune_steps=2, finetune_lr=1e-3,
             stage2_retention=0.25, eval_items=64, timing_items=32, repeats=2, warmup=1)
BASE_VARIANTS = ["full", "full+ft", "learnpruner@0.25", "learnpruner-s1@0.25",
                 "learnpruner-s1@0.5", "qmop@0.25", "qmop@0.5"]


def add_options(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_options(parser, FULL,
                           variants="comma-separated variants instead of the default set")
    parser.add_argument("--finetune-steps", dest="finetune_steps", type=int,
                        help="steps each variant trains with its module on (default 300)")
    parser.add_argument("--finetune-lr", dest="finetune_lr", type=float,
                        help="peak LR of fine-tuning (default 1e-3, cosine to a tenth)")
    parser.add_argument("--stage2-retention", dest="stage2_retention", type=float,
                        help="LearnPruner stage 2 retention (default 0.25)")


def variant_sections(name: str, p: dict[str, Any]) -> dict[str, dict]:
    """Variant name -> the config sections it sets (epruntime.compress.finetune)."""
    from epruntime.compress.finetune import METHODS, method_sections

    if name in ("full", "full+ft"):
        return {}
    method, _, budget = name.partition("@")
    if method not in METHODS or not budget:
        raise ValueError(f"unknown variant {name!r}: expected full, full+ft or "
                         "<learnpruner|learnpruner-s1|qmop>@<budget>")
    return method_sections(method, float(budget), p["stage2_retention"])


def finetune_overrides(steps: int, lr: float) -> list[str]:
    """Config overrides of a fine-tuning run: `steps` steps, peak `lr` with a 10-step warmup
    and a cosine to a tenth of it (what both this benchmark and `bench.py reducers` use)."""
    return [f"train.max_steps={max(steps, 1)}", f"train.lr={lr}", f"train.min_lr={lr / 10}",
            f"train.warmup_steps={min(10, max(steps, 1))}"]


def _worker(rank: int, checkpoint: str, p: dict[str, Any], variants: list[str], out: str) -> None:
    import torch

    from epruntime import distributed
    from epruntime.compress import finetune as ft
    from epruntime.data import ShardedBatchIterator

    steps = p["finetune_steps"]
    rs = open_checkpoint(checkpoint, p, finetune_overrides(steps, p["finetune_lr"]))
    train_ds, eval_ds, batch = rs.train_ds, rs.eval_ds, rs.batch

    engines, results = {}, {}
    for v in variants:
        cfg = ft.variant_config(rs.cfg, **variant_sections(v, p))
        distributed.seed_all(cfg.train.seed)
        engine = rs.engine(cfg, load=False)
        t0 = time.perf_counter()
        if v == "full":
            rs.load(engine)
            losses = []
        else:
            ft.load_base_weights(engine, rs.path)
            batches = ShardedBatchIterator(train_ds, cfg.data.global_batch_size, rs.env.dp_rank,
                                           rs.env.dp_size, seed=cfg.train.seed + 1)
            losses = ft.finetune(engine, batches, steps)
        seconds = time.perf_counter() - t0
        row = ft.evaluate_variant(engine, eval_ds, results.get("full"), batch)
        results[v] = {**row, "finetune_steps": 0 if v == "full" else steps,
                      "finetune_seconds": seconds,
                      "finetune_final_loss": losses[-1] if losses else None, "samples": []}
        engines[v] = engine
    timing = Subset(eval_ds, p["timing_items"])
    for i in range(p["warmup"] + p["repeats"]):  # round-robin, so drift hits every variant
        for v in variants:
            m = engines[v].evaluate(timing, batch)
            if i >= p["warmup"]:
                results[v]["samples"].append(m["prefill_tokens_per_s"])
    if rank == 0:
        Path(out).write_text(json.dumps({"results": results, "items": len(eval_ds),
                                         "timing_items": len(timing),
                                         "vision_tokens": engines["full"].model.num_vision_tokens,
                                         "base_step": rs.meta["step"]}))
    torch.distributed.barrier()


@register("compress", add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """LearnPruner and QMoP fine-tuned from a full checkpoint: accuracy, FLOPs, tokens kept."""
    p = resolve(args, FULL, QUICK)
    variants = [v for v in (getattr(args, "variants", None) or "").split(",") if v] \
        or BASE_VARIANTS
    if "full" not in variants:
        variants = ["full", *variants]
    for v in variants:
        variant_sections(v, p)  # a bad name fails here, before any training
    work = Path(p["workdir"] or tempfile.mkdtemp(prefix="bench-compress-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, trained = checkpoint_or_train(p, work, args.quick, "training the full checkpoint")
    out = work / "results.json"
    spawn_ranks(_worker, p["ep"], checkpoint, p, variants, str(out))
    data = json.loads(out.read_text())
    res = data["results"]
    full_tps = statistics.median(res["full"]["samples"])
    rows = []
    for v in variants:
        r = res[v]
        tps = statistics.median(r["samples"])
        rows.append({"variant": v, **{k: r[k] for k in (
            "eval_accuracy", "accuracy_retention", "flops_ratio", "vision_tokens_kept",
            "token_compressor_flops", "cross_rank_bytes", "finetune_steps", "finetune_seconds",
            "finetune_final_loss", "samples")},
            "prefill_tokens_per_s": tps, "prefill_speedup": tps / full_tps,
            "config": variant_sections(v, p)})
    ratios = {f"{r['variant']}/full_prefill_tokens_per_s": r["prefill_speedup"]
              for r in rows if r["variant"] != "full"}
    notes = [f"checkpoint: {checkpoint} (step {data['base_step']}"
             + (", trained here)" if trained else ")"),
             f"each variant: the checkpoint's weights, module at init, {p['finetune_steps']} "
             f"fine-tuning steps (lr {p['finetune_lr']:g})",
             f"accuracy on {data['items']} test items; prefill timed on {data['timing_items']} "
             f"items x {p['repeats']} repeats ({data['vision_tokens']} visual tokens per item)"]
    params = {**{k: v for k, v in p.items() if k != "workdir"}, "variants": variants,
              "config": str(TINY_CONFIG.relative_to(ROOT)), "quick": bool(args.quick)}
    return BenchResult(name="compress", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
