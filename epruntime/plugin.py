"""epruntime's expert-parallel runtime for a user's own megatron-core model.

A user builds a model with megatron-core's own spec builders; two calls put epruntime's dispatch
(and optionally a router of the user's choice) into it:

    ps.initialize_model_parallel(expert_model_parallel_size=EP)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)   # or a layer spec
    plugged = plugin.plug(config, spec, dispatcher="dedup", ledger=True)      # 1. the spec
    model = GPTModel(config, plugged.spec, vocab_size=V, max_sequence_length=S)
    ep = plugin.attach(model, plugged)                                        # 2. the model
    ... train; ep.ledger.summary(group), ep.set_placements([...]), ep.router_tap.add(...)

1. `plug` rewrites every MoE layer spec of a layer spec (`get_gpt_layer_local_spec`,
   `get_gpt_layer_with_transformer_engine_spec`) or a block spec (`get_gpt_decoder_block_spec`,
   dense layers of `moe_layer_freq` included) so that megatron-core builds each MoE layer as
   `SpecMoELayer` with epruntime's dispatcher class and that layer's `LayerRuntime` (layer index,
   transport, kernels backend, ledger and phase timer) as constructor arguments. The spec given is
   not modified; a new one is returned. The router class is swapped only when one is given.
   Experts, attention and norms are whatever the user's spec says (Transformer Engine modules on
   GPU, local ones on CPU), so the model's parameters and their names do not change.
2. `attach` binds the built model: it finds the MoE layers in order, checks they are the ones the
   runtimes were made for, gives each dispatcher its placement (`set_placement`, the dispatcher's
   own method; nothing is written onto megatron-core's objects) and taps the routers once for
   read-only observers (routing statistics, metrics, traces). It returns an `EPModel`, the view
   the loops use.

Transformer Engine: this module never imports it. Its layer specs come from megatron-core's
`get_gpt_layer_with_transformer_engine_spec`, which needs TE installed (GPU hosts); `layer_spec`
below picks it when TE imports and megatron-core's local spec otherwise (CPU hosts, where TE is
absent). On CPU call `epruntime.compat.enable()` first (see `cpu_ready`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import LayerNormImpl, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from epruntime.dispatch import CommLedger, dispatcher_class
from epruntime.dispatch.timing import PhaseTimer, clock_for
from epruntime.model.moe_layer import SpecMoELayer
from epruntime.model.placement_support import PlacementAware, unsupported_reason
from epruntime.model.router_tap import RouterTap
from epruntime.placement import Placement, PlacementError
from epruntime.runtime import LayerRuntime, Observers, layer_runtimes

DISPATCHERS = ("alltoall", "dedup", "dedup-hier")


class PluginError(ValueError):
    """A spec, config or model the plug-in cannot use; the message names what and why."""


def transformer_engine_available() -> bool:
    """Whether Transformer Engine is importable (checked without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def layer_spec(config: TransformerConfig, transformer_engine: bool | None = None) -> ModuleSpec:
    """megatron-core's GPT layer spec for `config`'s MoE: the Transformer Engine one where TE is
    installed (or `transformer_engine=True`), the local one otherwise. Imported lazily: TE is
    absent on CPU hosts, and asking for it there is a PluginError, not an ImportError."""
    from megatron.core.models.gpt import gpt_layer_specs

    te = transformer_engine_available() if transformer_engine is None else transformer_engine
    if te and not transformer_engine_available():
        raise PluginError("transformer_engine=True: Transformer Engine is not installed on this "
                          "host (CPU hosts never have it); use the local spec")
    build = (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec if te
             else gpt_layer_specs.get_gpt_layer_local_spec)
    # SequentialMLP experts on CPU: grouped GEMM needs TE or the grouped_gemm CUDA extension.
    return build(num_experts=config.num_moe_experts,
                 moe_grouped_gemm=bool(te and config.moe_grouped_gemm))


def cpu_ready(stock_dispatcher: bool = False) -> bool:
    """Adapt megatron-core to CPU + gloo where there is no CUDA (`epruntime.compat.enable`);
    True when the adaptation is active. `stock_dispatcher` also adapts megatron-core's own
    alltoall dispatcher, for models built from unmodified stock specs."""
    from epruntime import compat

    return compat.enable(stock_dispatcher=stock_dispatcher)


@dataclass(frozen=True)
class Plugged:
    """What `plug` returns: the spec to build the model from, and what `attach` needs."""

    spec: TransformerBlockSubmodules  # one layer spec per decoder layer
    runtimes: tuple[LayerRuntime, ...]  # one per MoE layer, in layer order
    moe_layer_numbers: tuple[int, ...]  # 1-based decoder layer numbers of the MoE layers
    observers: Observers  # the ledger and timer every runtime reports to
    ledger: CommLedger | None
    timer: PhaseTimer | None
    dispatcher: type
    ep_size: int
    ranks_per_node: int


def _is_moe(spec: Any) -> bool:
    mlp = getattr(getattr(spec, "submodules", None), "mlp", None)
    return isinstance(mlp, ModuleSpec) and isinstance(mlp.module, type) and issubclass(
        mlp.module, MoELayer)


def _block(config: TransformerConfig, spec: ModuleSpec | TransformerBlockSubmodules
           ) -> TransformerBlockSubmodules:
    """A block spec: given as is, or a layer spec repeated for every layer as megatron-core's
    TransformerBlock would (one copy per layer, so each can carry its own runtime)."""
    if isinstance(spec, TransformerBlockSubmodules):
        if len(spec.layer_specs) != config.num_layers:
            raise PluginError(f"the block spec has {len(spec.layer_specs)} layer specs, "
                              f"config.num_layers={config.num_layers} (pipeline stages are not "
                              "supported by the plug-in)")
        return spec
    if isinstance(spec, ModuleSpec):
        return TransformerBlockSubmodules(layer_specs=[spec] * config.num_layers,
                                          layer_norm=LayerNormImpl)
    raise PluginError(f"spec is a {type(spec).__name__}; expected a megatron-core layer "
                      "ModuleSpec or TransformerBlockSubmodules")


def _with_moe(layer: ModuleSpec, router: type | None, dispatcher: type,
              runtime: LayerRuntime) -> ModuleSpec:
    """`layer` with its MoE MLP built as SpecMoELayer(dispatcher, runtime) (copies; the user's
    spec objects are left as they were)."""
    mlp = layer.submodules.mlp
    submodules = mlp.submodules
    if router is not None:
        submodules = dataclasses.replace(submodules, router=router)
    mlp = dataclasses.replace(mlp, module=SpecMoELayer, submodules=submodules,
                              params={**(mlp.params or {}), "dispatcher_cls": dispatcher,
                                      "runtime": runtime})
    return dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, mlp=mlp))


def check_config(config: TransformerConfig, dispatcher: type) -> None:
    """What epruntime's dispatchers cannot run, as a named error before any model is built."""
    if not config.num_moe_experts:
        raise PluginError("config.num_moe_experts is not set: the model has no MoE layer")
    if config.moe_token_dispatcher_type != "alltoall":
        # SpecMoELayer lets megatron-core build its own dispatcher first (then replaces it); the
        # alltoall one is the one with a CPU-safe construction.
        raise PluginError(f"config.moe_token_dispatcher_type={config.moe_token_dispatcher_type!r}:"
                          " the plug-in selects the dispatcher by spec; set it to 'alltoall'")
    if config.expert_tensor_parallel_size not in (None, 1) and dispatcher is not dispatcher_class(
            "alltoall"):
        raise PluginError(f"config.expert_tensor_parallel_size="
                          f"{config.expert_tensor_parallel_size}: epruntime's dedup dispatchers "
                          "need expert tensor parallelism 1 (use dispatcher='alltoall')")


def plug(config: TransformerConfig, spec: ModuleSpec | TransformerBlockSubmodules, *,
         dispatcher: str | type = "dedup", router: type[TopKRouter] | None = None,
         transport: Any = None, kernels: str | None = None, ledger: bool | CommLedger = True,
         timing: bool = False, ranks_per_node: int | None = None) -> Plugged:
    """`spec` with epruntime's dispatcher (and `router`, when given) in every MoE layer.

    Call after `parallel_state.initialize_model_parallel` (the ledger and the transport need the
    EP group). `dispatcher`: "dedup" (one row per token and rank), "dedup-hier" (one per token and
    node, then per rank inside it), "alltoall" (megatron-core's own, counted by the ledger), or a
    MoETokenDispatcher subclass. `transport`: None (the EP process group) or an
    `epruntime.transport` object for it. `ledger`: True for a new CommLedger, a ledger, or False.
    `ranks_per_node`: EP ranks per node (default: all of them on one node).
    """
    if not ps.model_parallel_is_initialized():
        raise PluginError("plug() needs megatron-core's process groups: call "
                          "parallel_state.initialize_model_parallel(expert_model_parallel_size="
                          "...) first")
    try:
        cls = dispatcher_class(dispatcher) if isinstance(dispatcher, str) else dispatcher
    except ValueError as err:
        raise PluginError(str(err).replace("dispatch.kind=", "dispatcher=")) from None
    check_config(config, cls)
    block = _block(config, spec)
    moe_numbers = tuple(i + 1 for i, layer in enumerate(block.layer_specs) if _is_moe(layer))
    if not moe_numbers:
        raise PluginError("the spec has no MoE layer (no layer's mlp is a megatron-core "
                          "MoELayer); build it with num_experts set")
    ep_size = ps.get_expert_model_parallel_world_size()
    ep_rank = ps.get_expert_model_parallel_rank()
    if config.num_moe_experts % ep_size:
        raise PluginError(f"config.num_moe_experts={config.num_moe_experts} is not divisible by "
                          f"the expert-parallel size {ep_size}")
    per_node = ranks_per_node or ep_size
    if ep_size % per_node:
        raise PluginError(f"ranks_per_node={per_node} does not divide the EP size {ep_size}")
    if ledger is True:
        ledger = CommLedger(len(moe_numbers), ep_size, ep_rank, per_node)
    ledger = ledger or None
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    timer = PhaseTimer(len(moe_numbers), clock_for(device), device=device) if timing else None
    observers = Observers(ledger, timer)
    runtimes = layer_runtimes(len(moe_numbers), transport, kernels, observers)
    layers, moe_index = [], 0
    for layer in block.layer_specs:
        if _is_moe(layer):
            layer = _with_moe(layer, router, cls, runtimes[moe_index])
            moe_index += 1
        layers.append(layer)
    new_block = dataclasses.replace(block, layer_specs=layers)
    return Plugged(new_block, tuple(runtimes), moe_numbers, observers, ledger, timer, cls,
                   ep_size, per_node)


class EPModel:
    """A built model seen by epruntime: its MoE layers, their placements, ledger and taps."""

    def __init__(self, model: torch.nn.Module, plugged: Plugged, moe_layers: list[MoELayer]):
        self.model, self.plugged = model, plugged
        self.moe_layers = moe_layers
        config = moe_layers[0].config
        self.placements = [Placement.contiguous(config.num_moe_experts, plugged.ep_size,
                                                plugged.ranks_per_node)] * len(moe_layers)
        # One forward hook per router: statistics, metrics and traces read what it decided.
        self.router_tap = RouterTap([moe.router for moe in moe_layers],
                                    plugged.runtimes[0].tokens)

    @property
    def ledger(self) -> CommLedger | None:
        return self.plugged.observers.ledger

    @property
    def timer(self) -> PhaseTimer | None:
        return self.plugged.observers.timer

    @property
    def dispatchers(self) -> list:
        return [moe.token_dispatcher for moe in self.moe_layers]

    def set_placements(self, placements: list[Placement]) -> None:
        """Where each MoE layer's logical experts live, told to the dispatchers that route by it.
        Does not move weights (`epruntime.placement.migrate` does); PlacementError when a
        dispatcher cannot route it."""
        if len(placements) != len(self.moe_layers):
            raise PlacementError(f"{len(placements)} placements for {len(self.moe_layers)} "
                                 "MoE layers")
        reason = unsupported_reason(self.dispatchers, placements)
        if reason is not None:
            raise PlacementError(reason)
        for dispatcher, placement in zip(self.dispatchers, placements):
            if isinstance(dispatcher, PlacementAware):
                dispatcher.set_placement(placement)
        self.placements = list(placements)

    def observing(self, ledger: CommLedger | None, timer: Any = ...):
        """Record into another ledger (evaluation) for the enclosed block; results never change."""
        return self.plugged.observers.observing(ledger, timer)

    def metrics(self, host: str = "127.0.0.1", port: int = 9400, serve: bool = True):
        """epruntime's Prometheus exporter (`epruntime.metrics.MetricsExporter`, the catalog the
        Grafana dashboard reads) for this rank of the plugged model: bytes and rows per layer and
        rank pair from the ledger, phase seconds from the timer, expert load from the router tap.
        The training loop calls `on_step(step, epruntime.engine.StepResult(...), seconds)` after
        each step (collective: it all-reduces the EP balance); `close()` at the end."""
        from epruntime.metrics.exporter import MetricsExporter

        if self.ledger is None:
            raise PluginError("metrics need the ledger: plug(..., ledger=True)")
        return MetricsExporter(_ExporterSource.of(self), host, port, serve=serve)


@dataclass(frozen=True)
class _ExporterSource:
    """What MetricsExporter reads of epruntime's Engine, for a plugged model (explicit values;
    MoE layers only: `num_layers` counts the ledger's layers)."""

    cfg: Any
    env: Any
    ledger: CommLedger
    timer: PhaseTimer | None
    model: EPModel

    @classmethod
    def of(cls, ep: EPModel) -> "_ExporterSource":
        from types import SimpleNamespace

        import torch.distributed as dist

        config = ep.moe_layers[0].config
        cfg = SimpleNamespace(
            model=SimpleNamespace(num_layers=len(ep.moe_layers),
                                  num_moe_layers=len(ep.moe_layers),
                                  num_experts=config.num_moe_experts),
            smoes=SimpleNamespace(enabled=False), num_bins=ep.plugged.ep_size,
            dispatch=SimpleNamespace(ledger=True))
        rank = dist.get_rank() if dist.is_initialized() else 0
        env = SimpleNamespace(rank=rank, local_rank=rank % ep.plugged.ranks_per_node)
        return cls(cfg, env, ep.ledger, ep.timer, ep)


def attach(model: torch.nn.Module, plugged: Plugged,
           placements: list[Placement] | None = None) -> EPModel:
    """Bind a model built from `plugged.spec`: its MoE layers in order, each holding the runtime
    it was built with, and their placements (default contiguous). Raises PluginError when the
    model was not built from this spec."""
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if len(moe_layers) != len(plugged.runtimes):
        raise PluginError(f"the model has {len(moe_layers)} MoE layers, the plugged spec "
                          f"{len(plugged.runtimes)}: build the model from plugged.spec")
    for index, (moe, runtime) in enumerate(zip(moe_layers, plugged.runtimes)):
        dispatcher = moe.token_dispatcher
        if not isinstance(dispatcher, plugged.dispatcher) or (
                getattr(dispatcher, "runtime", runtime) is not runtime):
            raise PluginError(f"MoE layer {index} (decoder layer {moe.layer_number}) has a "
                              f"{type(dispatcher).__name__} that was not built from this "
                              "plugged spec: build the model from plugged.spec")
    ep = EPModel(model, plugged, moe_layers)
    if placements is not None:
        ep.set_placements(placements)
    return ep
