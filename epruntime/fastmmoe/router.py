"""Routers whose output FastMMoE's token reducer may shrink: the reduced top-k for visual tokens
(and, at a pruning layer, the tokens that leave skipping its experts) as a router subclass, the
way SMoES is one.

`reducing_router(base, reducer)` builds a subclass of `base` (megatron-core's TopKRouter, the
SMoES router, or a router a user plugs in; a `functools.partial` of one keeps its arguments)
that hands every routing to `TokenReducer.on_routing`. The subclass keeps the base's name and
parameters, so checkpoints, `isinstance` checks and logs read as before. In training, or with
FastMMoE off, `on_routing` returns the routing unchanged.
"""

from __future__ import annotations

import functools


class _ReducingRouter:
    """Mixin placed before a router class (see `reducing_router`)."""

    def __init__(self, *args, reducer, **kwargs):
        super().__init__(*args, **kwargs)
        self.reducer = reducer

    def forward(self, input, padding_mask=None):
        probs_TE, routing_map_TE = super().forward(input, padding_mask)
        # megatron-core numbers layers from 1
        return self.reducer.on_routing(self.layer_number - 1, self, input, probs_TE,
                                       routing_map_TE)


def reducing_router(base, reducer):
    """A router builder for the layer spec: `base` (a class or a partial of one) whose routing
    passes through `reducer` (epruntime.fastmmoe.TokenReducer)."""
    kwargs = {}
    if isinstance(base, functools.partial):
        base, kwargs = base.func, dict(base.keywords)
    cls = type(base.__name__, (_ReducingRouter, base),
               {"__module__": base.__module__, "__qualname__": base.__qualname__,
                "__doc__": base.__doc__})
    return functools.partial(cls, reducer=reducer, **kwargs)
