"""Which expert placements a token dispatcher can route: one check for the model, live
migration and checkpoint loading.

A dispatcher that routes by placement implements `PlacementAware` (`supports(placement)` and
`set_placement(placement)`); any other MoETokenDispatcher (megatron-core's own) routes expert e
to rank e // n_local, i.e. only the contiguous placement.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from epruntime.placement import Placement
from epruntime.placement.core import not_yet_routed


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
        if placement.is_replicated:  # no dispatcher routes copies yet, megatron-core's never
            return not_yet_routed(f"layer {layer}: the placement for {type(dispatcher).__name__}")
        if not supports(dispatcher, placement):
            return (f"layer {layer}: {type(dispatcher).__name__} cannot route a non-contiguous "
                    "expert placement (megatron-core's alltoall dispatcher assumes expert e on "
                    "rank e // experts-per-rank); use dispatch.kind=dedup or dedup-hier, or "
                    "dispatch.placement=contiguous")
    return None
