"""What one MoE layer needs besides megatron-core's own arguments, as explicit values.

A `LayerRuntime` is built per MoE layer by the Engine *before* megatron-core builds the model and
reaches the layer's dispatcher (and router) through the ModuleSpec (`SpecMoELayer` passes it to
the dispatcher's constructor); nothing is written onto megatron-core's objects afterwards.

    LayerRuntime(layer_index, transport, kernels, observers, tokens, overlap, timeout_s)
      observers  the ledger (bytes) and the phase timer (seconds, `dispatch.timing`) that read what
                 the dispatcher sends; the ledger is swapped for evaluation with
                 `Observers.observing(ledger)`; neither changes results
      tokens     the model's per-forward token state (modality of the tokens entering the layer),
                 set by the model's layer loop: dispatchers and routers read it, nobody else writes

The placement is not here: it changes with live migration and reaches the dispatcher through
`set_placement` (see `epruntime.model.placement_support`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no torch / megatron-core import for the row plan's users
    import torch

    from epruntime.dispatch.ledger import CommLedger
    from epruntime.dispatch.timing import PhaseTimer


class Observers:
    """The read-only observers of every layer's dispatch and combine (one object per model)."""

    def __init__(self, ledger: "CommLedger | None" = None, timer: "PhaseTimer | None" = None):
        self._ledger = ledger
        self._timer = timer

    @property
    def timer(self) -> "PhaseTimer | None":
        """The PhaseTimer timing every dispatch and combine phase, or None (timing off)."""
        return self._timer

    @property
    def ledger(self) -> "CommLedger | None":
        """The CommLedger recording now, or None (ledger off)."""
        return self._ledger

    @contextlib.contextmanager
    def observing(self, ledger: "CommLedger | None", timer: Any = ...
                  ) -> Iterator["CommLedger | None"]:
        """Record into `ledger` (and time into `timer`, when given) for the enclosed block, then
        restore the previous ones."""
        previous = self._ledger, self._timer
        self._ledger = ledger
        if timer is not ...:
            self._timer = timer
        try:
            yield ledger
        finally:
            self._ledger, self._timer = previous


class TokenStream:
    """The token state of the forward pass in flight, as the layers see it: the modality of every
    token entering the current layer, [S, B] (0 text, 1 vision), in megatron-core's [S, B] order.
    The model's layer loop is its only writer (`enter`); routers and dispatchers read it."""

    def __init__(self) -> None:
        self._modality_SB: "torch.Tensor | None" = None
        self._scores_SB2: "torch.Tensor | None" = None

    @contextlib.contextmanager
    def forward(self, modality_SB: "torch.Tensor") -> Iterator[None]:
        """The enclosed block is one forward pass whose tokens start with `modality_SB`."""
        saved = self._modality_SB, self._scores_SB2
        self._modality_SB, self._scores_SB2 = modality_SB, None
        try:
            yield
        finally:
            self._modality_SB, self._scores_SB2 = saved

    def enter(self, modality_SB: "torch.Tensor", scores_SB2: "torch.Tensor | None" = None) -> None:
        """The next layer runs on these tokens (after pruning they are fewer)."""
        self._modality_SB, self._scores_SB2 = modality_SB, scores_SB2

    @property
    def modality_SB(self) -> "torch.Tensor | None":
        return self._modality_SB

    @property
    def modality_T(self) -> "torch.Tensor | None":
        """[S*B] in the order megatron-core flattens hidden [S, B, H]; None outside a forward."""
        return None if self._modality_SB is None else self._modality_SB.reshape(-1)

    @property
    def scores_SB2(self) -> "torch.Tensor | None":
        """Soft modality scores of the tokens entering the layer (SMoES), when a scorer set them."""
        return self._scores_SB2


@dataclass(frozen=True)
class LayerRuntime:
    """Per-layer runtime of one MoE layer (see the module docstring)."""

    layer_index: int = 0
    transport: Any = None  # epruntime.transport object for the EP group; None: the process group
    kernels: str | None = None  # epruntime.kernels backend; None: automatic
    observers: Observers = field(default_factory=Observers)
    tokens: TokenStream = field(default_factory=TokenStream)
    # dispatch.overlap: the dedup dispatchers run this rank's own rows through the experts while
    # the remote rows travel (epruntime.dispatch.overlap)
    overlap: bool = False
    timeout_s: float = 1800.0  # waits on asynchronous collectives (the group's, parallel.timeout_s)

    @property
    def ledger(self) -> "CommLedger | None":
        return self.observers.ledger

    @property
    def timer(self) -> "PhaseTimer | None":
        return self.observers.timer

    # What a dispatcher asks of the observers, in one place for every dispatcher.
    def recording_ledger(self) -> "CommLedger | None":
        """The ledger when it records now, else None."""
        ledger = self.observers.ledger
        return ledger if ledger is not None and ledger.enabled else None

    def timing_timer(self) -> "PhaseTimer | None":
        """The phase timer when it times now, else None."""
        timer = self.observers.timer
        return timer if timer is not None and timer.enabled else None

    def laps(self, phase: str, first: bool = False):
        """Forward laps of `phase` in this layer (epruntime.dispatch.timing); its NULL_LAPS when
        timing is off. `first`: the phase's first method (counts a call)."""
        timer = self.timing_timer()
        if timer is None:
            # imported here: the runtime is torch-free for the row plan's users
            from epruntime.dispatch.timing import NULL_LAPS
            return NULL_LAPS
        return timer.laps(self.layer_index, "forward", phase, first)

    def time_backward(self, phase: str, part: str, inp: "torch.Tensor", out: "torch.Tensor",
                      group: Any = None) -> None:
        """Time the backward of the op that made `out` from `inp` as `part` of `phase`; `group`:
        the process group whose slowest peer the part waits for (a collective)."""
        timer = self.timing_timer()
        if timer is not None:
            timer.backward_span(self.layer_index, phase, part, inp, out, group)

    def collective_timing(self, phase: str):
        """(timer, layer, phase) for an all-to-all's backward, None when timing is off."""
        timer = self.timing_timer()
        return None if timer is None else (timer, self.layer_index, phase)


def layer_runtimes(num_layers: int, transport: Any = None, kernels: str | None = None,
                   observers: Observers | None = None,
                   tokens: TokenStream | None = None, overlap: bool = False,
                   timeout_s: float = 1800.0) -> list[LayerRuntime]:
    """One runtime per MoE layer, sharing the observers and the token stream."""
    observers = observers or Observers()
    tokens = tokens or TokenStream()
    return [LayerRuntime(i, transport, kernels, observers, tokens, overlap, timeout_s)
            for i in range(num_layers)]
