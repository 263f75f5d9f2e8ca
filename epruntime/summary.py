"""`<output_dir>/summary.json`: the figures a run is judged by, written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path


def write_summary(output_dir: Path, summary: dict) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def report(is_main: bool, output_dir: Path, summary: dict) -> None:
    """Rank 0 writes summary.json and prints its headline figures."""
    if not is_main:
        return
    path = write_summary(output_dir, summary)
    keys = ("eval_accuracy", "majority_baseline", "final_loss", "tokens_per_s", "flops_ratio",
            "prefill_tokens_per_s", "vision_tokens_kept", "steps")
    shown = " ".join(f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float) else f"{k}={summary.get(k)}"
                     for k in keys if k in summary)
    print(f"{shown} -> {path}")
