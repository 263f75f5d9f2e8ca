"""Checkpoints that survive a crash mid-write and load at any EP size.

Layout under `<output_dir>/checkpoints/`:
    step_000100/meta.json      step, world, EP size, config, data position, expert placement
    step_000100/rank00003.pt   what rank 3 owns: parameters and AdamW state under global names,
                               and its RNG states
    latest                     name of the newest complete checkpoint

Each parameter is written by exactly one owner: dense parameters by rank 0, an expert's by the
first rank of its expert-data-parallel group. Files are written into `step_N.tmp/` and the
directory is renamed only after every rank has finished, so a checkpoint that exists is complete.

Expert tensors are keyed by logical expert, so they load correctly under any placement. meta.json
also records the placement of every MoE layer; loading at the same EP size re-applies it, so
migrated experts come back in the slots they were saved in.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import random as mrandom

from epruntime import __version__
from epruntime.config import Config
from epruntime.model.sharding import is_expert_param
from epruntime.placement import Placement, PlacementError


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit this model."""


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


_STEP_DIR = re.compile(r"step_(\d+)")
REQUIRED_META = ("step", "world_size", "ep_size", "config", "data")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step_N` directory (not `.tmp`), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def damage(path: Path) -> str | None:
    """Why the step directory `path` is not a complete checkpoint, or None when it is: meta.json
    readable with every required field, and one rank file per rank of the world that wrote it."""
    try:
        meta = read_meta(path)
    except CheckpointError as err:
        return str(err)
    files = list(path.glob("rank*.pt"))
    if len(files) != meta["world_size"]:
        return f"{path}: {len(files)} rank files for world_size {meta['world_size']}"
    return None


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under `output_dir`, found by scanning the step directories
    (the `latest` marker is a hint that can be lost or stale; see `repair_latest`)."""
    for _, path in reversed(step_dirs(output_dir)):
        if damage(path) is None:
            return path
    return None


def repair_latest(output_dir: Path) -> str | None:
    """Point `checkpoints/latest` at the newest complete checkpoint when it is missing or points
    elsewhere; returns the warning to print, None when it was right. Rank 0 only."""
    newest = latest_checkpoint(output_dir)
    if newest is None:
        return None
    marker = checkpoint_root(output_dir) / "latest"
    said = marker.read_text().strip() if marker.is_file() else None
    if said == newest.name:
        return None
    _atomic_write_text(marker, newest.name)
    was = "was missing" if said is None else f"pointed at {said!r}, which is not the newest " \
                                              "complete checkpoint"
    return (f"{marker} {was}; it now names {newest.name}, the newest complete checkpoint (to go "
            "back to an older one, move the newer step directories away)")


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a run/checkpoints directory (-> its newest complete checkpoint);
    else CheckpointError."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for run_dir in (path, path.parent if path.name == "checkpoints" else None):
        if run_dir is not None and (found := latest_checkpoint(run_dir)) is not None:
            return found
    raise CheckpointError(f"--checkpoint {path}: no checkpoint there (expected meta.json or a "
                          "checkpoints/step_N directory)")


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


def describe_os_error(err: OSError) -> str:
    """What an OSError means for a user, e.g. 'no space left on device (ENOSPC) at PATH'."""
    name = errno.errorcode.get(err.errno, "") if err.errno else ""
    what = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.ENOTDIR: "not a directory", errno.EDQUOT: "disk quota exceeded"}.get(
        err.errno, err.strerror or str(err))
    where = f" at {err.filename}" if err.filename else ""
    return f"{what} ({name}){where}" if name else f"{what}{where}"


def _agree(error: str | None, what: str) -> None:
    """Collective: raise CheckpointError on every rank when any rank failed `what`, naming the
    first rank that failed and its message."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, error)
    failed = [(r, e) for r, e in enumerate(everyone) if e is not None]
    if failed:
        rank, message = failed[0]
        mine = dist.get_rank()
        prefix = "" if rank == mine else f"rank {rank} failed {what}: "
        raise CheckpointError(prefix + message)


def prepare_run(cfg: Config) -> Path | None:
    """Collective, before the first training step. Checks that every rank can write checkpoints
    under train.output_dir, removes leftover `.tmp` directories of interrupted saves, repairs a
    lost or stale `latest` marker, and returns the checkpoint to resume from (None: start at step
    0). Refuses (CheckpointError, on every rank) rather than ever overwriting a complete
    checkpoint: a run that would start over on top of checkpoints needs train.resume=false and
    train.overwrite=true, and a resume with nothing left to train is an error."""
    t = cfg.train
    _agree(_probe_output_dir(Path(t.output_dir)), "to prepare train.output_dir")
    error, resume = None, None
    if dist.get_rank() == 0:
        try:
            resume = _plan_resume(cfg)
        except CheckpointError as err:
            error = str(err)
        except OSError as err:
            error = f"train.output_dir={t.output_dir}: {describe_os_error(err)}"
    _agree(error, "to prepare train.output_dir")
    box = [str(resume) if resume is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] is not None else None


def _warn(message: str) -> None:
    print(f"epruntime: warning: {message}", file=sys.stderr, flush=True)


def _plan_resume(cfg: Config) -> Path | None:
    """Rank 0's part of `prepare_run`."""
    t = cfg.train
    root = checkpoint_root(t.output_dir)
    for tmp in sorted(root.glob("step_*.tmp")):
        shutil.rmtree(tmp)
        _warn(f"removed {tmp}, an interrupted checkpoint save")
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
        _warn(f"train.overwrite=true: deleted {len(steps)} checkpoints under {root}")
        return None
    newer_damaged = [(p, why) for s, p in steps
                     if (newest is None or s > int(_STEP_DIR.fullmatch(newest.name).group(1)))
                     and (why := damage(p)) is not None]
    if newer_damaged:
        path, why = newer_damaged[-1]
        raise CheckpointError(
            f"{path} is damaged ({why}) and newer than any complete checkpoint; resuming would "
            "train over it: move it away to resume from "
            f"{newest.name if newest else 'step 0'}, or choose another train.output_dir")
    if newest is None:
        return None
    if (warning := repair_latest(t.output_dir)) is not None:
        _warn(warning)
    step = read_meta(newest)["step"]
    if t.max_steps < step:  # (equal: the run is complete, see epruntime.train)
        raise CheckpointError(
            f"train.max_steps={t.max_steps} is below step {step} of the newest checkpoint "
            f"({newest}): nothing to train; raise train.max_steps, choose another "
            "train.output_dir, or start over with train.resume=false train.overwrite=true")
    return newest


def _owns(global_name: str) -> bool:
    if is_expert_param(global_name):
        return ps.get_expert_data_parallel_rank() == 0
    return dist.get_rank() == 0


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "tracker": mrandom.get_cuda_rng_tracker().get_states()}


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind `err` (torch.save reports a failed write as a RuntimeError whose
    context is the file object's OSError), or None."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _write_failure(err: BaseException, what: Path, step: int) -> str:
    os_err = _os_error_in(err)
    cause = describe_os_error(os_err) if os_err is not None else f"{type(err).__name__}: {err}"
    return (f"cannot write checkpoint step {step} ({what}): {cause}; the previous checkpoint is "
            "intact; free space or fix train.output_dir, then restart to resume from it")


def _save_rank_file(payload: dict, path: Path) -> None:
    """torch.save through a Python file (so a failed write keeps its OSError, e.g. ENOSPC),
    fsynced, then renamed into place."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def save_checkpoint(engine, step: int, data_state: dict, extra_meta: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory.

    Every rank writes its file into `step_N.tmp/`; only when all have succeeded does rank 0 write
    meta.json and rename the directory, then move `latest`. A failure on any rank (disk full,
    read-only file system) removes the `.tmp` directory and raises CheckpointError on every rank,
    naming the rank and the cause; the previous checkpoint stays as it was. An existing
    `step_N` is never replaced. `extra_meta` adds named entries to meta.json (train.py: the
    data vocabulary, `data_vocab`)."""
    cfg, env = engine.cfg, engine.env
    root = checkpoint_root(cfg.train.output_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    error = None
    if env.is_main:
        try:
            if final.exists():
                error = (f"{final} already exists; refusing to overwrite a checkpoint (another run "
                         "writing into train.output_dir?)")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except OSError as err:
            error = _write_failure(err, tmp, step)
    _agree(error, f"to save checkpoint step {step}")

    names = {p: n for n, p in engine.model.global_named_parameters(env.ep_rank)}
    model, optimizer = {}, {}
    for param, name in names.items():
        if _owns(name):
            model[name] = param.detach().clone()
            if param in engine.optimizer.state:
                optimizer[name] = {k: v.clone() for k, v in engine.optimizer.state[param].items()}
    for name, buf in engine.model.global_named_buffers(env.ep_rank):
        if _owns(name):
            model[name] = buf.detach().clone()
    payload = {"model": model, "optimizer": optimizer, "rng": _rng_state()}
    rank_file = tmp / f"rank{env.rank:05d}.pt"
    try:
        _save_rank_file(payload, rank_file)
        error = None
    except (OSError, RuntimeError) as err:
        error = _write_failure(err, rank_file, step)
    try:
        _agree(error, f"to save checkpoint step {step}")
        error = None
        if env.is_main:
            try:
                meta = {"step": step, "world_size": env.world_size, "ep_size": env.ep_size,
                        "epruntime_version": __version__, "data": data_state,
                        "config": json.loads(cfg.canonical_json()),
                        "placements": [p.to_dict() for p in engine.model.placements],
                        **(extra_meta or {})}
                _atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
                _fsync_dir(tmp)
                os.rename(tmp, final)  # a directory: fails rather than replace a non-empty one
                _fsync_dir(root)
                _atomic_write_text(root / "latest", final.name)
            except OSError as err:
                error = _write_failure(err, tmp / "meta.json", step)
        _agree(error, f"to save checkpoint step {step}")
    except CheckpointError:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_meta(path: Path) -> dict:
    """meta.json of a step directory, with every field a loader needs; else CheckpointError."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}/meta.json: unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}/meta.json: expected a JSON object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{path}/meta.json: missing field {', '.join(map(repr, missing))} "
                              "(damaged or written by another tool); restore it or resume from "
                              "another checkpoint")
    return meta


def check_compatible(meta: dict, cfg: Config, path: Path) -> None:
    """The checkpoint's model section must equal this run's (EP size may differ)."""
    theirs = meta["config"]["model"]
    mine = json.loads(cfg.canonical_json())["model"]
    diff = [f"model.{k}: checkpoint {theirs.get(k)!r} vs config {mine.get(k)!r}"
            for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)]
    if diff:
        raise CheckpointError(f"{path} was written for another model:\n  " + "\n  ".join(diff))


def saved_placements(meta: dict, model) -> list[Placement] | None:
    """The checkpoint's placements if they fit `model` as built (same layers, experts, EP size),
    with this run's ranks-per-node; None when they do not fit. Checkpoints written before
    placements were recorded were contiguous."""
    current = model.placements
    rpn = current[0].ranks_per_node
    if "placements" not in meta:
        if meta["ep_size"] != current[0].num_ranks:
            return None
        return [Placement.contiguous(p.num_experts, p.num_ranks, rpn) for p in current]
    saved = meta["placements"]
    if len(saved) != len(current):
        return None
    out = []
    for d, now in zip(saved, current):
        try:
            p = Placement.from_rank_lists(d["experts_per_rank"], rpn)
        except PlacementError:
            return None
        if (p.num_experts, p.num_ranks) != (now.num_experts, now.num_ranks):
            return None
        out.append(p)
    return out


def _apply_placements(engine, meta: dict, path: Path, resuming: bool) -> None:
    """Put each expert where the checkpoint had it, before tensors are copied (they are looked up
    by the logical expert in each slot), when the layout fits (same EP size) and this run's
    dispatchers can route it, and either training resumes (its state comes back as it was) or
    the run asks for a placement that moves (dispatch.placement other than contiguous). Otherwise
    the model keeps its current placement, which is just as correct: expert tensors are keyed by
    logical id. So `infer --set dispatch.kind=alltoall --set dispatch.placement=contiguous` loads
    a checkpoint whose experts migrated."""
    model = engine.model
    if not resuming and engine.cfg.dispatch.placement == "contiguous":
        return
    placements = saved_placements(meta, model)
    if placements is None or model.unsupported_placements(placements) is not None:
        return
    model.set_placements(placements)


def load_checkpoint(engine, path: Path, restore_training_state: bool = True) -> dict:
    """Load parameters (and optimizer + RNG when `restore_training_state`) into this rank.
    Returns the checkpoint's meta. Any EP size can load; RNG restores only at the same world."""
    cfg, env = engine.cfg, engine.env
    meta = read_meta(path)
    check_compatible(meta, cfg, path)
    files = sorted(path.glob("rank*.pt"))
    if len(files) != meta["world_size"]:
        raise CheckpointError(f"{path}: {len(files)} rank files for world_size {meta['world_size']}")
    model, optimizer = {}, {}
    for f in files:
        payload = torch.load(f, map_location="cpu", weights_only=False)
        model.update(payload["model"])
        optimizer.update(payload["optimizer"])
        if f.name == f"rank{env.rank:05d}.pt":
            rng = payload["rng"]

    _apply_placements(engine, meta, path, resuming=restore_training_state)
    ep_rank = env.ep_rank
    tensors = [*engine.model.global_named_parameters(ep_rank),
               *engine.model.global_named_buffers(ep_rank)]
    with torch.no_grad():
        for name, param in tensors:
            if name not in model:
                raise CheckpointError(f"{path}: {name} is missing")
            if model[name].shape != param.shape:
                raise CheckpointError(f"{path}: {name} has shape "
                                      f"{tuple(model[name].shape)}, model expects {tuple(param.shape)}")
            param.copy_(model[name])
            if restore_training_state and name in optimizer:
                engine.optimizer.state[param] = {k: v.clone() for k, v in optimizer[name].items()}
            elif restore_training_state:  # saved without state: none from what was here before
                engine.optimizer.state.pop(param, None)

    same_layout = meta["world_size"] == env.world_size and meta["ep_size"] == env.ep_size
    if restore_training_state and same_layout:
        torch.set_rng_state(rng["torch"])
        mrandom.get_cuda_rng_tracker().set_states(rng["tracker"])
    return meta
