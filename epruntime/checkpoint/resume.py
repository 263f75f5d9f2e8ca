"""Before the first training step: can every rank write, what is left of an interrupted save, and
which checkpoint does the run resume from (or a named refusal)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from epruntime.checkpoint.layout import (CheckpointError, checkpoint_root, damage,
                                         describe_os_error, is_legacy, latest_checkpoint,
                                         legacy_error, read_meta, repair_latest, step_dirs,
                                         step_of)
from epruntime.config import Config


def agree(error: str | None, what: str, group=None) -> None:
    """Collective: raise CheckpointError on every rank when any rank failed `what`, naming the
    first rank that failed and its message."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, error, group=group)
    failed = [(r, e) for r, e in enumerate(everyone) if e is not None]
    if failed:
        rank, message = failed[0]
        mine = dist.get_rank(group)
        prefix = "" if rank == mine else f"rank {rank} failed {what}: "
        raise CheckpointError(prefix + message)


def warn(message: str) -> None:
    print(f"epruntime: warning: {message}", file=sys.stderr, flush=True)


def _probe_output_dir(output_dir: Path) -> str | None:
    """Why this rank cannot write checkpoints under `output_dir`, or None when it can."""
    field = f"train.output_dir={output_dir}"
    for parent in (output_dir, *output_dir.parents):
        if parent.exists() and not parent.is_dir():
            return (f"{field}: {parent} is a file, not a directory; choose another "
                    "train.output_dir")
    root = checkpoint_root(output_dir)
    probe = root / f".probe.rank{dist.get_rank():05d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return (f"{field}: cannot write checkpoints there ({describe_os_error(err)}); make it "
                "writable or choose another train.output_dir")
    return None


def prepare_run(cfg: Config) -> Path | None:
    """Collective, before the first training step. Checks that every rank can write checkpoints
    under train.output_dir, removes leftover `.tmp` directories of interrupted saves, repairs a
    lost or stale `latest` marker, and returns the checkpoint to resume from (None: start at step
    0). Refuses (CheckpointError, on every rank) rather than ever overwriting a complete
    checkpoint: a run that would start over on top of checkpoints needs train.resume=false and
    train.overwrite=true, and a resume with nothing left to train is an error."""
    t = cfg.train
    agree(_probe_output_dir(Path(t.output_dir)), "to prepare train.output_dir")
    error, resume = None, None
    if dist.get_rank() == 0:
        try:
            resume = _plan_resume(cfg)
        except CheckpointError as err:
            error = str(err)
        except OSError as err:
            error = f"train.output_dir={t.output_dir}: {describe_os_error(err)}"
    agree(error, "to prepare train.output_dir")
    box = [str(resume) if resume is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] is not None else None


def _plan_resume(cfg: Config) -> Path | None:
    """Rank 0's part of `prepare_run`."""
    t = cfg.train
    root = checkpoint_root(t.output_dir)
    for tmp in sorted(root.glob("step_*.tmp")):
        shutil.rmtree(tmp)
        warn(f"removed {tmp}, an interrupted checkpoint save")
    steps = step_dirs(t.output_dir)
    newest = latest_checkpoint(t.output_dir)
    if not t.resume:
        if not steps:
            return None
        if not t.overwrite:
            raise CheckpointError(
                f"train.output_dir={t.output_dir} holds checkpoints ({steps[-1][1].name} the "
                "newest) and train.resume=false would start over on top of them; resume "
                "(train.resume=true), choose another train.output_dir, or set "
                "train.overwrite=true to delete them")
        for _, path in steps:
            shutil.rmtree(path)
        (root / "latest").unlink(missing_ok=True)
        warn(f"train.overwrite=true: deleted {len(steps)} checkpoints under {root}")
        return None
    newer = [p for s, p in steps if newest is None or s > step_of(newest)]
    if newer and is_legacy(newer[-1]):  # a whole run in the old format: name the converter
        raise legacy_error(newer[-1])
    newer_damaged = [(p, why) for p in newer if (why := damage(p)) is not None]
    if newer_damaged:
        path, why = newer_damaged[-1]
        raise CheckpointError(
            f"{path} is damaged ({why}) and newer than any complete checkpoint; resuming would "
            "train over it: move it away to resume from "
            f"{newest.name if newest else 'step 0'}, or choose another train.output_dir")
    if newest is None:
        return None
    if (warning := repair_latest(t.output_dir)) is not None:
        warn(warning)
    step = read_meta(newest)["step"]
    if t.max_steps < step:  # (equal: the run is complete, see epruntime.train)
        raise CheckpointError(
            f"train.max_steps={t.max_steps} is below step {step} of the newest checkpoint "
            f"({newest}): nothing to train; raise train.max_steps, choose another "
            "train.output_dir, or start over with train.resume=false train.overwrite=true")
    return newest
