"""How accuracy falls as visual information is removed at random: a trained checkpoint predicts
on a JSONL split (epruntime.infer --data) with a random fraction of the visual tokens taken away,
two ways:

- `occlude`: before the model, that fraction of each image's patches is painted with the
  image's mean colour (infer.occlude_vision; which patches depends on the row and the seed);
  nothing of them reaches any layer.
- `prune`: the runtime's own token removal (fastmmoe.policy=random, drop mode) after decoder
  layer `--layer`: layers up to it still see every token.

    python profiling/bench.py vision_drop --checkpoint runs/scenes --data data/scenes4/test.jsonl

Rows: method, fraction removed, accuracy (overall and per question kind when the JSONL lines
carry a "kind" field), the majority baseline; the median over `--repeats` seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from profiling.benchlib import ROOT, BenchResult, BenchUsageError, collect_env, register, resolve


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="checkpoint or training output_dir (runs/scenes)")
    parser.add_argument("--data", help="JSONL split to predict on (data/scenes4/test.jsonl)")
    parser.add_argument("--fractions", help="comma-separated fractions removed, e.g. 0,0.5,1")
    parser.add_argument("--methods", help="occlude,prune")
    parser.add_argument("--layer", type=int, help="prune: after this decoder layer (0)")
    parser.add_argument("--ep", type=int, help="EP ranks (2)")
    parser.add_argument("--max-items", type=int, help="predict on the first N lines only")


def _infer(checkpoint: str, data: Path, image_root: Path, out: Path, ep: int,
           overrides: list[str]) -> dict:
    """summary.json and predictions.jsonl of one `epruntime.infer --data` run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ep}", "-m", "epruntime.infer", "--checkpoint", checkpoint,
           "--data", str(data), "--image-root", str(image_root),
           "--set", f"infer.output_dir={out}", "--set", f"parallel.ep_size={ep}"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                  "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"infer {' '.join(overrides)} failed:\n{proc.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    return {"summary": summary, "predictions": preds}


def _per_kind(preds: list[dict], kinds: dict) -> dict[str, float]:
    hits: dict[str, list[bool]] = {}
    for p in preds:
        if "reference" in p and p["id"] in kinds:
            hits.setdefault(kinds[p["id"]], []).append(p["answer"] == p["reference"])
    return {f"acc_{k}": sum(v) / len(v) for k, v in sorted(hits.items())}


@register("vision_drop", add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Accuracy as a random fraction of the visual tokens is removed (occluded or pruned)."""
    p = resolve(args, {"checkpoint": "runs/scenes", "data": "data/scenes4/test.jsonl",
                       "fractions": "0,0.25,0.5,0.75,0.9,1", "methods": "occlude,prune",
                       "layer": 0, "ep": 2, "max_items": None, "repeats": 1},
                {"checkpoint": "runs/scenes", "data": "data/scenes4/test.jsonl",
                 "fractions": "0,0.5,1", "methods": "occlude", "layer": 0, "ep": 2,
                 "max_items": 256, "repeats": 1})
    fractions = [float(f) for f in str(p["fractions"]).split(",") if f.strip()]
    methods = [m for m in str(p["methods"]).split(",") if m.strip()]
    if any(not 0 <= f <= 1 for f in fractions) or not set(methods) <= {"occlude", "prune"}:
        raise BenchUsageError("--fractions must lie in [0, 1] and --methods in occlude,prune")
    data = Path(p["data"])
    if not data.is_file():
        raise BenchUsageError(f"--data {data}: no such file (generate the scenes first: python "
                              "-m epruntime.data.scenes --out data/scenes ...)")
    lines = [json.loads(x) for x in data.read_text().splitlines() if x.strip()]
    if p["max_items"]:
        lines = lines[:p["max_items"]]
    kinds = {x.get("id", i + 1): x["kind"] for i, x in enumerate(lines) if "kind" in x}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "data.jsonl"  # image paths stay relative to the original folder
        subset.write_text("".join(json.dumps(x) + "\n" for x in lines))
        for method in methods:
            for frac in fractions:
                if method == "prune" and frac == 0 and "occlude" in methods:
                    continue  # the same run as occlude at 0
                samples = []
                for seed in range(int(p["repeats"] or 1)):
                    if method == "occlude":
                        over = [f"infer.occlude_vision={frac}", f"infer.occlude_seed={seed}"]
                    else:
                        over = ["fastmmoe.enabled=true", "fastmmoe.policy=random",
                                f"fastmmoe.layers=[{p['layer']}]",
                                f"fastmmoe.retention={1 - frac}"]
                    out = Path(tmp) / f"{method}-{frac}-{seed}"
                    samples.append(_infer(p["checkpoint"], subset, data.parent, out, p["ep"],
                                          over))
                accs = [s["summary"]["eval_accuracy"] for s in samples]
                best = samples[accs.index(statistics.median_low(accs))]
                rows.append({"variant": f"{method}-{frac:g}", "method": method,
                             "removed": frac, "eval_accuracy": statistics.median(accs),
                             "majority_baseline": best["summary"]["majority_baseline"],
                             "vision_tokens_kept": best["summary"]["vision_tokens_kept"],
                             **_per_kind(best["predictions"], kinds), "samples": accs})
    full = next(r["eval_accuracy"] for r in rows if r["removed"] == 0)
    ratios = {f"{r['variant']}_over_full": r["eval_accuracy"] / full for r in rows
              if r["removed"] > 0}
    return BenchResult(name="vision_drop", params={**p, "quick": bool(args.quick)}, rows=rows,
                       ratios=ratios, env=collect_env(),
                       notes=["occlude: patches painted with the image's mean colour before the "
                              "model; prune: fastmmoe.policy=random after decoder layer "
                              f"{p['layer']}"])

