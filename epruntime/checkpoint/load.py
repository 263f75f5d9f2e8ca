"""Loading: check the checkpoint (format, model, shard files), put experts where it had them when
that fits, then let DCP read exactly the keys this rank holds, verifying every tensor.

Any EP size and any placement loads: expert tensors are keyed by logical expert
(epruntime.checkpoint.state). RNG states come back only at the same world and EP size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from epruntime.checkpoint.layout import CheckpointError, check_files, check_format, read_meta
from epruntime.checkpoint.resume import agree
from epruntime.checkpoint.save import failure_of
from epruntime.checkpoint.state import apply_loaded, load_targets
from epruntime.checkpoint.storage import VerifyingLoadPlanner, VerifyingReader, read_dcp_metadata
from epruntime.config import Config, ModelConfig
from epruntime.placement import Placement, PlacementError


@dataclass(frozen=True)
class ReadStats:
    """What one rank read from the checkpoint."""

    bytes_read: int  # bytes read from shard files (counted at the file, not planned)
    bytes_by_key: dict[str, int]  # the same per state-dict key
    files_read: tuple[str, ...]  # shard files it opened
    keys: tuple[str, ...]  # state-dict keys it asked for


TRAINING_ONLY_VISION_FIELDS = ("pretrained", "freeze")


def check_compatible(meta: dict, cfg: Config, path: Path) -> None:
    """The checkpoint's model section must equal this run's (EP size may differ)."""
    mine = json.loads(cfg.canonical_json())["model"]
    # A field the checkpoint predates ran with its default (e.g. the router options, or
    # model.vision.grid_positions inside a section).
    theirs = with_defaults(json.loads(ModelConfig().model_dump_json()), meta["config"]["model"])
    # How the encoder started and whether it trained are no part of the model the weights are
    # for: a checkpoint of a frozen, pretrained stem loads without the file, or to fine-tune it.
    for section in (mine, theirs):
        section["vision"] = {k: v for k, v in section.get("vision", {}).items()
                             if k not in TRAINING_ONLY_VISION_FIELDS}
    diff = [f"model.{k}: checkpoint {theirs.get(k)!r} vs config {mine.get(k)!r}"
            for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)]
    if diff:
        raise CheckpointError(f"{path} was written for another model:\n  " + "\n  ".join(diff))


def with_defaults(defaults: dict, saved: dict) -> dict:
    """`saved` with every field it lacks taken from `defaults`, nested sections included."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = with_defaults(value, out[key])
    return out


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


def _apply_placements(engine, meta: dict, resuming: bool) -> None:
    """Put each expert where the checkpoint had it, before tensors are read (they are looked up
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


def _recut_bins(engine, meta: dict) -> None:
    """SMoES cuts one bin per EP rank (smoes.num_bins): bins saved for another number of bins are
    re-cut from the saved EMA expert x modality counts, which do not depend on the bins (the same
    on every rank: the counts are globally summed)."""
    from epruntime.smoes.router import smoes_routers

    saved = meta["config"].get("smoes", {}).get("num_bins") or meta["ep_size"]
    if saved != engine.cfg.num_bins:
        for router in smoes_routers(engine.model):
            router.rebin()


def load_checkpoint_with_stats(engine, path: Path, restore_training_state: bool = True,
                               apply_saved_placements: bool = True) -> tuple[dict, ReadStats]:
    """Collective. Load parameters and buffers (and AdamW + RNG state when
    `restore_training_state`) into this rank; returns the checkpoint's meta and what this rank
    read. `apply_saved_placements=False` keeps the model's current placement."""
    cfg, env = engine.cfg, engine.env
    path = Path(path)
    error, meta, targets, metadata = None, None, None, None
    try:  # every rank checks; a failure anywhere stops all of them before DCP's collectives
        meta = read_meta(path)
        check_format(meta, path)
        check_compatible(meta, cfg, path)
        check_files(meta, path)
        metadata = read_dcp_metadata(path)
        if apply_saved_placements:
            _apply_placements(engine, meta, resuming=restore_training_state)
        same_layout = meta["world_size"] == env.world_size and meta["ep_size"] == env.ep_size
        rng_rank = env.rank if restore_training_state and same_layout else None
        targets = load_targets(engine, metadata, path, restore_training_state, rng_rank)
    except CheckpointError as err:
        error = str(err)
    agree(error, f"to load {path}")
    reader = VerifyingReader(path, metadata)
    planner = VerifyingLoadPlanner(path, meta["integrity"]["tensors"])
    try:
        dcp.load(targets.state, storage_reader=reader, planner=planner)
    except CheckpointException as err:
        raise failure_of(err, f"to load {path}") from None
    apply_loaded(engine, targets)
    _recut_bins(engine, meta)
    stats = ReadStats(reader.bytes_read, dict(reader.bytes_by_key),
                      tuple(sorted(reader.files_read)), tuple(sorted(targets.state)))
    return meta, stats


def load_checkpoint(engine, path: Path, restore_training_state: bool = True) -> dict:
    """Collective. Load the checkpoint at `path` into this rank; returns its meta."""
    return load_checkpoint_with_stats(engine, path, restore_training_state)[0]
