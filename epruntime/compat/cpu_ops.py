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


# ---- DistributedDataParallel and the optimizer (epruntime.optim) -----------------------------

class _CudaOnDevice:
    """`torch.cuda` as seen by one megatron-core function: `current_device()` names `device`,
    every other attribute is torch.cuda's own."""

    def __init__(self, device: str):
        self._device = device

    def current_device(self) -> str:
        return self._device

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchOnDevice:
    """`torch` as seen by one megatron-core function: only `torch.cuda.current_device()` differs
    (it names `device`); torch itself is not changed."""

    def __init__(self, device: str):
        self.cuda = _CudaOnDevice(device)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _with_torch_on(function: Callable, device: str) -> Callable:
    """A copy of `function` whose global name `torch` resolves to `_TorchOnDevice(device)`; its
    module's namespace is left as it is (the copy reads a snapshot of it)."""
    import types

    copy = types.FunctionType(function.__code__,
                              {**function.__globals__, "torch": _TorchOnDevice(device)},
                              function.__name__, function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


def grad_buffer_init(original: Callable) -> Callable:
    """`_ParamAndGradBuffer.__init__` (DistributedDataParallel's contiguous gradient buffers, one
    per group of parameters reduced together) allocates the buffers on
    `torch.cuda.current_device()`; for CPU parameters megatron-core's own __init__ runs with that
    one call naming the CPU, so the buffer layout, bucketing and padding are megatron-core's."""
    on_cpu = _with_torch_on(original, "cpu")

    @functools.wraps(original)
    def __init__(self, ddp_config, param_dtype, grad_dtype, params, *args, **kwargs):
        if any(p.is_cuda for p in params):
            return original(self, ddp_config, param_dtype, grad_dtype, params, *args, **kwargs)
        return on_cpu(self, ddp_config, param_dtype, grad_dtype, params, *args, **kwargs)

    return __init__


def fp32_optimizer_init(original: Callable) -> Callable:
    """`FP32Optimizer.__init__` keeps its (constant 1.0) loss scale in a tensor made with
    device="cuda"; for CPU parameters the same tensor is made on the CPU."""
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    @functools.wraps(original)
    def __init__(self, optimizer, config, init_state_fn):
        params = [p for g in getattr(optimizer, "param_groups", ()) for p in g["params"]]
        if any(p.is_cuda for p in params):
            return original(self, optimizer, config, init_state_fn)
        MegatronOptimizer.__init__(self, optimizer, config, init_state_fn)
        self._scale = torch.tensor([1.0], dtype=torch.float)
        self.is_stub_optimizer = optimizer is None

    return __init__


def _reduce_over(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM, one_rank: bool = False
                 ) -> None:
    """All-reduce `tensor` in place over `group`; nothing over a group of one rank (unless
    `one_rank`, as megatron-core does), where the result is the tensor itself (gloo would still
    queue the call on its worker thread and wait for it: a context switch, and a scheduling
    delay on a loaded host)."""
    if one_rank or dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def bucket_group_start_grad_sync(original: Callable) -> Callable:
    """`_ParamAndGradBucketGroup.start_grad_sync` all-reduces its buckets over the data-parallel
    group whatever its size; the expert buffer's group has one rank when EP spans the
    data-parallel ranks (EP=2 on 2 ranks), and a sum over one rank is the gradient itself. For
    CPU buckets reduced synchronously over such a group, only megatron-core's scaling runs
    (factor 1 under epruntime's summed-gradient config); everything else runs megatron-core's."""

    @functools.wraps(original)
    def start_grad_sync(self, force_all_reduce=False):
        ddp = self.ddp_config
        if (ddp.overlap_grad_reduce or ddp.use_distributed_optimizer
                or ddp.check_for_nan_in_grad or ddp.check_for_large_grads
                or dist.get_world_size(self.data_parallel_group) > 1
                or any(b.grad_data.is_cuda for b in self.buckets)):
            return original(self, force_all_reduce)
        for bucket in self.buckets:
            if bucket.gradient_scaling_factor != 1.0:
                bucket.grad_data *= bucket.gradient_scaling_factor
        self.grad_reduce_handle = None

    return start_grad_sync


def grad_norm_fp32(original: Callable, shortcut: bool = True) -> Callable:
    """`get_grad_norm_fp32` makes its overflow flag and its empty-list norm with device="cuda"
    (and megatron-core's local multi-tensor L2 norm returns a CUDA tensor); for CPU gradients the
    same fp32 computation runs on the CPU: the L2 norm of the per-tensor norms (the p-th powers
    summed for other p, the max for inf), reduced over `grad_stats_parallel_group` unless that
    group has one rank (the dense optimizer's model-parallel group without TP/PP; `shortcut`
    False: reduced over it too, as megatron-core). One host sync, as in megatron-core: the
    returned float."""

    @functools.wraps(original)
    def get_grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
        grads = [grads_for_norm] if isinstance(grads_for_norm, torch.Tensor) else list(grads_for_norm)
        if any(g.is_cuda or hasattr(g, "_local_tensor") for g in grads):
            return original(grads_for_norm, norm_type, grad_stats_parallel_group)
        norm_type = float(norm_type)
        if norm_type == math.inf:
            total = torch.tensor([max((float(g.abs().max()) for g in grads), default=0.0)],
                                 dtype=torch.float)
            _reduce_over(total, grad_stats_parallel_group, dist.ReduceOp.MAX, not shortcut)
            return total[0].item()
        if norm_type == 2.0:
            norm = (torch.norm(torch.stack([torch.norm(g.float()) for g in grads]))
                    if grads else torch.zeros((), dtype=torch.float))
            total = (norm ** 2).reshape(1)
        else:
            total = sum((torch.norm(g, norm_type) ** norm_type for g in grads),
                        torch.zeros((), dtype=torch.float)).reshape(1)
        _reduce_over(total, grad_stats_parallel_group, one_rank=not shortcut)
        return total.item() ** (1.0 / norm_type)  # host sync: megatron-core returns a float

    return get_grad_norm_fp32


def clip_grad_by_total_norm(original: Callable, shortcut: bool = True) -> Callable:
    """`clip_grad_by_total_norm_fp32` asserts every gradient is a torch.cuda.FloatTensor and makes
    its overflow flag with device="cuda"; for CPU fp32 gradients the same clip runs on the CPU:
    scaled in place by max_norm / (total_norm + 1e-6) when that is below 1 (one in-place multiply
    per tensor: the same products as megatron-core's local `copy_(g * scale)`, without the
    temporary; `shortcut` False: megatron-core's local multi-tensor scale)."""
    from megatron.core.utils import local_multi_tensor_applier, local_multi_tensor_scale

    @functools.wraps(original)
    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in params if getattr(p, attr, None) is not None]
        if use_decoupled_grad or any(g.is_cuda for g in grads):
            return original(params, max_norm, total_norm, use_decoupled_grad)
        for g in grads:
            if g.dtype != torch.float32:
                raise TypeError(f"clip_grad_by_total_norm_fp32: a {g.dtype} gradient; "
                                "megatron-core clips fp32 gradients")
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            if shortcut:
                torch._foreach_mul_(grads, clip_coeff)
            else:
                local_multi_tensor_applier(local_multi_tensor_scale, None, [grads, grads],
                                           clip_coeff)

    return clip_grad_by_total_norm_fp32


# What the CPU shortcuts above save: (adapter, the replacement megatron-core's way). A shortcut
# changes no result; profiling/benchmarks/optimizer_step.py times the megatron path without them.
def _megatron_core_sync(patched: Callable) -> Callable:
    return patched.__wrapped__  # megatron-core's own start_grad_sync (CUDA-free)


SHORTCUTS: dict[str, Callable[[Callable], Callable]] = {
    "ddp-one-rank-sync": _megatron_core_sync,
    "grad-norm": lambda patched: grad_norm_fp32(patched.__wrapped__, shortcut=False),
    "grad-norm-clip-grads": lambda patched: grad_norm_fp32(patched.__wrapped__, shortcut=False),
    "grad-clip": lambda patched: clip_grad_by_total_norm(patched.__wrapped__, shortcut=False),
    "grad-clip-clip-grads": lambda patched: clip_grad_by_total_norm(patched.__wrapped__,
                                                                    shortcut=False),
}
