"""Run a function on N real ranks (torch.multiprocessing + gloo) from a test."""

import json
from pathlib import Path

from epruntime.distributed import spawn_local as spawn

__all__ = ["spawn", "spawn_reports", "write_report"]


def write_report(out_dir: str, rank: int, report: dict) -> None:
    """A rank's JSON report, for `spawn_reports` to collect."""
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


def spawn_reports(worker, world: int, out_dir: Path) -> list[dict]:
    """Run `worker(rank, str(out_dir))` on `world` ranks; the reports they wrote with
    `write_report`, in rank order."""
    spawn(worker, world, str(out_dir))
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
