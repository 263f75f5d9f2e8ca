"""CPU-safe routers: megatron-core's `TopKRouter` (or any subclass, e.g. SMoES's) whose per-expert
buffers are made on the CPU.

megatron-core 0.16's `TopKRouter.__init__` allocates its aux-loss-free balancing buffers
(`expert_bias`, `local_tokens_per_expert`) and its global-aux-loss buffers
(`global_tokens_per_expert`, `ga_steps`) on `torch.cuda.current_device()`, which a CPU build of
torch cannot answer. On CPU (`cpu_mode()`), `cpu_safe_router(base)` builds the router from a
copy of its config with those two features off, then restores the config and registers the
same buffers (names, dtypes, persistence) on the CPU; routing, the bias update and checkpoints
see exactly megatron-core's buffers. On a CUDA host, or when neither feature is on, it is the
base class unchanged. Declared in `epruntime.compat.adapters` (`router-buffers`).
"""

from __future__ import annotations

import copy
import functools

import torch
from megatron.core.transformer.moe.router import TopKRouter

from epruntime.compat.dispatcher import cpu_mode


def _needs_cpu_buffers(config) -> bool:
    lb = config.moe_router_load_balancing_type
    global_aux = lb == "global_aux_loss" or (isinstance(lb, list) and "global_aux_loss" in lb)
    return config.moe_router_enable_expert_bias or global_aux


class _CpuRouterBuffers:
    """Mixin placed before a TopKRouter class (see `cpu_safe_router`)."""

    def __init__(self, *args, **kwargs):
        config = kwargs["config"] if "config" in kwargs else args[0]
        if not cpu_mode() or not _needs_cpu_buffers(config):
            super().__init__(*args, **kwargs)
            return
        bare = copy.copy(config)
        bare.moe_router_enable_expert_bias = False
        bare.moe_router_load_balancing_type = "none"
        if "config" in kwargs:
            kwargs["config"] = bare
        else:
            args = (bare, *args[1:])
        super().__init__(*args, **kwargs)
        # What TopKRouter.__init__ read from the config, as megatron-core would have set it.
        self.config = config
        self.routing_type = config.moe_router_load_balancing_type
        self.enable_expert_bias = config.moe_router_enable_expert_bias
        experts, device = config.num_moe_experts, self.weight.device
        buffers = []  # (name, value, persistent), as TopKRouter.__init__ registers them
        if self.enable_expert_bias:
            buffers += [("local_tokens_per_expert", torch.zeros(experts), False),
                        ("expert_bias", torch.zeros(experts), True)]
        if self.get_aux_loss_coeff("global_aux_loss") > 0:
            buffers += [("global_tokens_per_expert", torch.zeros(experts), False),
                        ("ga_steps", torch.tensor(0.0), False)]
        for name, value, persistent in buffers:
            self.__dict__.pop(name, None)  # the bare build set it to None (a plain attribute)
            self.register_buffer(name, value.to(device=device, dtype=torch.float32),
                                 persistent=persistent)


def cpu_safe_router(base):
    """A router class (or a `functools.partial` of one, its arguments kept) whose buffers are
    made on the CPU on CPU hosts. Keeps the base's name, so logs and `type(...).__name__` read
    as before; applied once (a CPU-safe class is returned as is)."""
    kwargs = {}
    if isinstance(base, functools.partial):
        base, kwargs = base.func, dict(base.keywords)
    if issubclass(base, _CpuRouterBuffers):
        cls = base
    else:
        cls = type(base.__name__, (_CpuRouterBuffers, base),
                   {"__module__": base.__module__, "__qualname__": base.__qualname__,
                    "__doc__": base.__doc__})
    return functools.partial(cls, **kwargs) if kwargs else cls


CpuTopKRouter = cpu_safe_router(TopKRouter)
