"""Routers whose routing passes through hooks before anything else sees it.

MoDES's expert skipping (epruntime.modes.skip) and FastMMoE's reduced top-k and token pruning
(epruntime.fastmmoe.reducer) both change what a router decided, inside the router call, so that
the dispatcher, the ledger, the FLOPs count and the router tap see only the pairs that run.
`hooked_router(base, *hooks)` builds one subclass of `base` (megatron-core's TopKRouter, the
SMoES router, a router a user plugs in, or a `functools.partial` of one, whose arguments it
keeps) whose forward hands megatron-core's (probs, routing_map) to each hook in turn:

    probs_TE, routing_map_TE = base.forward(input)
    for hook in hooks: probs_TE, routing_map_TE = hook(call, probs_TE, routing_map_TE)

The subclass keeps the base's name, module and parameters, so checkpoints, `isinstance` checks
and logs read as before. Each hook decides for itself when it acts (both act in eval mode only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class RouterCall:
    """What a hook may need besides the routing: which layer, which router, and its input."""

    layer: int  # 0-based (megatron-core numbers layers from 1)
    router: torch.nn.Module  # the router module (its `training`, `gating`, `layer_number`)
    hidden_SBH: torch.Tensor  # the router's input [S, B, H]


class RoutingHook(Protocol):
    def __call__(self, call: RouterCall, probs_TE: torch.Tensor, routing_map_TE: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [T, E], routing map [T, E] bool) as they are to be dispatched."""
        ...


class _HookedRouter:
    """Mixin placed before a router class (see `hooked_router`)."""

    def __init__(self, *args, routing_hooks: tuple[RoutingHook, ...], **kwargs):
        super().__init__(*args, **kwargs)
        self.routing_hooks = tuple(routing_hooks)

    def forward(self, input, padding_mask=None):
        probs_TE, routing_map_TE = super().forward(input, padding_mask)
        call = RouterCall(self.layer_number - 1, self, input)
        for hook in self.routing_hooks:
            probs_TE, routing_map_TE = hook(call, probs_TE, routing_map_TE)
        return probs_TE, routing_map_TE


def hooked_router(base, *hooks: RoutingHook):
    """A router builder for the layer spec: `base` (a class or a partial of one) whose routing
    passes through `hooks`, in order."""
    kwargs = {}
    if isinstance(base, functools.partial):
        base, kwargs = base.func, dict(base.keywords)
    cls = type(base.__name__, (_HookedRouter, base),
               {"__module__": base.__module__, "__qualname__": base.__qualname__,
                "__doc__": base.__doc__})
    return functools.partial(cls, routing_hooks=hooks, **kwargs)
