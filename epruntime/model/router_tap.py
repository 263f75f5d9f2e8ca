"""One tap on every MoE layer's router: its outputs fanned out to read-only observers.

Routing statistics, the Prometheus exporter, routing traces and co-activation recording all need
what each router decided. Instead of a forward hook each (whose order, and so what each saw,
depended on who registered first), the model registers one hook per router and calls the
observers in a fixed order (`ORDER`) with one `RouterEvent`. Observers read; the event's tensors
must not be modified. The hook is registered after the token reducer's, so observers see the
routing that was dispatched (FastMMoE's reduced top-k included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from epruntime.runtime import TokenStream

ORDER = ("stats", "exporter", "traces", "recording")


@dataclass(frozen=True)
class RouterEvent:
    layer: int  # 0-based MoE layer
    hidden_TH: torch.Tensor  # the router's input tokens [T, H] (megatron-core's [S*B] order)
    probs_TE: torch.Tensor  # routing weights [T, E] (detached)
    routing_map_TE: torch.Tensor  # [T, E] bool
    modality_T: torch.Tensor | None  # [T] (0 text, 1 vision), None when unknown


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The routers of the model's MoE layers in layer order (dense layers, which have none, left
    out: `model.moe_layer_freq`); the position in this list is the MoE layer index."""
    return [layer.mlp.router for layer in model.gpt.decoder.layers
            if getattr(layer.mlp, "router", None) is not None]


class RouterTap:
    def __init__(self, routers: list[torch.nn.Module], tokens: TokenStream):
        self.tokens = tokens
        self._observers: dict[str, Callable[[RouterEvent], None]] = {}
        for layer, router in enumerate(routers):
            router.register_forward_hook(self._hook(layer))

    def add(self, name: str, observer: Callable[[RouterEvent], None]) -> None:
        """Call `observer(event)` after every router call, in the place `name` has in ORDER."""
        if name not in ORDER:
            raise ValueError(f"router observer {name!r}: expected one of {ORDER}")
        if name in self._observers:
            raise ValueError(f"router observer {name!r} is already attached")
        self._observers[name] = observer

    def remove(self, name: str) -> None:
        self._observers.pop(name, None)

    def _hook(self, layer: int):
        def tap(router, args, output) -> None:
            if not self._observers:
                return
            hidden = args[0]
            event = RouterEvent(layer, hidden.reshape(-1, hidden.shape[-1]), output[0].detach(),
                                output[1].detach(), self.tokens.modality_T)
            for name in ORDER:
                observer = self._observers.get(name)
                if observer is not None:
                    observer(event)
        return tap
