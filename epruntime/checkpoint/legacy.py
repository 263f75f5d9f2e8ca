"""Format version 1, as epruntime wrote it before DCP: `step_N/meta.json` and one
`rank%05d.pt` per rank (torch.save) holding what that rank owned (dense tensors by rank 0, each
expert by the first rank of its expert-data-parallel group) plus its RNG states.

Kept for two readers only: the converter (`python -m epruntime.checkpoint.convert`) and
`bench.py checkpoint`, which measures it as the "before". Reading uses
`torch.load(weights_only=True)`: the files hold dicts of tensors, nothing that needs pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from epruntime import __version__
from epruntime.checkpoint.layout import (CheckpointError, atomic_write_text, fsync_dir,
                                         read_meta)
from epruntime.checkpoint.state import rng_state
from epruntime.model.sharding import is_expert_param


def _owns(global_name: str) -> bool:
    if is_expert_param(global_name):
        return ps.get_expert_data_parallel_rank() == 0
    return dist.get_rank() == 0


def save_v1(engine, step: int, data_state: dict, directory: Path) -> Path:
    """Collective: write `directory` in format version 1, as `save_checkpoint` did."""
    env = engine.env
    if env.is_main:
        directory.mkdir(parents=True)
    dist.barrier()
    model, optimizer = {}, {}
    for name, param in engine.model.global_named_parameters(env.ep_rank):
        if _owns(name):
            model[name] = param.detach().clone()
            if param in engine.optimizer_state:
                optimizer[name] = {k: v.clone() for k, v in engine.optimizer_state[param].items()}
    for name, buf in engine.model.global_named_buffers(env.ep_rank):
        if _owns(name):
            model[name] = buf.detach().clone()
    rng = rng_state()
    payload = {"model": model, "optimizer": optimizer,
               "rng": {"torch": rng.pop("torch"),
                       "tracker": {k.removeprefix("tracker/"): v for k, v in rng.items()}}}
    part = directory / f"rank{env.rank:05d}.pt.part"
    with open(part, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, directory / f"rank{env.rank:05d}.pt")
    dist.barrier()
    if env.is_main:
        meta = {"step": step, "world_size": env.world_size, "ep_size": env.ep_size,
                "epruntime_version": __version__, "data": data_state,
                "config": json.loads(engine.cfg.canonical_json()),
                "placements": [p.to_dict() for p in engine.model.placements]}
        atomic_write_text(directory / "meta.json", json.dumps(meta, indent=1))
        fsync_dir(directory)
    dist.barrier()
    return directory


def read_v1(path: Path) -> tuple[dict, dict, dict, dict[int, dict]]:
    """(meta, model tensors, AdamW state by name, RNG state by rank) of a version-1 checkpoint,
    every rank file read with weights_only=True."""
    meta = read_meta(path)
    files = sorted(path.glob("rank*.pt"))
    if len(files) != meta["world_size"]:
        raise CheckpointError(f"{path}: {len(files)} rank files for world_size "
                              f"{meta['world_size']}")
    model, optimizer, rng = {}, {}, {}
    for f in files:
        try:
            payload = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged zip or a file with code in it
            raise CheckpointError(f"{f}: unreadable ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})") from None
        model.update(payload["model"])
        optimizer.update(payload["optimizer"])
        rng[int(f.name[4:9])] = payload["rng"]
    return meta, model, optimizer, rng


@torch.no_grad()
def load_v1(engine, path: Path) -> dict:
    """Load a version-1 checkpoint the way epruntime did: every rank reads every rank file."""
    meta, model, optimizer, _ = read_v1(path)
    for name, param in [*engine.model.global_named_parameters(engine.env.ep_rank),
                        *engine.model.global_named_buffers(engine.env.ep_rank)]:
        param.copy_(model[name])
        if name in optimizer:
            engine.optimizer_state[param] = {k: v.clone() for k, v in optimizer[name].items()}
    return meta
