"""Convert checkpoints of format version 1 (one rank*.pt per rank) to the DCP format:

    python -m epruntime.checkpoint.convert runs/tiny-vqa              # every step_N of a run
    python -m epruntime.checkpoint.convert runs/tiny-vqa/checkpoints/step_001200

One process, no process group. Tensors keep their keys (logical expert names), the AdamW state and
every rank's RNG state come along, so a converted checkpoint resumes at the same world size
exactly as the original would have, and loads at any other EP size. In place: `step_N` becomes
the new format and the original is kept beside it as `step_N.v1` (delete it once the converted
checkpoint has resumed). Files are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from pathlib import Path

from epruntime.checkpoint.layout import (FORMAT, FORMAT_VERSION, CheckpointError,
                                         checkpoint_root, fsync_dir, is_legacy, read_meta,
                                         step_dirs)


def _state(path: Path) -> tuple[dict, dict]:
    """(meta, flat DCP state dict) of the version-1 checkpoint at `path`."""
    import torch

    from epruntime.checkpoint.legacy import read_v1
    from epruntime.checkpoint.state import MODEL, OPTIM, rng_prefix

    meta, model, optimizer, rng = read_v1(path)
    state = {MODEL + name: t for name, t in model.items()}
    for name, states in optimizer.items():
        for k, v in states.items():
            state[f"{OPTIM}{name}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    for rank, r in rng.items():
        state[rng_prefix(rank) + "torch"] = r["torch"]
        for k, v in r["tracker"].items():
            state[f"{rng_prefix(rank)}tracker/{k}"] = v
    return meta, state


def convert(path: Path) -> Path:
    """Convert one version-1 step directory in place; returns the backup's path."""
    import torch.distributed.checkpoint as dcp

    from epruntime.checkpoint.storage import Commit, CommittingWriter

    path = Path(path)
    if not is_legacy(path, read_meta(path)):
        raise CheckpointError(f"{path}: not a version-1 checkpoint (no rank*.pt, or meta.json "
                              "already names a format)")
    backup, tmp, staged = (path.with_name(path.name + s) for s in (".v1", ".tmp", ".v2"))
    if backup.exists() or staged.exists():
        raise CheckpointError(f"{path}: {backup if backup.exists() else staged} exists (an "
                              "earlier conversion?); move it away first")
    meta, state = _state(path)
    meta = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION,
            "extra": meta.get("extra", {}), "converted_from": "format version 1"}
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    step = meta["step"]
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=CommittingWriter(
            Commit(tmp=tmp, final=staged, meta=meta, step=step, move_latest=False)), no_dist=True)
    os.rename(path, backup)  # `latest` keeps naming step_N, complete again after the next rename
    os.rename(staged, path)
    fsync_dir(path.parent)
    return backup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epruntime.checkpoint.convert",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a version-1 step directory, or a run's output_dir")
    args = parser.parse_args(argv)
    path = Path(args.path)
    try:
        if (path / "meta.json").is_file():
            targets = [path]
        else:
            run = path.parent if path.name == "checkpoints" else path
            targets = [p for _, p in step_dirs(run) if is_legacy(p)]
            if not targets:
                raise CheckpointError(f"{path}: no version-1 checkpoints under "
                                      f"{checkpoint_root(run)}")
        for target in targets:
            backup = convert(target)
            print(f"converted {target} (the original is kept as {backup})")
    except CheckpointError as err:
        print(f"epruntime.checkpoint.convert: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
