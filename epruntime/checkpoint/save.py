"""Saving: every rank hands DCP what it holds (epruntime.checkpoint.state); the coordinator
commits the step directory once every shard is durable (epruntime.checkpoint.storage).

Synchronous by default. With train.async_checkpoint the state is snapshotted on the host (the
only part training waits for), and DCP's `async_save` writes it in a background thread over a
gloo process group of its own, so its collectives never interleave with training's. One save is
in flight at a time: the next save, or `wait()` at the end of training, waits for it and raises
its failure, if any, as a CheckpointError on every rank.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from epruntime import __version__
from epruntime.checkpoint.layout import (FORMAT, FORMAT_VERSION, CheckpointError, checkpoint_root,
                                         os_error_in, write_failure)
from epruntime.checkpoint.resume import agree
from epruntime.checkpoint.state import save_state
from epruntime.checkpoint.storage import Commit, CommittingWriter


def failure_of(err: CheckpointException, what: str) -> CheckpointError:
    """DCP's per-rank failures as one CheckpointError: the lowest failing rank's message, named
    when it is another rank's."""
    rank, (exc, _trace) = sorted(err.failures.items())[0]
    if isinstance(exc, CheckpointError):
        message = str(exc)
    elif (os_err := os_error_in(exc)) is not None:
        message = f"{what}: {os_err}"
    else:
        message = f"{what}: {type(exc).__name__}: {exc}"
    mine = dist.get_rank() if dist.is_initialized() else 0
    return CheckpointError(message if rank == mine else f"rank {rank} failed {what}: {message}")


class Checkpointer:
    """The saves of one run. Collective: every rank constructs it at the same point and calls
    `save` at the same steps."""

    def __init__(self, engine, async_save: bool = False,
                 after_write: Callable[[int], None] | None = None):
        self.engine, self.async_save = engine, async_save
        self.after_write = after_write  # fault injection: (step) -> None once a shard is durable
        self.group = None
        if async_save:  # its own gloo group: DCP's collectives run beside training's
            self.group = dist.new_group(
                backend="gloo", timeout=timedelta(seconds=engine.cfg.parallel.timeout_s))
        self._pending: tuple[Future, Commit] | None = None

    def save(self, step: int, data_state: dict, extra: dict[str, Any] | None = None) -> Path:
        """Write checkpoint `step` (data position `data_state`, named JSON-able `extra` states,
        e.g. a calibration). Returns its final directory; asynchronously, it exists once the
        save completes (`wait`). An existing `step_N` is never replaced. A failure on any rank
        (disk full, read-only file system) removes `step_N.tmp` and raises CheckpointError on
        every rank, naming the rank and the cause; the previous checkpoint stays as it was."""
        self.wait()
        commit = self._begin(step, data_state, extra or {})
        env = self.engine.env
        state = save_state(self.engine, env.rank, snapshot=self.async_save)
        hook = (lambda: self.after_write(step)) if self.after_write is not None else None
        writer = CommittingWriter(commit, hook)
        if not self.async_save:
            self._settle(lambda: dcp.save(state, storage_writer=writer, process_group=self.group),
                         commit)
            return commit.final
        future = dcp.async_save(state, storage_writer=writer, process_group=self.group)
        self._pending = (future, commit)
        return commit.final

    def wait(self) -> None:
        """Wait for the save in flight (if any); its failure is raised here, on every rank."""
        if self._pending is None:
            return
        future, commit = self._pending
        self._pending = None
        self._settle(future.result, commit)

    def _settle(self, run: Callable[[], Any], commit: Commit) -> None:
        try:
            run()
        except CheckpointException as err:
            if self.engine.env.is_main:
                shutil.rmtree(commit.tmp, ignore_errors=True)
            raise failure_of(err, f"to save checkpoint step {commit.step}") from None

    def _begin(self, step: int, data_state: dict, extra: dict) -> Commit:
        """Collective: refuse an existing step_N, make a fresh step_N.tmp (rank 0)."""
        cfg, env, model = self.engine.cfg, self.engine.env, self.engine.model
        root = checkpoint_root(cfg.train.output_dir)
        final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
        error = None
        if env.is_main:
            try:
                if final.exists():
                    error = (f"{final} already exists; refusing to overwrite a checkpoint "
                             "(another run writing into train.output_dir?)")
                else:
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
            except OSError as err:
                error = write_failure(err, tmp, step)
        agree(error, f"to save checkpoint step {step}")
        try:  # copies as of now (an async save writes meta.json later), JSON or a named error
            data_state, extra = json.loads(json.dumps(data_state)), json.loads(json.dumps(extra))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint step {step}: the data position and extra states "
                                  f"must be JSON values ({err})") from None
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
                "world_size": env.world_size, "ep_size": env.ep_size,
                "epruntime_version": __version__, "data": data_state,
                "config": json.loads(cfg.canonical_json()),
                "placements": [p.to_dict() for p in model.placements],
                "extra": extra}
        return Commit(tmp=tmp, final=final, meta=meta, step=step)


def save_checkpoint(engine, step: int, data_state: dict,
                    extra: dict[str, Any] | None = None) -> Path:
    """Collective, synchronous: one checkpoint (see Checkpointer.save). Returns its directory."""
    return Checkpointer(engine).save(step, data_state, extra)
