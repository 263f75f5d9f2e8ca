"""Expert placement: where logical experts live, how to choose it, how to move experts."""

from epruntime.placement.core import Placement, PlacementError

__all__ = ["Placement", "PlacementError"]
