"""Which expert placements a token dispatcher can route: one check for the model, live
migration and checkpoint loading.

A dispatcher that routes by placement implements `PlacementAware` (`supports(placement)` and
`set_placement(placement)`); any other MoETokenDispatcher (megatron-core's own) routes expert e
to rank e // n_local, i.e. only the contiguous placement. Replicated placements (copies of hot
experts) need a dispatcher with `routes_copies` (the dedup family) built with as many expert
slots per rank as the placement has.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from epruntime.placement import Placement
from epruntime.model.moe_layer import MEGATRON_REFUSES_COPIES


@runtime_checkable
class PlacementAware(Protocol):
    def supports(self, placement: Placement) -> bool: ...

    def set_placement(self, placement: Placement) -> None: ...


def supports(dispatcher, placement: Placement) -> bool:
    """Whether `dispatcher` routes tokens correctly under `placement`."""
    if isinstance(dispatcher, PlacementAware):
        return dispatcher.supports(placement)
    return placement.is_contiguous


def unsupported_reason(dispatchers, placements) -> str | None:
    """Why these per-layer placements cannot be routed by these dispatchers (None if they can)."""
    for layer, (dispatcher, placement) in enumerate(zip(dispatchers, placements)):
        name = type(dispatcher).__name__
        if placement.is_replicated and not getattr(dispatcher, "routes_copies", False):
            return (f"layer {layer}: the placement holds copies of experts ({placement.num_redundant}"
                    f" redundant slots); {name} {MEGATRON_REFUSES_COPIES}")
        slots = getattr(dispatcher, "num_local_experts", placement.num_local)
        if getattr(dispatcher, "routes_copies", False) and placement.num_local != slots:
            return (f"layer {layer}: the placement has {placement.num_local} expert slots per "
                    f"rank, the model was built with {slots}; copies move "
                    "between a layer's slots, the number of slots is fixed when the model is "
                    "built (build it with this placement: dispatch.placement=file:PATH)")
        if not supports(dispatcher, placement):
            return (f"layer {layer}: {type(dispatcher).__name__} cannot route a non-contiguous "
                    "expert placement (megatron-core's alltoall dispatcher assumes expert e on "
                    "rank e // experts-per-rank); use dispatch.kind=dedup or dedup-hier, or "
                    "dispatch.placement=contiguous")
    return None
