"""Routers whose routing MoDES may thin out: a router subclass that hands every routing to the
model's `ExpertSkipper` (epruntime.modes.skip) before anything else sees it.

`skipping_router(base, skipper)` builds a subclass of `base` (megatron-core's TopKRouter, the
SMoES router, a `functools.partial` of one) the same way FastMMoE's `reducing_router` does, and
keeps the base's name and parameters, so checkpoints are unchanged. The model wraps it in the
reducing router, so the order inside one router call is: routing -> MoDES skip -> FastMMoE's
reduced top-k and pruning -> FLOPs count -> dispatcher (and the ledger). In training the routing
is returned unchanged.
"""

from __future__ import annotations

import functools


class _SkippingRouter:
    """Mixin placed before a router class (see `skipping_router`)."""

    def __init__(self, *args, skipper, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipper = skipper

    def forward(self, input, padding_mask=None):
        probs_TE, routing_map_TE = super().forward(input, padding_mask)
        if self.training or not self.skipper.active:
            return probs_TE, routing_map_TE
        # megatron-core numbers layers from 1
        return self.skipper.on_routing(self.layer_number - 1, probs_TE, routing_map_TE)


def skipping_router(base, skipper):
    """A router builder for the layer spec: `base` (a class or a partial of one) whose eval-mode
    routing passes through `skipper` (epruntime.modes.ExpertSkipper)."""
    kwargs = {}
    if isinstance(base, functools.partial):
        base, kwargs = base.func, dict(base.keywords)
    cls = type(base.__name__, (_SkippingRouter, base),
               {"__module__": base.__module__, "__qualname__": base.__qualname__,
                "__doc__": base.__doc__})
    return functools.partial(cls, skipper=skipper, **kwargs)
