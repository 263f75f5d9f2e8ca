"""megatron-core's MoELayer with the token dispatcher chosen by ModuleSpec.

megatron-core 0.16 picks the dispatcher class from `config.moe_token_dispatcher_type` inside
`MoELayer.__init__`. This subclass takes a `dispatcher_cls` spec parameter instead, so a
dispatcher (epruntime's dedup dispatcher, a ledger-wrapped megatron one) is swapped the same way
as the router: by spec, with megatron-core unchanged. With a `runtime` (the layer's
`epruntime.runtime.LayerRuntime`, one spec per layer) the dispatcher is constructed with it: layer
index, transport, kernels, observers and the token stream arrive at construction, never by
attribute writes afterwards.

Overlap with epruntime's dedup dispatchers (epruntime.dispatch.overlap): they take the layer's
shared experts (`moe_shared_expert_overlap`: run during the dispatch all-to-all) and, with
`dispatch.overlap` (`runtime.overlap`), its experts (run on this rank's own rows while the remote
rows travel) as constructor arguments; megatron-core's own dispatchers get the shared experts
through their `set_shared_experts` as in MoELayer.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging

from megatron.core import utils

from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAlltoAllTokenDispatcher,
    MoETokenDispatcher,
)

from epruntime.compat.dispatcher import no_dtoh_stream, no_shared_expert_stream
from epruntime.dispatch.overlap import HopInFlight
from epruntime.placement.core import ReplicatedPlacementError

# megatron-core's own token dispatchers send every (token, expert) pair to expert e's one rank.
MEGATRON_REFUSES_COPIES = (
    "cannot route copies of an expert (megatron-core's token dispatchers send every (token, "
    "expert) pair to rank e // experts-per-rank, one copy per expert); replicated placements "
    "need dispatch.kind=dedup or dedup-hier")


def _routes_copies(dispatcher_cls) -> bool:
    """Whether the dispatcher class routes replicated placements (epruntime's dedup family)."""
    return bool(getattr(dispatcher_cls, "routes_copies", False))


class SpecMoELayer(MoELayer):
    """`num_local_experts` (spec parameter): physical expert slots per EP rank when the layer's
    placement holds copies of hot experts (`Placement.num_local`); None: megatron-core's
    num_moe_experts / EP. With copies the layer is built on a config whose `num_moe_experts` is
    the number of physical slots (megatron-core sizes its experts by it and asserts that EP
    divides it; EP may then exceed the logical experts), and the router is rebuilt on the
    logical config: it scores the E logical experts, the dispatcher sends each pair to a copy."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 dispatcher_cls: type[MoETokenDispatcher] | None = None,
                 runtime=None, num_local_experts: int | None = None):
        pg_collection = pg_collection or get_default_pg_collection()
        logical = config
        if num_local_experts is not None:
            physical = num_local_experts * utils.get_pg_size(pg_collection.ep)
            if physical != config.num_moe_experts:
                if dispatcher_cls is None or not _routes_copies(dispatcher_cls):
                    raise ReplicatedPlacementError(
                        f"{num_local_experts} expert slots per rank hold copies of "
                        f"{config.num_moe_experts} experts: "
                        f"{getattr(dispatcher_cls, '__name__', 'the dispatcher')} "
                        f"{MEGATRON_REFUSES_COPIES}")
                config = dataclasses.replace(config, num_moe_experts=physical)
        # MoELayer always builds megatron-core's own alltoall dispatcher first (replaced below);
        # on CPU it must not create its CUDA side stream.
        with no_dtoh_stream(), no_shared_expert_stream():
            super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                             pg_collection=pg_collection)
        if logical is not config:  # the router scores logical experts
            self.router = submodules.router(config=logical, pg_collection=pg_collection)
        if dispatcher_cls is not None:
            # megatron-core's own dispatcher classes (and subclasses of them a user plugs in)
            # take no runtime: they count nothing and route contiguously.
            takes = inspect.signature(dispatcher_cls).parameters
            extra = {"runtime": runtime} if runtime is not None and "runtime" in takes else {}
            if getattr(runtime, "overlap", False) and "experts" in takes:
                extra["experts"] = self.experts
            runs_shared = self.shared_expert_overlap and "shared_experts" in takes
            if runs_shared:
                extra["shared_experts"] = self.shared_experts
            self.token_dispatcher = dispatcher_cls(
                self.num_local_experts, self.local_expert_indices, config=self.config,
                pg_collection=pg_collection, **extra,
            )
            if self.shared_expert_overlap and not runs_shared:
                # MoELayer handed the shared experts to the dispatcher it built: the one that
                # replaces it runs them during its all-to-all instead (megatron-core's alltoall
                # dispatcher and subclasses of it; Config refuses the option for the others).
                if not isinstance(self.token_dispatcher, MoEAlltoAllTokenDispatcher):
                    raise ValueError(f"model.moe_shared_expert_overlap=true: "
                                     f"{dispatcher_cls.__name__} cannot run the shared experts")
                self.token_dispatcher.set_shared_experts(self.shared_experts)

    def routed_experts_compute(self, hidden_states, probs):
        """With dispatch.overlap the dedup dispatcher's token_dispatch returns its started last hop
        (a HopInFlight): the dispatcher runs the experts on its own rows first, then the remote
        ones; otherwise megatron-core's fan-out -> experts -> combine_preprocess."""
        if isinstance(hidden_states, HopInFlight):
            return self.token_dispatcher.experts_local_first(hidden_states), None
        return super().routed_experts_compute(hidden_states, probs)


class _KnownMoELayer(logging.Filter):
    """TransformerLayer warns "Unknown MLP type" for any MLP class it does not list and builds it
    with default kwargs, which is what SpecMoELayer expects: drop that one warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_KnownMoELayer())
