"""Token dispatchers (megatron-core's and epruntime's) and the CommLedger that counts their bytes."""

from epruntime.dispatch.dedup import DedupTokenDispatcher
from epruntime.dispatch.hier import HierDedupTokenDispatcher
from epruntime.dispatch.ledger import CommLedger
from epruntime.dispatch.megatron import LedgeredAlltoAllDispatcher


def dispatcher_class(kind: str) -> type:
    """`dispatch.kind` -> MoETokenDispatcher subclass."""
    classes = {"alltoall": LedgeredAlltoAllDispatcher, "dedup": DedupTokenDispatcher,
               "dedup-hier": HierDedupTokenDispatcher}
    try:
        return classes[kind]
    except KeyError:
        raise ValueError(f"dispatch.kind={kind!r}: expected one of {sorted(classes)}") from None


__all__ = ["CommLedger", "DedupTokenDispatcher", "HierDedupTokenDispatcher",
           "LedgeredAlltoAllDispatcher", "dispatcher_class"]
