"""When experts move: the re-binning and re-placement policy of a training run.

The training loop owns one `PlacementController` and calls `after_step` after every optimizer
step. Every `smoes.rebin_interval` steps the SMoES routers re-cut their bins from the EMA expert x
modality counts (identical on every rank); with `dispatch.placement=bins` the experts (weights and
optimizer state) then migrate so that bin k lives on EP rank k. `Engine.train_step` itself only
takes the step, so a benchmark or a test can step without ever moving an expert.
"""

from __future__ import annotations

from epruntime.placement.core import Placement, PlacementError
from epruntime.placement.file import check_fits, file_spec_path, load_placements
from epruntime.placement.migrate import migrate_experts
from epruntime.placement.strategies import placement_from_bins
from epruntime.smoes.bins import text_preference
from epruntime.smoes.router import smoes_routers


class PlacementController:
    def __init__(self, engine):
        self.engine = engine
        cfg = engine.cfg
        self.rebin_interval = cfg.smoes.rebin_interval if cfg.smoes.enabled else None
        self.follow_bins = cfg.smoes.enabled and cfg.dispatch.placement == "bins"

    def start(self) -> dict | None:
        """Before the first step: with dispatch.placement=file:PATH, move the experts to the
        file's placements (collective over EP). Returns the migration report, or None."""
        placements = self.engine.file_placements  # read and checked once, by the engine
        return None if placements is None else place(self.engine, placements)

    def after_step(self, step: int) -> dict | None:
        """After optimizer step `step` (0-based): re-bin when due and, with bins placement, move
        the experts there (collective over EP). Returns the migration report, or None."""
        if self.rebin_interval is None or (step + 1) % self.rebin_interval:
            return None
        for router in smoes_routers(self.engine.model):
            router.rebin()
        if not self.follow_bins:
            return None
        return place(self.engine, bin_placements(self.engine))


def bin_placements(engine) -> list[Placement]:
    """SMoES bin k on EP rank k, per layer (across nodes, bins of like modality share one)."""
    return [placement_from_bins(router.bin_of_expert, engine.env.ep_size, engine.ranks_per_node,
                                text_preference(router.counts.C))
            for router in smoes_routers(engine.model)]


def place(engine, placements: list[Placement]) -> dict | None:
    """Move experts (weights and optimizer state) to `placements`; collective over EP. Returns
    the migration report, or None when nothing changes."""
    if list(placements) == list(engine.model.placements):
        return None
    return migrate_experts(engine.model, engine.optimizer, placements,
                           timeout=engine.cfg.parallel.timeout_s).to_dict()


def file_placements(cfg, ranks_per_node: int) -> list[Placement] | None:
    """dispatch.placement=file:PATH read and checked against the config (layers, experts, EP
    size), once per run; None for any other placement spec. PlacementError names the file.
    The engine builds the model with them when they hold copies (`build_placements`: copies size
    the expert slots); `PlacementController.start` migrates to them otherwise."""
    path = file_spec_path(cfg.dispatch.placement)
    if path is None:
        return None
    placements, _ = load_placements(path, ranks_per_node)
    check_fits(placements, cfg.model.num_moe_layers, cfg.model.num_experts,
               cfg.parallel.ep_size, f"dispatch.placement=file:{path}")
    if not any(p.is_replicated for p in placements):
        if cfg.model.num_experts % cfg.parallel.ep_size:
            raise PlacementError(f"dispatch.placement=file:{path}: parallel.ep_size="
                                 f"{cfg.parallel.ep_size} does not divide model.num_experts="
                                 f"{cfg.model.num_experts} and the file holds no copies")
    elif cfg.dispatch.kind == "alltoall":
        from epruntime.model.moe_layer import MEGATRON_REFUSES_COPIES

        raise PlacementError(f"dispatch.placement=file:{path} holds copies of experts: "
                             f"dispatch.kind=alltoall {MEGATRON_REFUSES_COPIES}")
    return placements


def build_placements(placements: list[Placement] | None) -> list[Placement] | None:
    """The placements to build the model with, from `file_placements`: the file's when they hold
    copies (each MoE layer's expert slots are `Placement.num_local`), else None (contiguous;
    `PlacementController.start` migrates to the file's)."""
    if placements is None or not any(p.is_replicated for p in placements):
        return None
    return placements
