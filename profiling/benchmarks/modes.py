"""MoDES (arXiv 2511.15690) on a trained checkpoint: dual-modality expert skipping at the
calibrated thresholds and at other skip ratios, EP over CPU ranks (gloo).

Calibration uses `--calibration-samples` TRAINING questions (seeded); every figure of the table
is on the TEST split, which calibration never saw. Variants:
- `full`: no skipping;
- `modes@kl<bound>`: the thresholds of the highest skip ratio whose mean KL(full || skipped) on
  the calibration samples is within the bound (this project's calibration, `modes.kl_bound`);
- `modes@skip<t>` for each `--targets` t: the lowest-KL thresholds reaching skip ratio t on the
  calibration samples (the paper's form of the search; its public code targets 0.8).
Columns: accuracy and its retention against full, FLOPs ratio, dispatched (token, expert) pairs
and cross-rank bytes (the CommLedger), skip ratio overall and per modality on the test split,
the thresholds, the calibration KL, and prefill tokens/s (median of round-robin repeats).

`evaluate_modes(checkpoint, ...)` is the entry point other benchmarks call (the reducers table);
`bench.py modes` trains the tiny-vqa checkpoint first unless `--checkpoint` names one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from profiling.benchlib import (ROOT, TINY_CONFIG, BenchResult, BenchUsageError, Subset,
                                add_checkpoint_options, checkpoint_or_train, collect_env,
                                open_checkpoint, register, resolve, spawn_ranks)

FULL = dict(ep=2, steps=None, checkpoint=None, workdir=None, eval_items=None,
            calibration_samples=256, calibration_seed=0, kl_bound=0.01, grid_points=32,
            targets="0.5,0.8", timing_items=512, repeats=3, warmup=1)
QUICK = dict(ep=2, steps=6, checkpoint=None, workdir=None, eval_items=64,
             calibration_samples=32, calibration_seed=0, kl_bound=0.01, grid_points=6,
             targets="0.5,0.8", timing_items=32, repeats=1, warmup=0)


def add_options(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_options(parser, FULL)
    parser.add_argument("--calibration-samples", dest="calibration_samples", type=int,
                        help="training samples for calibration (default 256)")
    parser.add_argument("--calibration-seed", dest="calibration_seed", type=int)
    parser.add_argument("--kl-bound", dest="kl_bound", type=float,
                        help="mean KL bound of the calibrated variant (default 0.01)")
    parser.add_argument("--grid-points", dest="grid_points", type=int,
                        help="threshold grid points per modality (default 32)")
    parser.add_argument("--targets", help="comma-separated skip ratios of the other variants "
                        "(default 0.5,0.8)")


def _targets(text: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise BenchUsageError(f"--targets {text!r}: expected comma-separated skip ratios")
    if not all(0 < v <= 1 for v in values):
        raise BenchUsageError(f"--targets {text!r}: each skip ratio must be in (0, 1]")
    return values


def _worker(rank: int, checkpoint: str, p: dict[str, Any], out: str) -> None:
    import torch

    from epruntime.modes.calibrate import Calibrator, model_identity

    rs = open_checkpoint(checkpoint, p, [
        "modes.enabled=true", f"modes.calibration_samples={p['calibration_samples']}",
        f"modes.calibration_seed={p['calibration_seed']}", f"modes.kl_bound={p['kl_bound']}",
        f"modes.grid_points={p['grid_points']}"])
    train_ds, eval_ds, engine = rs.train_ds, rs.eval_ds, rs.engine()
    skipper = engine.model.skipper

    # Calibration on training samples: one reference pass and one alpha for every variant.
    identity = model_identity(engine, str(rs.path), rs.meta["step"])
    calibrator = Calibrator(engine, train_ds, rs.cfg.modes)
    calibrations = {f"modes@kl{p['kl_bound']:g}": calibrator.calibration(
        calibrator.search_kl_bound(p["kl_bound"]), identity, objective="max_skip_within_kl",
        kl_bound=p["kl_bound"])}
    for target in p["targets"]:
        calibrations[f"modes@skip{target:g}"] = calibrator.calibration(
            calibrator.search_skip_target(target), identity, objective="min_kl_at_skip",
            target_skip=target)
    calibrator.restore()
    if rank == 0:
        for name, calib in calibrations.items():
            calib.save(Path(out).parent / f"{name.replace('@', '_')}.json")

    def configure(variant: str) -> None:
        if variant == "full":
            skipper.configure(False)
            return
        calib = calibrations[variant]
        skipper.configure(True, calib.alpha_tensor(), (calib.text_threshold,
                                                       calib.vision_threshold))

    variants = ["full", *calibrations]
    batch = rs.batch
    results: dict[str, dict] = {}
    for v in variants:  # accuracy, FLOPs, pairs and bytes over the test split
        configure(v)
        m = engine.evaluate(eval_ds, batch)
        comm = m["comm"] or {}
        modes = m.get("modes") or {}
        results[v] = {"eval_accuracy": m["eval_accuracy"], "flops_ratio": m["flops_ratio"],
                      "dispatched_pairs": int(sum(comm.get("load_per_rank", []))),
                      "cross_rank_bytes": comm.get("cross_rank_bytes"),
                      "skip_ratio": modes.get("skip_ratio", 0.0),
                      "text_skip_ratio": modes.get("text_skip_ratio", 0.0),
                      "vision_skip_ratio": modes.get("vision_skip_ratio", 0.0),
                      "samples": []}
        if v != "full":
            calib = calibrations[v]
            results[v].update(text_threshold=calib.text_threshold,
                              vision_threshold=calib.vision_threshold,
                              calibration_kl=calib.fit["kl"],
                              calibration_skip_ratio=calib.fit["skip_ratio"])
    for v in calibrations:  # the cost of the skip decision itself
        results[v]["selection_ms"] = _decision_ms(engine, eval_ds, batch, calibrations[v])
    timing = Subset(eval_ds, p["timing_items"])
    for i in range(p["warmup"] + p["repeats"]):  # round-robin, so drift hits every variant
        for v in variants:
            configure(v)
            m = engine.evaluate(timing, batch)
            if i >= p["warmup"]:
                results[v]["samples"].append(m["prefill_tokens_per_s"])
    if rank == 0:
        Path(out).write_text(json.dumps({
            "results": results, "variants": variants, "items": len(eval_ds),
            "timing_items": len(timing), "calibration_samples": len(calibrator.rows),
            "alpha": calibrations[variants[1]].alpha,
            "layer_removal_kl": calibrations[variants[1]].fit["layer_removal_kl"]}))
    torch.distributed.barrier()


def _decision_ms(engine, dataset, batch_size: int, calib, repeats: int = 31) -> float:
    """Median milliseconds MoDES adds to one forward pass of `batch_size` test items: the skip
    decision and its device-side counts on every layer's routing (measured on layer 0's routing,
    recorded from a full pass, times the number of layers). Local to this rank."""
    import time

    import torch

    model, skipper = engine.model, engine.model.skipper
    seen = []
    skipper.configure(False)
    model.router_tap.add("recording", lambda e: seen.append(e) if e.layer == 0 else None)
    try:
        with torch.no_grad():
            b = dataset.batch(torch.arange(min(batch_size, len(dataset)))).to(engine.env.device)
            model.eval()(b.images, b.question_ids, b.question_lens)
    finally:
        model.router_tap.remove("recording")
    event = seen[-1]
    skipper.configure(True, calib.alpha_tensor(), (calib.text_threshold, calib.vision_threshold))
    samples = []
    with torch.no_grad(), model.tokens.forward(event.modality_T[:, None]):
        for _ in range(repeats):
            t0 = time.perf_counter()
            skipper.on_routing(0, event.probs_TE, event.routing_map_TE)
            if event.probs_TE.is_cuda:
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
    skipper.reset_stats()
    samples.sort()
    return samples[len(samples) // 2] * 1e3 * len(model.gpt.decoder.layers)


def evaluate_modes(checkpoint: str, *, ep: int = 2, eval_items: int | None = None,
                   calibration_samples: int = 256, calibration_seed: int = 0,
                   kl_bound: float = 0.01, grid_points: int = 32,
                   targets: tuple[float, ...] = (0.5, 0.8), timing_items: int = 512,
                   repeats: int = 3, warmup: int = 1, workdir: str | Path | None = None
                   ) -> tuple[list[dict], dict]:
    """MoDES on a trained checkpoint at EP=`ep` (spawns the ranks): calibrate on training
    samples, evaluate on the test split. Returns (rows, details): one row per variant (`full`,
    `modes@kl<bound>`, `modes@skip<t>` per target) with eval_accuracy, accuracy_retention,
    flops_ratio, dispatched_pairs, cross_rank_bytes, skip_ratio (and per modality),
    prefill_tokens_per_s, prefill_speedup, selection_ms (the skip decisions of one forward pass
    of an evaluation batch, rank 0), the thresholds and the calibration's KL; details
    hold the item counts, alpha and where the calibration files went."""
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-modes-"))
    work.mkdir(parents=True, exist_ok=True)
    p = dict(ep=ep, eval_items=eval_items, calibration_samples=calibration_samples,
             calibration_seed=calibration_seed, kl_bound=kl_bound, grid_points=grid_points,
             targets=list(targets), timing_items=timing_items, repeats=repeats, warmup=warmup)
    out = work / "modes_results.json"
    spawn_ranks(_worker, ep, str(checkpoint), p, str(out))
    data = json.loads(out.read_text())
    res = data["results"]
    full = res["full"]
    full_tps = statistics.median(full["samples"]) if full["samples"] else None
    rows = []
    for v in data["variants"]:
        r = dict(res[v])
        samples = r.pop("samples")
        tps = statistics.median(samples) if samples else None
        rows.append({"variant": v, "eval_accuracy": r.pop("eval_accuracy"),
                     "accuracy_retention": (res[v]["eval_accuracy"] / full["eval_accuracy"]
                                            if full["eval_accuracy"] else 0.0),
                     **r, "prefill_tokens_per_s": tps,
                     "prefill_speedup": tps / full_tps if tps and full_tps else None,
                     "samples": samples})
    details = {k: data[k] for k in ("items", "timing_items", "calibration_samples", "alpha",
                                    "layer_removal_kl")}
    details["calibrations"] = sorted(str(f) for f in work.glob("modes_*.json")
                                     if f.name != out.name)
    return rows, details


@register("modes", add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """MoDES expert skipping: accuracy retention, FLOPs, pairs, bytes at calibrated thresholds."""
    p = resolve(args, FULL, QUICK)
    targets = _targets(p["targets"])
    work = Path(p["workdir"] or tempfile.mkdtemp(prefix="bench-modes-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, trained = checkpoint_or_train(p, work, args.quick)
    repeats, warmup = p["repeats"], p["warmup"]
    rows, details = evaluate_modes(
        checkpoint, ep=p["ep"], eval_items=p["eval_items"],
        calibration_samples=p["calibration_samples"], calibration_seed=p["calibration_seed"],
        kl_bound=p["kl_bound"], grid_points=p["grid_points"], targets=tuple(targets),
        timing_items=p["timing_items"], repeats=repeats, warmup=warmup, workdir=work)
    ratios = {f"{r['variant']}/full_flops": r["flops_ratio"] for r in rows
              if r["variant"] != "full"}
    notes = [f"checkpoint: {checkpoint}" + (f" (trained here: {trained['steps']} steps)"
                                            if trained else ""),
             f"calibration: {details['calibration_samples']} training samples (seed "
             f"{p['calibration_seed']}); scores on {details['items']} test items; prefill timed "
             f"on {details['timing_items']} items x {repeats} repeats",
             "alpha per layer (text, vision): "
             + str([[round(a, 4) for a in row] for row in details["alpha"]]),
             "calibration files: " + ", ".join(details["calibrations"])]
    params = {**{k: v for k, v in p.items() if k != "workdir"}, "targets": targets,
              "repeats": repeats, "config": str(TINY_CONFIG.relative_to(ROOT)),
              "quick": bool(args.quick)}
    return BenchResult(name="modes", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
