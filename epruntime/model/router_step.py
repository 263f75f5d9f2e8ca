"""The routers' per-step state, kept the way megatron-core's training loop keeps it.

megatron-core 0.16 does two things to the routers in `finalize_model_grads`, after the backward
pass of a global batch and before the optimizer step:
- aux-loss-free balancing (`moe_router_enable_expert_bias`, DeepSeek-V3, arXiv 2408.15664): the
  tokens each expert received on this rank (`local_tokens_per_expert`, counted by the router
  in every forward with gradients on) are summed over the tensor x data (x context) parallel
  group, i.e. over every rank here, and each expert's `expert_bias` moves by
  `moe_router_bias_update_rate` towards balance (`get_updated_expert_bias`): every rank adds the
  same sign to the same bias, so the biases stay identical on every rank;
- the temporary counters (those tokens, the global aux loss's running counts) are zeroed
  (`reset_model_temporary_tensors`).

The default gradient path (`epruntime.optim.MegatronGradients`) runs megatron-core's
`finalize_model_grads` itself, which does both; the hand-written path kept for comparison
(`train.optimizer=epruntime`) calls `finish_router_step` at the same point, with megatron-core's
own functions. Either way the bias moves after every backward pass, skipped step or not, as in
megatron-core.
`expert_bias` is a persistent buffer, so checkpoints carry it (`MoEVLM.global_named_buffers`).
"""

from __future__ import annotations

import torch
from megatron.core.distributed.finalize_model_grads import reset_model_temporary_tensors
from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias
from megatron.core.transformer.transformer_config import TransformerConfig


def biased_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The routers of `model` that keep an expert bias, in module order."""
    return [m for m in model.modules() if getattr(m, "expert_bias", None) is not None]


@torch.no_grad()
def update_expert_biases(model: torch.nn.Module, config: TransformerConfig) -> None:
    """Move every router's expert bias by the global batch's tokens per expert (collective over
    all ranks: megatron-core's all-reduce over the tensor x data parallel group; no host sync)."""
    routers = biased_routers(model)
    if not routers:
        return
    tokens_LE = torch.stack([r.local_tokens_per_expert for r in routers])
    bias_LE = torch.stack([r.expert_bias for r in routers])
    new_LE = get_updated_expert_bias(tokens_LE, bias_LE, config.moe_router_bias_update_rate)
    for router, bias_E in zip(routers, new_LE):
        router.expert_bias.copy_(bias_E)


def finish_router_step(model: torch.nn.Module, config: TransformerConfig, *,
                       stepped: bool) -> None:
    """After the backward pass of a global batch: update the expert biases when the optimizer
    steps (`stepped`; a skipped non-finite step updates nothing), then zero the routers'
    per-step counters either way."""
    if stepped and config.moe_router_enable_expert_bias:
        update_expert_biases(model, config)
    reset_model_temporary_tensors(config, [model])
