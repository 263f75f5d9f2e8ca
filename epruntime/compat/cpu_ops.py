"""CPU versions of the megatron-core 0.16 functions on our path that allocate on
`torch.cuda.current_device()` or on "cuda".

Each factory takes megatron-core's original and returns a function with the same parameters that
does the same thing with the output where the input lives. Where the input is a CUDA tensor, or
a branch of the original allocates nothing on the CUDA device, the original runs unchanged, so
only the one CUDA assumption is replaced. Which function each one replaces, and why, is declared
in `epruntime.compat.adapters.ADAPTERS`; this module imports megatron-core lazily.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
import torch.distributed as dist


def router_gating(original: Callable) -> Callable:
    """`Router.gating` moves a CPU-resident weight (and bias) to `torch.cuda.current_device()`
    on every call before `router_gating_linear`; on CPU the weight stays where it is."""
    from megatron.core.transformer.moe import router as router_module

    @functools.wraps(original)
    def gating(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight.device.type != "cpu":
            return original(self, input)
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype, input.dtype)
        return router_module.router_gating_linear(input, self.weight, self.bias, router_dtype)

    return gating


def global_buffer_get_tensor(original: Callable) -> Callable:
    """`GlobalMemoryBuffer.get_tensor` (re)allocates its named buffer on
    `torch.cuda.current_device()`; on CPU the buffer is made on the CPU first, with the same size
    rule, and megatron-core's own method then returns its view."""

    @functools.wraps(original)
    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        required_len = math.prod(tensor_shape)
        buffer = self.buffer.get((name, dtype), None)
        if buffer is None or buffer.numel() < required_len:
            self.buffer[(name, dtype)] = torch.empty(
                required_len, dtype=dtype, device="cpu", requires_grad=False)
        return original(self, tensor_shape, dtype, name, mem_alloc_context)

    return get_tensor


def gather_along_first_dim(original: Callable) -> Callable:
    """`tensor_parallel.mappings._gather_along_first_dim` allocates its output on
    `torch.cuda.current_device()` (the EP all-gather of per-expert counts in the alltoall
    dispatcher); on CPU the output is allocated on the input's device."""
    from megatron.core.tensor_parallel import mappings

    @functools.wraps(original)
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if input_.is_cuda or use_global_buffer or group is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        dim_size = list(input_.size())
        if output_split_sizes is None:
            dim_size[0] = dim_size[0] * group.size()
            output = torch.empty(dim_size, dtype=input_.dtype, device=input_.device)
            mappings.dist_all_gather_func(output, input_.contiguous(), group=group)
        else:
            dim_size[0] = sum(output_split_sizes)
            output = torch.empty(dim_size, dtype=input_.dtype, device=input_.device)
            dist.all_gather(list(torch.split(output, output_split_sizes, dim=0)), input_,
                            group=group)
        return output

    return _gather_along_first_dim


def all_to_all_forward(original: Callable) -> Any:
    """`tensor_parallel.mappings._AllToAll.forward` allocates the all-to-all-v output on
    `torch.cuda.current_device()` (both the dispatch and the combine exchange, and the backward
    of each); on CPU on the input's device. Returns a staticmethod, as megatron-core declares it."""

    @functools.wraps(original)
    def forward(ctx, group, input, output_split_sizes, input_split_sizes):
        if input.is_cuda or output_split_sizes is None or group.size() == 1:
            return original(ctx, group, input, output_split_sizes, input_split_sizes)
        ctx.group = group
        ctx.output_split_sizes = output_split_sizes
        ctx.input_split_sizes = input_split_sizes
        input = input.contiguous()
        output = input.new_empty(size=[sum(output_split_sizes)] + list(input.size()[1:]))
        dist.all_to_all_single(output, input, output_split_sizes=output_split_sizes,
                               input_split_sizes=input_split_sizes, group=group)
        return output

    return staticmethod(forward)


@functools.lru_cache
def cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """True above the diagonal: the positions a query may not attend to (megatron-core builds
    the same mask with device="cuda")."""
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()
