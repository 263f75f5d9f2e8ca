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

import json
import os
import shutil
import warnings
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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = checkpoint_root(output_dir)
    marker = root / "latest"
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a run/checkpoints directory (-> its latest); else CheckpointError."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            found = latest_checkpoint(root.parent if root.name == "checkpoints" else path)
            if found is not None:
                return found
    raise CheckpointError(f"--checkpoint {path}: no checkpoint there (expected meta.json or a "
                          "checkpoints/latest marker)")


def _owns(global_name: str) -> bool:
    if is_expert_param(global_name):
        return ps.get_expert_data_parallel_rank() == 0
    return dist.get_rank() == 0


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "tracker": mrandom.get_cuda_rng_tracker().get_states()}


def save_checkpoint(engine, step: int, data_state: dict) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    cfg, env = engine.cfg, engine.env
    root = checkpoint_root(cfg.train.output_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()

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
    torch.save(payload, tmp / f"rank{env.rank:05d}.pt.part")
    os.replace(tmp / f"rank{env.rank:05d}.pt.part", tmp / f"rank{env.rank:05d}.pt")
    dist.barrier()

    if env.is_main:
        meta = {"step": step, "world_size": env.world_size, "ep_size": env.ep_size,
                "epruntime_version": __version__, "data": data_state,
                "config": json.loads(cfg.canonical_json()),
                "placements": [p.to_dict() for p in engine.model.placements]}
        _atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", final.name)
    dist.barrier()
    return final


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}/meta.json: unreadable ({err})") from None


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


def _apply_placements(engine, meta: dict, path: Path) -> None:
    """Put each expert where the checkpoint had it, before tensors are copied (they are looked up
    by the logical expert in each slot). If that layout does not fit (another EP size) or this
    run's dispatcher cannot route it, keep the model's current placement: still correct, since
    expert tensors are keyed by logical id."""
    model = engine.model
    placements = saved_placements(meta, model)
    if placements is None:
        return
    unsupported = [layer for layer, (p, moe) in enumerate(zip(placements, model.moe_layers))
                   if not p.is_contiguous and not hasattr(moe.token_dispatcher, "set_placement")]
    if unsupported:
        warnings.warn(f"{path}: saved non-contiguous expert placement of layers {unsupported} "
                      f"needs a dispatcher that supports placements; loading under the current "
                      "placement instead", stacklevel=3)
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

    _apply_placements(engine, meta, path)
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
