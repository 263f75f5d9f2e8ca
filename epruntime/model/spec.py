"""The transformer-layer ModuleSpec of the MoE-VLM backbone.

megatron-core's local (no Transformer Engine) GPT layer spec with an MoE MLP. The router and the
token dispatcher are named here so that later stages swap them by spec (SMoES router, dedup
dispatcher) without touching megatron-core.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import LayerNormImpl, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from epruntime.compat.dispatcher import CpuAlltoAllTokenDispatcher
from epruntime.compat.router import cpu_safe_router
from epruntime.config import Config
from epruntime.model.experts import GroupedLocalExperts
from epruntime.model.moe_layer import SpecMoELayer
from epruntime.model.options import check_transformer_config


def transformer_config(cfg: Config) -> TransformerConfig:
    """megatron-core TransformerConfig for the backbone: MoE MLPs in the layers
    `model.moe_layer_freq` names, dense MLPs (ffn 4 x hidden) in the others."""
    m = cfg.model
    config = TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=4 * m.hidden_size,
        num_moe_experts=m.num_experts,
        moe_router_topk=m.moe_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        # router options (epruntime.config.ModelConfig, validated there)
        moe_router_score_function=m.moe_router_score_function,
        moe_router_pre_softmax=m.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=m.moe_router_bias_update_rate,
        moe_router_num_groups=m.moe_router_num_groups,
        moe_router_group_topk=m.moe_router_group_topk,
        moe_router_load_balancing_type=m.moe_router_load_balancing_type,
        moe_z_loss_coeff=m.moe_z_loss_coeff,
        moe_router_dtype=m.moe_router_dtype,
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=cfg.parallel.ep_size,
        init_method_std=m.init_std,
        params_dtype=torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fusions are CUDA kernels; the unfused paths are the same math.
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        moe_permute_fusion=False,
        # capacity: token dropping, shared experts, dense layers (see ModelConfig)
        moe_expert_capacity_factor=m.moe_expert_capacity_factor,
        moe_token_drop_policy=m.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=m.moe_pad_expert_input_to_capacity,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_shared_expert_overlap=m.moe_shared_expert_overlap,
        moe_layer_freq=m.moe_layer_freq,
    )
    check_transformer_config(config, cfg.dispatch.kind)
    return config


def decoder_block_spec(cfg: Config, router: type[TopKRouter] | None,
                       dispatcher: type[MoETokenDispatcher] | None,
                       runtimes: list, num_local: list[int | None] | None = None
                       ) -> TransformerBlockSubmodules:
    """One layer spec per decoder layer: megatron-core's dense local layer where
    `model.moe_layer_freq` says dense (its get_gpt_decoder_block_spec reading), else the MoE
    layer spec handing the MoE layer's `LayerRuntime` (`runtimes`, one per MoE layer, in order)
    to the dispatcher's constructor (megatron-core sets layer numbers only after building a
    layer). `num_local[i]`: physical expert slots per rank of MoE layer i when its placement
    holds copies (SpecMoELayer), None: megatron-core's num_experts / EP."""
    pattern = cfg.model.moe_layer_pattern
    if len(runtimes) != sum(pattern):
        raise ValueError(f"{len(runtimes)} layer runtimes for {sum(pattern)} MoE layers "
                         f"(model.moe_layer_freq={cfg.model.moe_layer_freq})")
    base = moe_layer_spec(cfg, router, dispatcher)
    dense = get_gpt_layer_local_spec(num_experts=None, moe_grouped_gemm=False)
    moe_runtimes = iter(runtimes)
    slots = iter(num_local or [None] * len(runtimes))
    layers = []
    for is_moe in pattern:
        if not is_moe:
            layers.append(dense)
            continue
        runtime, n_local = next(moe_runtimes), next(slots)
        mlp = base.submodules.mlp
        if dispatcher is not None:
            mlp = dataclasses.replace(mlp, params={**mlp.params, "runtime": runtime})
        if n_local is not None:
            mlp = dataclasses.replace(mlp, params={**mlp.params, "num_local_experts": n_local})
        layers.append(dataclasses.replace(
            base, submodules=dataclasses.replace(base.submodules, mlp=mlp)))
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=LayerNormImpl)


def moe_layer_spec(
    cfg: Config,
    router: type[TopKRouter] | None = None,
    dispatcher: type[MoETokenDispatcher] | None = None,
) -> ModuleSpec:
    """Layer spec with megatron-core's MoE layer; `router` replaces its TopKRouter class and
    `dispatcher` its MoEAlltoAllTokenDispatcher (None keeps megatron-core's own, CPU-safe).

    Experts are megatron-core's SequentialMLP (one MLP per local expert; its grouped-GEMM
    variants need Transformer Engine or the grouped_gemm CUDA extension), run as two grouped
    GEMMs on CPU with `model.expert_compute=grouped` (epruntime.model.experts).
    """
    spec = get_gpt_layer_local_spec(num_experts=cfg.model.num_experts, moe_grouped_gemm=False)
    moe = spec.submodules.mlp
    # megatron-core's TopKRouter or `router`, with its per-expert buffers on the CPU on CPU
    # hosts (epruntime.compat.router; the class itself on CUDA hosts).
    moe.submodules.router = cpu_safe_router(router or moe.submodules.router)
    # megatron-core's TransformerLayer hands its process groups only to the classes it knows;
    # SpecMoELayer falls back to the default groups, which is what EP x DP uses. Without a
    # dispatcher: megatron-core's alltoall one, through its CPU-safe subclass.
    moe.module = SpecMoELayer
    if cfg.model.expert_compute == "grouped":
        moe.submodules.experts = dataclasses.replace(moe.submodules.experts,
                                                     module=GroupedLocalExperts)
    moe.params = {**(moe.params or {}),
                  "dispatcher_cls": dispatcher or CpuAlltoAllTokenDispatcher}
    return spec
