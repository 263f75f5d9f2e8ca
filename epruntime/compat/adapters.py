"""Every adaptation of megatron-core to CPU + gloo, declared as data.

Each `Adapter` names one target in megatron-core (`module:attribute`), the CUDA assumption it
replaces, what it does on CPU instead, the megatron-core versions it was written for, and how
it is applied: `patch` (enable() sets the attribute, disable() restores or removes it) or
`subclass` (a CPU-safe subclass selected by spec overrides it; megatron-core stays untouched).
`enable()` checks every declaration against the installed megatron-core before applying any,
so a renamed or re-signatured target is a MegatronVersionError naming the adapter, not a
failure deep in a forward pass. `torch` itself is never patched.

The listing below is `render_table()` (`python -m epruntime.compat [--markdown]`);
tests/test_compat.py checks that it matches ADAPTERS.

router-gating
    megatron.core.transformer.moe.router:Router.gating
    patch; megatron-core 0.16.x; callable(self, input)
    assumes: moves the CPU-resident router weight and bias to torch.cuda.current_device() on
             every call
    on CPU:  the same router_gating_linear with the weight and bias where they are
router-buffers
    megatron.core.transformer.moe.router:TopKRouter.__init__
    subclass epruntime.compat.router:CpuTopKRouter; megatron-core 0.16.x; callable(self, config,
    pg_collection)
    assumes: allocates the expert-bias (aux-loss-free balancing) and global-aux-loss buffers on
             torch.cuda.current_device()
    on CPU:  the router is built without them and the same buffers (names, dtypes, persistence)
             are registered on the CPU
global-buffer
    megatron.core.utils:GlobalMemoryBuffer.get_tensor
    patch; megatron-core 0.16.x; callable(self, tensor_shape, dtype, name, mem_alloc_context)
    assumes: allocates the shared buffer (DotProductAttention's matmul input) on
             torch.cuda.current_device()
    on CPU:  the buffer is allocated on the CPU with the same size rule; megatron-core's method
             returns the view
tp-gather
    megatron.core.tensor_parallel.mappings:_gather_along_first_dim
    patch; megatron-core 0.16.x; callable(input_, group, output_split_sizes, use_global_buffer)
    assumes: allocates the all-gather output on torch.cuda.current_device() (the alltoall
             dispatcher's EP gather of per-expert counts)
    on CPU:  output allocated on the input's device; CUDA inputs and the global-buffer branch
             run megatron-core's
all-to-all
    megatron.core.tensor_parallel.mappings:_AllToAll.forward
    patch; megatron-core 0.16.x; callable(ctx, group, input, output_split_sizes,
    input_split_sizes)
    assumes: allocates the all-to-all-v output (dispatch, combine and their backward) on
             torch.cuda.current_device()
    on CPU:  output allocated on the input's device; CUDA inputs and equal splits run
             megatron-core's
causal-mask
    megatron.core.transformer.utils:get_default_causal_mask
    patch; megatron-core 0.16.x; callable(sq)
    assumes: builds the causal mask with device="cuda"
    on CPU:  the same mask built on the CPU (cached per length)
causal-mask-softmax
    megatron.core.fusions.fused_softmax:get_default_causal_mask
    patch; megatron-core 0.16.x; callable(sq)
    assumes: the same function, imported by name into FusedScaleMaskSoftmax's module
    on CPU:  the same mask built on the CPU (cached per length)
te-gemm
    megatron.core.transformer.moe.moe_utils:te_general_gemm
    patch, added only where missing; megatron-core 0.16.x
    assumes: router_gating_linear tests `te_general_gemm is not None`, a name that exists only
             when Transformer Engine imported
    on CPU:  None, megatron-core's own torch.mm path (on GPU hosts without Transformer Engine
             too)
rng-tracker
    megatron.core.tensor_parallel.random:_CUDA_RNG_STATE_TRACKER
    patch; megatron-core 0.16.x
    assumes: the RNG tracker (fork() in attention dropout and expert init) holds CUDA generator
             states
    on CPU:  a CpuRNGStatesTracker: the same named states on the CPU generator
rng-tracker-initialized
    megatron.core.tensor_parallel.random:_CUDA_RNG_STATE_TRACKER_INITIALIZED
    patch; megatron-core 0.16.x
    assumes: get_cuda_rng_tracker() builds a CUDA tracker unless this flag is set
    on CPU:  True, so the CPU tracker is the one returned
rng-tracker-add
    megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add
    subclass epruntime.compat.rng:CpuRNGStatesTracker; megatron-core 0.16.x; callable(self,
    name, seed)
    assumes: seeds a named state through torch.cuda.manual_seed / get_rng_state
    on CPU:  the named state of a CPU generator with that seed
rng-tracker-fork
    megatron.core.tensor_parallel.random:CudaRNGStatesTracker.fork
    subclass epruntime.compat.rng:CpuRNGStatesTracker; megatron-core 0.16.x; callable(self,
    name)
    assumes: swaps the named state in and out of the CUDA generator
    on CPU:  swaps it in and out of torch's default CPU generator, same bookkeeping
a2a-dtoh-stream
    megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher.cuda_dtoh_stream
    subclass epruntime.compat.dispatcher:CpuAlltoAllTokenDispatcher (and patched process-wide
    while PATCH_BASE_DISPATCHER); megatron-core 0.16.x
    assumes: __init__ creates a torch.cuda.Stream() for the DtoH copies of the splits when this
             class attribute is None; MoELayer.__init__ always builds megatron-core's own
             alltoall dispatcher first
    on CPU:  no side stream: the subclass, and no_dtoh_stream() around MoELayer.__init__, set
             the attribute for the duration of __init__ only
a2a-dtoh-sync
    megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize
    subclass epruntime.compat.dispatcher:CpuAlltoAllTokenDispatcher (and patched process-wide
    while PATCH_BASE_DISPATCHER); megatron-core 0.16.x; callable(self, point, tokens_per_expert)
    assumes: copies the a2a splits to the host on the side stream and waits on its event;
             maybe_move_tensor_to_cpu converts only CUDA tensors
    on CPU:  at the same point the splits become numpy arrays, as after megatron-core's copy; no
             stream work
ddp-grad-buffer
    megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBuffer.__init__
    patch; megatron-core 0.16.x; callable(self, ddp_config, param_dtype, grad_dtype, params,
    data_parallel_group, bucket_size, param_to_name, gradient_scaling_factor, param_indices,
    nccl_ub, pg_collection)
    assumes: allocates DistributedDataParallel's contiguous gradient buffers on
             torch.cuda.current_device()
    on CPU:  megatron-core's own __init__ with torch.cuda.current_device() naming the CPU for
             that one function (a copy of it whose `torch` name sees a view of torch; torch and
             the module are left as they are); CUDA parameters run megatron-core's
ddp-one-rank-sync
    megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup.start_grad_sync
    patch; megatron-core 0.16.x; callable(self, force_all_reduce)
    assumes: all-reduces the bucket group over its data-parallel group even when that group has
             one rank (the expert buffer when EP spans the data-parallel ranks); NCCL queues the
             no-op on a stream
    on CPU:  over a one-rank group, synchronous and without nan checks, only megatron-core's
             gradient scaling runs (gloo would block on its worker thread); otherwise
             megatron-core's
fp32-optimizer
    megatron.core.optimizer.optimizer:FP32Optimizer.__init__
    patch; megatron-core 0.16.x; callable(self, optimizer, config, init_state_fn)
    assumes: keeps its constant loss scale in a tensor made with device="cuda"
    on CPU:  the same tensor on the CPU; CUDA parameters run megatron-core's
grad-norm
    megatron.core.optimizer.optimizer:get_grad_norm_fp32
    patch; megatron-core 0.16.x; callable(grads_for_norm, norm_type, grad_stats_parallel_group)
    assumes: makes its overflow flag and empty norm with device="cuda"; the local multi-tensor
             L2 norm returns a CUDA tensor (the name MegatronOptimizer and ChainedOptimizer
             call)
    on CPU:  the same fp32 norm of the per-tensor norms on the CPU, reduced over the grad-stats
             group (not over a group of one rank); CUDA gradients run megatron-core's
grad-norm-clip-grads
    megatron.core.optimizer.clip_grads:get_grad_norm_fp32
    patch; megatron-core 0.16.x; callable(grads_for_norm, norm_type, grad_stats_parallel_group)
    assumes: the same function in its own module (megatron.core.optimizer.clip_grads)
    on CPU:  the same fp32 norm on the CPU
grad-clip
    megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32
    patch; megatron-core 0.16.x; callable(parameters, max_norm, total_norm, use_decoupled_grad)
    assumes: asserts every gradient is a torch.cuda.FloatTensor and makes its overflow flag with
             device="cuda" (the name ChainedOptimizer calls)
    on CPU:  the same in-place scale by max_norm / (total_norm + 1e-6) of CPU fp32 gradients
             (one in-place multiply, no temporary); CUDA gradients run megatron-core's
grad-clip-clip-grads
    megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32
    patch; megatron-core 0.16.x; callable(parameters, max_norm, total_norm, use_decoupled_grad)
    assumes: the same function in its own module (megatron.core.optimizer.clip_grads, the name
             epruntime.optim calls)
    on CPU:  the same in-place scale on the CPU
"""

from __future__ import annotations

import importlib
import inspect
import textwrap
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Literal

MEGATRON_0_16 = ("0.16.",)

# Whether the alltoall dispatcher's two adapters are also patched onto megatron-core's base
# class. Off: every alltoall dispatcher epruntime builds derives from
# dispatcher.CpuAlltoAllTokenDispatcher, and SpecMoELayer builds megatron-core's own (which
# MoELayer.__init__ always makes first) inside dispatcher.no_dtoh_stream(). Kept as a switch for
# code outside epruntime that builds megatron-core's dispatcher on CPU.
PATCH_BASE_DISPATCHER = False


class MegatronVersionError(RuntimeError):
    """The installed megatron-core is not one this adapter was written and tested for."""


def megatron_version() -> str:
    return metadata.version("megatron-core")


@dataclass(frozen=True)
class Adapter:
    """One megatron-core CUDA assumption and its CPU replacement."""

    name: str
    target: str  # "package.module:Class.attribute" or "package.module:attribute"
    assumes: str  # what megatron-core does that needs CUDA
    on_cpu: str  # what happens on CPU instead
    versions: tuple[str, ...] = MEGATRON_0_16  # megatron-core version prefixes it applies to
    params: tuple[str, ...] | None = None  # the target is callable with exactly these parameters
    by: Literal["patch", "subclass"] = "patch"
    subclass: str | None = None  # "module:Class" that overrides the target (by="subclass")
    only_if_missing: bool = False  # added where megatron-core lacks it, left alone otherwise
    # A megatron-core bug rather than a CUDA assumption: applied on GPU hosts too
    # (megatron_cpu.enable_host_independent), where Transformer Engine is missing as well.
    everywhere: bool = False
    # original value -> the value enable() sets; None for a subclass-only adapter.
    replacement: Callable[[Any], Any] | None = field(default=None, repr=False, compare=False)

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.target.partition(":")[2].split("."))

    def applies_to(self, version: str) -> bool:
        return version.startswith(self.versions)

    def patched(self) -> bool:
        """Whether enable() sets the target (a subclass adapter only while transitional)."""
        if self.replacement is None:
            return False
        return self.by == "patch" or PATCH_BASE_DISPATCHER

    def resolve(self) -> tuple[Any, str]:
        """(owner, attribute name) of the target; raises LookupError when it is not there."""
        try:
            owner: Any = importlib.import_module(self.module)
        except ImportError as e:
            raise LookupError(f"module {self.module} does not import ({e})") from e
        *owners, attr = self.path
        for i, part in enumerate(owners):
            if not hasattr(owner, part):
                raise LookupError(f"{self.module}:{'.'.join(owners[:i + 1])} does not exist")
            owner = getattr(owner, part)
        return owner, attr

    def problem(self) -> str | None:
        """Why the installed megatron-core does not fit this declaration, or None."""
        try:
            owner, attr = self.resolve()
        except LookupError as e:
            return str(e)
        if not hasattr(owner, attr):
            return None if self.only_if_missing else f"{self.target} does not exist"
        if self.params is not None:
            value = getattr(owner, attr)
            if not callable(value):
                return f"{self.target} is not callable"
            found = tuple(inspect.signature(value).parameters)
            if found != self.params:
                return (f"{self.target} takes ({', '.join(found)}), the adapter expects "
                        f"({', '.join(self.params)})")
        if self.subclass is not None:
            module, _, qualname = self.subclass.partition(":")
            try:
                cls = getattr(importlib.import_module(module), qualname)
            except (ImportError, AttributeError) as e:
                return f"its subclass {self.subclass} does not load ({e})"
            if not (isinstance(owner, type) and issubclass(cls, owner)):
                return f"{self.subclass} does not derive from {self.module}:{owner.__qualname__}"
        return None


def check(adapters: tuple[Adapter, ...] | None = None, version: str | None = None) -> list[Adapter]:
    """The adapters that apply to the installed megatron-core, each checked against it.

    Raises MegatronVersionError naming the first adapter whose target is missing or is not what
    the adapter expects; nothing is applied by checking.
    """
    adapters = ADAPTERS if adapters is None else adapters
    version = megatron_version() if version is None else version
    applicable = [a for a in adapters if a.applies_to(version)]
    for a in applicable:
        problem = a.problem()
        if problem is not None:
            raise MegatronVersionError(
                f"CPU adapter {a.name!r} does not fit megatron-core {version}: {problem}. "
                f"It was written for megatron-core {', '.join(v + 'x' for v in a.versions)}; "
                "install megatron-core==0.16.1 or run on a CUDA host.")
    return applicable


def _how(a: Adapter) -> str:
    if a.by == "subclass":
        how = f"subclass {a.subclass}"
        if a.replacement is not None:
            how += " (and patched process-wide while PATCH_BASE_DISPATCHER)"
    else:
        how = "patch, added only where missing" if a.only_if_missing else "patch"
    how += f"; megatron-core {', '.join(v + 'x' for v in a.versions)}"
    if a.params is not None:
        how += f"; callable({', '.join(a.params)})"
    return how


def render_table(adapters: tuple[Adapter, ...] | None = None, markdown: bool = False) -> str:
    """The declarations as text (the module docstring's listing) or as a markdown table."""
    adapters = ADAPTERS if adapters is None else adapters
    if markdown:
        rows = ["| adapter | target | applied by | CUDA assumption | on CPU |",
                "|---|---|---|---|---|"]
        rows += [f"| {a.name} | `{a.target}` | {_how(a)} | {a.assumes} | {a.on_cpu} |"
                 for a in adapters]
        return "\n".join(rows) + "\n"
    width = 96

    def block(label: str, text: str) -> list[str]:
        return textwrap.wrap(text, width, initial_indent=f"    {label}",
                             subsequent_indent=" " * (4 + len(label)), break_on_hyphens=False)

    lines: list[str] = []
    for a in adapters:
        lines += [a.name, f"    {a.target}"]
        lines += textwrap.wrap(_how(a), width, initial_indent="    ", subsequent_indent="    ",
                               break_on_hyphens=False)
        lines += block("assumes: ", a.assumes)
        lines += block("on CPU:  ", a.on_cpu)
    return "\n".join(lines) + "\n"


# Replacements, imported only when enable() applies them (they import megatron-core).

def _cpu_op(name: str) -> Callable[[Any], Any]:
    def make(original: Any) -> Any:
        from epruntime.compat import cpu_ops

        return getattr(cpu_ops, name)(original)
    return make


def _causal_mask(original: Any) -> Any:
    from epruntime.compat.cpu_ops import cpu_default_causal_mask

    return cpu_default_causal_mask


def _rng_tracker(original: Any) -> Any:
    from epruntime.compat.rng import CpuRNGStatesTracker

    return CpuRNGStatesTracker()


def _no_stream(original: Any) -> Any:
    from epruntime.compat.dispatcher import NO_STREAM

    return NO_STREAM


def _dtoh(original: Any) -> Any:
    from epruntime.compat.dispatcher import cpu_dtoh_and_synchronize

    return cpu_dtoh_and_synchronize


_MOE = "megatron.core.transformer.moe"
_MAPPINGS = "megatron.core.tensor_parallel.mappings"
_RANDOM = "megatron.core.tensor_parallel.random"
_DISPATCHER = f"{_MOE}.token_dispatcher:MoEAlltoAllTokenDispatcher"
_CPU_DISPATCHER = "epruntime.compat.dispatcher:CpuAlltoAllTokenDispatcher"
_CPU_TRACKER = "epruntime.compat.rng:CpuRNGStatesTracker"
_CURRENT = "torch.cuda.current_device()"
_GRAD_BUFFER = "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBuffer"
_BUCKET_GROUP = "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup"
_OPTIMIZER = "megatron.core.optimizer.optimizer"
_CLIP_GRADS = "megatron.core.optimizer.clip_grads"
_NORM_PARAMS = ("grads_for_norm", "norm_type", "grad_stats_parallel_group")
_CLIP_PARAMS = ("parameters", "max_norm", "total_norm", "use_decoupled_grad")

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        "router-gating", f"{_MOE}.router:Router.gating",
        f"moves the CPU-resident router weight and bias to {_CURRENT} on every call",
        "the same router_gating_linear with the weight and bias where they are",
        params=("self", "input"), replacement=_cpu_op("router_gating")),
    Adapter(
        "router-buffers", f"{_MOE}.router:TopKRouter.__init__",
        "allocates the expert-bias (aux-loss-free balancing) and global-aux-loss buffers on "
        f"{_CURRENT}",
        "the router is built without them and the same buffers (names, dtypes, persistence) "
        "are registered on the CPU",
        params=("self", "config", "pg_collection"), by="subclass",
        subclass="epruntime.compat.router:CpuTopKRouter"),
    Adapter(
        "global-buffer", "megatron.core.utils:GlobalMemoryBuffer.get_tensor",
        f"allocates the shared buffer (DotProductAttention's matmul input) on {_CURRENT}",
        "the buffer is allocated on the CPU with the same size rule; megatron-core's method "
        "returns the view",
        params=("self", "tensor_shape", "dtype", "name", "mem_alloc_context"),
        replacement=_cpu_op("global_buffer_get_tensor")),
    Adapter(
        "tp-gather", f"{_MAPPINGS}:_gather_along_first_dim",
        f"allocates the all-gather output on {_CURRENT} (the alltoall dispatcher's EP gather "
        "of per-expert counts)",
        "output allocated on the input's device; CUDA inputs and the global-buffer branch run "
        "megatron-core's",
        params=("input_", "group", "output_split_sizes", "use_global_buffer"),
        replacement=_cpu_op("gather_along_first_dim")),
    Adapter(
        "all-to-all", f"{_MAPPINGS}:_AllToAll.forward",
        "allocates the all-to-all-v output (dispatch, combine and their backward) on "
        f"{_CURRENT}",
        "output allocated on the input's device; CUDA inputs and equal splits run "
        "megatron-core's",
        params=("ctx", "group", "input", "output_split_sizes", "input_split_sizes"),
        replacement=_cpu_op("all_to_all_forward")),
    Adapter(
        "causal-mask", "megatron.core.transformer.utils:get_default_causal_mask",
        'builds the causal mask with device="cuda"',
        "the same mask built on the CPU (cached per length)",
        params=("sq",), replacement=_causal_mask),
    Adapter(
        "causal-mask-softmax", "megatron.core.fusions.fused_softmax:get_default_causal_mask",
        "the same function, imported by name into FusedScaleMaskSoftmax's module",
        "the same mask built on the CPU (cached per length)",
        params=("sq",), replacement=_causal_mask),
    Adapter(
        "te-gemm", f"{_MOE}.moe_utils:te_general_gemm",
        "router_gating_linear tests `te_general_gemm is not None`, a name that exists only when "
        "Transformer Engine imported",
        "None, megatron-core's own torch.mm path (on GPU hosts without Transformer Engine too)",
        only_if_missing=True, everywhere=True, replacement=lambda original: None),
    Adapter(
        "rng-tracker", f"{_RANDOM}:_CUDA_RNG_STATE_TRACKER",
        "the RNG tracker (fork() in attention dropout and expert init) holds CUDA generator "
        "states",
        "a CpuRNGStatesTracker: the same named states on the CPU generator",
        replacement=_rng_tracker),
    Adapter(
        "rng-tracker-initialized", f"{_RANDOM}:_CUDA_RNG_STATE_TRACKER_INITIALIZED",
        "get_cuda_rng_tracker() builds a CUDA tracker unless this flag is set",
        "True, so the CPU tracker is the one returned",
        replacement=lambda original: True),
    Adapter(
        "rng-tracker-add", f"{_RANDOM}:CudaRNGStatesTracker.add",
        "seeds a named state through torch.cuda.manual_seed / get_rng_state",
        "the named state of a CPU generator with that seed",
        params=("self", "name", "seed"), by="subclass", subclass=_CPU_TRACKER),
    Adapter(
        "rng-tracker-fork", f"{_RANDOM}:CudaRNGStatesTracker.fork",
        "swaps the named state in and out of the CUDA generator",
        "swaps it in and out of torch's default CPU generator, same bookkeeping",
        params=("self", "name"), by="subclass", subclass=_CPU_TRACKER),
    Adapter(
        "a2a-dtoh-stream", f"{_DISPATCHER}.cuda_dtoh_stream",
        "__init__ creates a torch.cuda.Stream() for the DtoH copies of the splits when this "
        "class attribute is None; MoELayer.__init__ always builds megatron-core's own alltoall "
        "dispatcher first",
        "no side stream: the subclass, and no_dtoh_stream() around MoELayer.__init__, set the "
        "attribute for the duration of __init__ only",
        by="subclass", subclass=_CPU_DISPATCHER, replacement=_no_stream),
    Adapter(
        "a2a-dtoh-sync", f"{_DISPATCHER}._maybe_dtoh_and_synchronize",
        "copies the a2a splits to the host on the side stream and waits on its event; "
        "maybe_move_tensor_to_cpu converts only CUDA tensors",
        "at the same point the splits become numpy arrays, as after megatron-core's copy; no "
        "stream work",
        params=("self", "point", "tokens_per_expert"), by="subclass", subclass=_CPU_DISPATCHER,
        replacement=_dtoh),
    # DistributedDataParallel and the optimizer (epruntime.optim); each runs megatron-core's own
    # code for CUDA tensors and differs only for CPU ones.
    Adapter(
        "ddp-grad-buffer", f"{_GRAD_BUFFER}.__init__",
        "allocates DistributedDataParallel's contiguous gradient buffers on "
        f"{_CURRENT}",
        f"megatron-core's own __init__ with {_CURRENT} naming the CPU for that one function "
        "(a copy of it whose `torch` name sees a view of torch; torch and the module are left "
        "as they are); CUDA parameters run megatron-core's",
        params=("self", "ddp_config", "param_dtype", "grad_dtype", "params",
                "data_parallel_group", "bucket_size", "param_to_name", "gradient_scaling_factor",
                "param_indices", "nccl_ub", "pg_collection"),
        replacement=_cpu_op("grad_buffer_init")),
    Adapter(
        "ddp-one-rank-sync", f"{_BUCKET_GROUP}.start_grad_sync",
        "all-reduces the bucket group over its data-parallel group even when that group has one "
        "rank (the expert buffer when EP spans the data-parallel ranks); NCCL queues the no-op "
        "on a stream",
        "over a one-rank group, synchronous and without nan checks, only megatron-core's "
        "gradient scaling runs (gloo would block on its worker thread); otherwise "
        "megatron-core's",
        params=("self", "force_all_reduce"), replacement=_cpu_op("bucket_group_start_grad_sync")),
    Adapter(
        "fp32-optimizer", f"{_OPTIMIZER}:FP32Optimizer.__init__",
        'keeps its constant loss scale in a tensor made with device="cuda"',
        "the same tensor on the CPU; CUDA parameters run megatron-core's",
        params=("self", "optimizer", "config", "init_state_fn"),
        replacement=_cpu_op("fp32_optimizer_init")),
    Adapter(
        "grad-norm", f"{_OPTIMIZER}:get_grad_norm_fp32",
        'makes its overflow flag and empty norm with device="cuda"; the local multi-tensor L2 '
        "norm returns a CUDA tensor (the name MegatronOptimizer and ChainedOptimizer call)",
        "the same fp32 norm of the per-tensor norms on the CPU, reduced over the grad-stats "
        "group (not over a group of one rank); CUDA gradients run megatron-core's",
        params=_NORM_PARAMS, replacement=_cpu_op("grad_norm_fp32")),
    Adapter(
        "grad-norm-clip-grads", f"{_CLIP_GRADS}:get_grad_norm_fp32",
        "the same function in its own module (megatron.core.optimizer.clip_grads)",
        "the same fp32 norm on the CPU",
        params=_NORM_PARAMS, replacement=_cpu_op("grad_norm_fp32")),
    Adapter(
        "grad-clip", f"{_OPTIMIZER}:clip_grad_by_total_norm_fp32",
        "asserts every gradient is a torch.cuda.FloatTensor and makes its overflow flag with "
        'device="cuda" (the name ChainedOptimizer calls)',
        "the same in-place scale by max_norm / (total_norm + 1e-6) of CPU fp32 gradients (one "
        "in-place multiply, no temporary); CUDA gradients run megatron-core's",
        params=_CLIP_PARAMS, replacement=_cpu_op("clip_grad_by_total_norm")),
    Adapter(
        "grad-clip-clip-grads", f"{_CLIP_GRADS}:clip_grad_by_total_norm_fp32",
        "the same function in its own module (megatron.core.optimizer.clip_grads, the name "
        "epruntime.optim calls)",
        "the same in-place scale on the CPU",
        params=_CLIP_PARAMS, replacement=_cpu_op("clip_grad_by_total_norm")),
)
