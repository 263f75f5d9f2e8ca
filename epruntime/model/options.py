"""Which of megatron-core's MoE options can run here: checked before any process group exists.

`ModelConfig` validates the options themselves (pydantic, no megatron-core import). What depends
on the installed megatron-core, on the backend (CUDA or CPU/gloo) or on epruntime's dispatchers is
checked here, so that a job that cannot run stops with a `ConfigError` naming the option instead
of failing (or hanging) inside a collective:

    check_megatron_options(cfg, backend)       # epruntime.distributed.init_distributed
    check_transformer_config(config, kind)     # a megatron-core TransformerConfig under kind
"""

from __future__ import annotations

import dataclasses

from epruntime.config import Config, ConfigError, ModelConfig

# ModelConfig fields passed to megatron-core's TransformerConfig under the same name
# (epruntime.model.spec.transformer_config), by the capacity block.
CAPACITY_OPTIONS = ("moe_expert_capacity_factor", "moe_token_drop_policy",
                    "moe_pad_expert_input_to_capacity", "moe_shared_expert_intermediate_size",
                    "moe_shared_expert_overlap", "moe_layer_freq")
DEDUP_KINDS = ("dedup", "dedup-hier")


def installed_transformer_options() -> set[str]:
    """Field names of the installed megatron-core's TransformerConfig."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return {f.name for f in dataclasses.fields(TransformerConfig)}


def missing_options(model: ModelConfig, names=CAPACITY_OPTIONS,
                    installed: set[str] | None = None) -> list[str]:
    """The options among `names` set away from their default that the installed megatron-core's
    TransformerConfig does not have (a default is what megatron-core does without the field)."""
    installed = installed_transformer_options() if installed is None else installed
    return [name for name in names if name not in installed
            and getattr(model, name) != ModelConfig.model_fields[name].default]


def check_megatron_options(cfg: Config, backend: str,
                           installed: set[str] | None = None) -> None:
    """ConfigError unless the model options of `cfg` run with this megatron-core on `backend`
    ("gloo": CPU, "nccl": CUDA)."""
    missing = missing_options(cfg.model, installed=installed)
    if missing:
        import megatron.core

        raise ConfigError(", ".join(f"model.{n}" for n in missing) + " not supported by the "
                          f"installed megatron-core {megatron.core.__version__} (its "
                          "TransformerConfig has no such field); leave it at its default or "
                          "upgrade megatron-core")
    if (cfg.model.moe_shared_expert_overlap and backend != "nccl"
            and cfg.dispatch.kind not in DEDUP_KINDS):
        raise ConfigError("model.moe_shared_expert_overlap=true with dispatch.kind=alltoall runs "
                          "the shared experts on a CUDA side stream (megatron-core): not on "
                          f"backend {backend} (CPU); use dispatch.kind=dedup or dedup-hier (they "
                          "run them during their asynchronous all-to-all) or set it false")


def check_transformer_config(config, dispatch_kind: str) -> None:
    """ConfigError unless a megatron-core TransformerConfig can run under `dispatch_kind`
    (alltoall, dedup, dedup-hier)."""
    etp = getattr(config, "expert_tensor_parallel_size", None) or 1
    if dispatch_kind in DEDUP_KINDS and etp > 1:
        raise ConfigError(f"expert_tensor_parallel_size={etp}: dispatch.kind={dispatch_kind} "
                          "sends whole hidden rows to whole experts (no expert tensor "
                          "parallelism); use dispatch.kind=alltoall or "
                          "expert_tensor_parallel_size=1")
