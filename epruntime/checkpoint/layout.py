"""Where checkpoints live, what makes one complete, and the small atomic file operations.

    <output_dir>/checkpoints/
        step_000100/meta.json        step, world, EP size, config, data position, placements,
                                     named extra states, and the integrity record: the crc32 of
                                     every tensor, the size of every shard file, the sha256 of
                                     `.metadata`
        step_000100/.metadata        torch.distributed.checkpoint's metadata (where each tensor is)
        step_000100/__3_0.distcp     the tensors rank 3 wrote (DCP shard files)
        latest                       name of the newest complete checkpoint (a hint)

A checkpoint is written into `step_N.tmp/` and renamed to `step_N/` only after every shard, the
DCP metadata and meta.json are on disk (fsynced), so a `step_N/` that exists is complete. Format
version 1 was one `rank*.pt` per rank (torch.save); `python -m epruntime.checkpoint.convert`
turns it into this one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

FORMAT = "epruntime-dcp"
FORMAT_VERSION = 2  # 1: per-rank torch.save files (rank*.pt), see epruntime.checkpoint.legacy
META = "meta.json"
DCP_METADATA = ".metadata"
REQUIRED_META = ("step", "world_size", "ep_size", "config", "data")
CONVERT_TOOL = "python -m epruntime.checkpoint.convert"
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit this model (exit 2)."""


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(path: Path) -> int | None:
    m = _STEP_DIR.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def step_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step_N` directory (not `.tmp`), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((s, p) for p in root.iterdir() if p.is_dir() and (s := step_of(p)) is not None)


# ---- small durable writes ------------------------------------------------------------------

def atomic_write_text(path: Path, text: str) -> None:
    """Write, fsync, rename over `path`: a reader sees the old or the new text, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_os_error(err: OSError) -> str:
    """What an OSError means for a user, e.g. 'no space left on device (ENOSPC) at PATH'."""
    name = errno.errorcode.get(err.errno, "") if err.errno else ""
    what = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.ENOTDIR: "not a directory", errno.EDQUOT: "disk quota exceeded"}.get(
        err.errno, err.strerror or str(err))
    where = f" at {err.filename}" if err.filename else ""
    return f"{what} ({name}){where}" if name else f"{what}{where}"


def os_error_in(err: BaseException | None) -> OSError | None:
    """The OSError behind `err` (a failed write may be reported as a RuntimeError whose context
    is the file object's OSError), or None."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def write_failure(err: BaseException, what: Path, step: int) -> str:
    os_err = os_error_in(err)
    cause = describe_os_error(os_err) if os_err is not None else f"{type(err).__name__}: {err}"
    return (f"cannot write checkpoint step {step} ({what}): {cause}; the previous checkpoint is "
            "intact; free space or fix train.output_dir, then restart to resume from it")


# ---- meta.json -----------------------------------------------------------------------------

def read_meta(path: Path) -> dict:
    """meta.json of a step directory, with every field a loader needs; else CheckpointError."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}/{META}: unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}/{META}: expected a JSON object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{path}/{META}: missing field {', '.join(map(repr, missing))} "
                              "(damaged or written by another tool); restore it or resume from "
                              "another checkpoint")
    return meta


def is_legacy(path: Path, meta: dict | None = None) -> bool:
    """Written in format version 1 (one rank*.pt per rank)?"""
    if meta is not None and "format" in meta:
        return False
    return any(Path(path).glob("rank*.pt"))


def legacy_error(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a checkpoint in the old per-rank format (rank*.pt, format version 1), which "
        f"this epruntime no longer loads; convert it with `{CONVERT_TOOL} {path}` (or the run's "
        "output_dir for all of its checkpoints)")


def check_format(meta: dict, path: Path) -> None:
    """meta.json must say this format and version and carry the integrity record."""
    if is_legacy(path, meta):
        raise legacy_error(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/{META}: format {meta.get('format')!r}, expected {FORMAT!r} "
                              "(written by another tool?); resume from another checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}/{META}: format_version {meta.get('format_version')!r}, this epruntime reads "
            f"version {FORMAT_VERSION}; use the epruntime that wrote it, or convert it with "
            f"`{CONVERT_TOOL}`")
    integrity = meta.get("integrity")
    if not isinstance(integrity, dict) or not {"metadata_sha256", "files", "tensors"} <= set(
            integrity):
        raise CheckpointError(f"{path}/{META}: missing its integrity record (files, tensors, "
                              "metadata_sha256); restore it or resume from another checkpoint")


def check_files(meta: dict, path: Path) -> None:
    """Cheap, read-nothing checks every rank can afford: DCP's metadata is the one this meta.json
    was written with (sha256), and every shard file exists with its recorded size."""
    integrity = meta["integrity"]
    md = path / DCP_METADATA
    if not md.is_file():
        raise CheckpointError(f"{md}: missing (the checkpoint's tensor index); restore it or "
                              "resume from another checkpoint")
    if sha256_of(md) != integrity["metadata_sha256"]:
        raise CheckpointError(f"{md}: does not match {META} (sha256 differs: metadata of another "
                              "checkpoint or damaged); restore it or resume from another "
                              "checkpoint")
    for name, rec in sorted(integrity["files"].items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: shard file missing ({META} lists it with {rec['bytes']} "
                                  "bytes); restore it or resume from another checkpoint")
        size = f.stat().st_size
        if size != rec["bytes"]:
            what = "truncated" if size < rec["bytes"] else "longer than written"
            raise CheckpointError(f"{f}: shard file {what}: {size} bytes, {META} records "
                                  f"{rec['bytes']}; restore it or resume from another checkpoint")


def damage(path: Path) -> str | None:
    """Why the step directory `path` is not a complete checkpoint, or None when it is: meta.json
    readable with every field, this format, DCP metadata and every shard file as recorded.
    (Tensor checksums are verified when the tensors are read.)"""
    try:
        meta = read_meta(path)
        check_format(meta, path)
        check_files(meta, path)
    except CheckpointError as err:
        return str(err)
    except OSError as err:
        return f"{path}: {describe_os_error(err)}"
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
    atomic_write_text(marker, newest.name)
    was = "was missing" if said is None else f"pointed at {said!r}, which is not the newest " \
                                              "complete checkpoint"
    return (f"{marker} {was}; it now names {newest.name}, the newest complete checkpoint (to go "
            "back to an older one, move the newer step directories away)")


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a run/checkpoints directory (-> its newest complete checkpoint);
    else CheckpointError."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for run_dir in (path, path.parent if path.name == "checkpoints" else None):
        if run_dir is not None and (found := latest_checkpoint(run_dir)) is not None:
            return found
    legacy = [p for _, p in step_dirs(path)] if path.is_dir() else []
    if legacy and all(is_legacy(p) for p in legacy):
        raise legacy_error(legacy[-1])
    raise CheckpointError(f"--checkpoint {path}: no checkpoint there (expected meta.json or a "
                          "checkpoints/step_N directory)")
