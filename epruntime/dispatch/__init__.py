"""Token dispatchers (megatron-core's and epruntime's), the row plan they move bytes by, and the
CommLedger that counts their bytes.

The dispatcher classes import megatron-core; the row plan (`epruntime.dispatch.plan`) and the
ledger do not. Names are resolved lazily, so `import epruntime.dispatch.plan` (the simulator,
placement evaluation) never pays for megatron-core. Every dispatcher here has `supports(placement)`
and `set_placement(placement)` (`epruntime.model.placement_support.PlacementAware`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from epruntime.dispatch.dedup import DedupTokenDispatcher
    from epruntime.dispatch.hier import HierDedupTokenDispatcher
    from epruntime.dispatch.ledger import CommLedger
    from epruntime.dispatch.megatron import LedgeredAlltoAllDispatcher

_LAZY = {"CommLedger": "epruntime.dispatch.ledger",
         "DedupTokenDispatcher": "epruntime.dispatch.dedup",
         "HierDedupTokenDispatcher": "epruntime.dispatch.hier",
         "LedgeredAlltoAllDispatcher": "epruntime.dispatch.megatron"}
_KINDS = {"alltoall": "LedgeredAlltoAllDispatcher", "dedup": "DedupTokenDispatcher",
          "dedup-hier": "HierDedupTokenDispatcher"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dispatcher_class(kind: str) -> type:
    """`dispatch.kind` -> MoETokenDispatcher subclass."""
    try:
        return __getattr__(_KINDS[kind])
    except KeyError:
        raise ValueError(f"dispatch.kind={kind!r}: expected one of {sorted(_KINDS)}") from None


__all__ = ["CommLedger", "DedupTokenDispatcher", "HierDedupTokenDispatcher",
           "LedgeredAlltoAllDispatcher", "dispatcher_class"]
