"""Inference-time visual-token reduction side by side on one trained checkpoint: FastMMoE
(arXiv 2511.17885: reduced visual expert activation + routing-aware pruning) against FastV and
LearnPruner's text-to-vision attention pruning, all through epruntime's one pruning path, EP over
CPU ranks (gloo).

A tiny easy-vqa MoE-VLM is trained first with the real entry point (or `--checkpoint` reuses
one). One set of ranks loads it and evaluates every variant on the same test items: accuracy
(and its retention against `full`), analytic FLOPs (and their ratio to the full model), the
CommLedger's cross-rank bytes, and prefill tokens/s (prompt tokens over forward time of the
slowest rank; median of repeats, round-robin over the variants on a fixed subset). A PNG plots
accuracy retention against FLOPs ratio for every policy.

Variants: `full`; `reduced` (visual tokens keep k' experts, nothing pruned); `fastmmoe@r`
(k' plus routing-redundancy pruning to retention r at `--layer`); `fastv@r` and
`text2vision@r` (attention-based pruning at the same layer, all k experts). `--variants` adds
more (e.g. `fastmmoe@0.75,fastv@0.125`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from profiling.benchlib import (ROOT, TINY_CONFIG, BenchResult, Subset, add_checkpoint_options,
                                checkpoint_or_train, collect_env, open_checkpoint, register,
                                resolve, spawn_ranks)

FULL = dict(ep=2, steps=None, checkpoint=None, workdir=None, vision_topk=1, layer=0,
            eval_items=None, timing_items=512, repeats=5, warmup=1, transport="pg")
QUICK = dict(ep=2, steps=6, checkpoint=None, workdir=None, vision_topk=1, layer=0,
             eval_items=64, timing_items=32, repeats=2, warmup=1, transport="pg")
BASE_VARIANTS = ["full", "reduced", "fastmmoe@0.5", "fastmmoe@0.25", "fastmmoe@0.125",
                 "fastv@0.5", "fastv@0.25", "text2vision@0.25"]


def add_options(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_options(parser, FULL, transport=True,
                           variants="comma-separated extra variants, e.g. fastmmoe@0.125")
    parser.add_argument("--vision-topk", dest="vision_topk", type=int,
                        help="k' of visual tokens in reduced and fastmmoe variants (default 1)")
    parser.add_argument("--layer", type=int, help="pruning layer (default 0)")


def variant_config(name: str, p: dict[str, Any]) -> dict:
    """Variant name -> the `fastmmoe` config section it runs."""
    if name == "full":
        return {"enabled": False}
    if name == "reduced":
        return {"enabled": True, "vision_topk": p["vision_topk"], "policy": "none"}
    policy, _, retention = name.partition("@")
    if policy not in ("fastmmoe", "fastv", "text2vision") or not retention:
        raise ValueError(f"unknown variant {name!r}: expected full, reduced or "
                         "<fastmmoe|fastv|text2vision>@<retention>")
    section = {"enabled": True, "policy": policy, "layers": [p["layer"]],
               "retention": float(retention)}
    if policy == "fastmmoe":
        section["vision_topk"] = p["vision_topk"]
    return section


def _worker(rank: int, checkpoint: str, p: dict[str, Any], variants: list[str], out: str) -> None:
    import torch

    from epruntime.config import FastMMoEConfig

    rs = open_checkpoint(checkpoint, p)
    engine, eval_ds, batch = rs.engine(), rs.eval_ds, rs.batch
    reducer = engine.model.reducer
    sections = {v: FastMMoEConfig(**variant_config(v, p)) for v in variants}

    results: dict[str, dict] = {}
    for v in variants:  # accuracy, FLOPs and bytes over the whole eval set
        reducer.configure(sections[v])
        m = engine.evaluate(eval_ds, batch)
        results[v] = {"eval_accuracy": m["eval_accuracy"], "flops": m["flops"]["total"],
                      "flops_ratio": m["flops_ratio"],
                      "vision_tokens_kept": m["vision_tokens_kept"],
                      "cross_rank_bytes": (m["comm"] or {}).get("cross_rank_bytes"),
                      "samples": []}
    timing = Subset(eval_ds, p["timing_items"])
    for i in range(p["warmup"] + p["repeats"]):  # round-robin, so drift hits every variant
        for v in variants:
            reducer.configure(sections[v])
            m = engine.evaluate(timing, batch)
            if i >= p["warmup"]:
                results[v]["samples"].append(m["prefill_tokens_per_s"])
    if rank == 0:
        Path(out).write_text(json.dumps({"results": results, "items": len(eval_ds),
                                         "timing_items": len(timing),
                                         "seq_len": engine.model.seq_len,
                                         "vision_tokens": engine.model.num_vision_tokens}))
    torch.distributed.barrier()


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy retention against FLOPs ratio, one marker and line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["variant"].split("@")[0], []).append(row)
    for (policy, group), marker in zip(sorted(groups.items()), "osD^vP*X"):
        group = sorted(group, key=lambda r: r["flops_ratio"])
        ax.plot([r["flops_ratio"] for r in group], [r["accuracy_retention"] for r in group],
                marker=marker, label=policy)
        for r in group:
            ax.annotate(r["variant"].partition("@")[2] or r["variant"],
                        (r["flops_ratio"], r["accuracy_retention"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.955, color="grey", lw=0.8, ls="--")
    ax.axvline(0.45, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("FLOPs ratio (vs full model)")
    ax.set_ylabel("accuracy retention (vs full)")
    ax.set_title("Visual-token reduction, tiny easy-vqa (goal: upper left)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@register("fastmmoe", add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """FastMMoE vs FastV vs text-to-vision pruning: accuracy retention, FLOPs, prefill tokens/s."""
    p = resolve(args, FULL, QUICK)
    variants = BASE_VARIANTS + [v for v in (getattr(args, "variants", None) or "").split(",") if v]
    for v in variants:
        variant_config(v, p)  # a bad name fails here, before any training
    work = Path(p["workdir"] or tempfile.mkdtemp(prefix="bench-fastmmoe-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, trained = checkpoint_or_train(p, work, args.quick)
    out = work / "results.json"
    spawn_ranks(_worker, p["ep"], checkpoint, p, variants, str(out))
    data = json.loads(out.read_text())
    res = data["results"]
    full = res["full"]
    full_tps = statistics.median(full["samples"])
    rows = []
    for v in variants:
        r = res[v]
        tps = statistics.median(r["samples"])
        rows.append({"variant": v, "eval_accuracy": r["eval_accuracy"],
                     "accuracy_retention": r["eval_accuracy"] / full["eval_accuracy"]
                     if full["eval_accuracy"] else 0.0,
                     "flops_ratio": r["flops_ratio"], "prefill_tokens_per_s": tps,
                     "prefill_speedup": tps / full_tps,
                     "vision_tokens_kept": r["vision_tokens_kept"],
                     "cross_rank_bytes": r["cross_rank_bytes"], "flops": r["flops"],
                     "samples": r["samples"], "config": variant_config(v, p)})
    png = Path(args.json).with_suffix(".png") if args.json else work / "fastmmoe.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, png)
    ratios = {f"{r['variant']}/full_prefill_tokens_per_s": r["prefill_speedup"]
              for r in rows if r["variant"] != "full"}
    goal = [r for r in rows if r["variant"].startswith("fastmmoe")
            and r["accuracy_retention"] >= 0.955 and r["flops_ratio"] <= 0.45]
    notes = [f"plot: {png}",
             f"checkpoint: {checkpoint}" + (f" (trained here: {trained['steps']} steps)"
                                            if trained else ""),
             f"accuracy on {data['items']} test items; prefill timed on {data['timing_items']} "
             f"items x {p['repeats']} repeats, {data['seq_len']} prompt tokens per item "
             f"({data['vision_tokens']} visual)",
             "goal (retention >= 0.955 at flops_ratio <= 0.45, >= 2x prefill): "
             + (", ".join(f"{r['variant']} ({r['accuracy_retention']:.3f}, "
                          f"{r['flops_ratio']:.3f}, {r['prefill_speedup']:.2f}x)" for r in goal)
                or "no fastmmoe variant")]
    params = {**{k: v for k, v in p.items() if k != "workdir"}, "variants": variants,
              "config": str(TINY_CONFIG.relative_to(ROOT)), "quick": bool(args.quick)}
    return BenchResult(name="fastmmoe", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
