"""Gradient reduction across expert- and data-parallel ranks, clipping, optimizer, LR schedule:
megatron-core's DistributedDataParallel and optimizer.

Loss convention: every rank's loss is (sum over its samples) / global_batch_size, so that the sum
of rank losses is the global mean. Gradients are then SUMMED:
- dense parameters (replicated on every rank) over the data-parallel group;
- expert parameters (sharded over EP, replicated over expert-data-parallel) over the
  expert-data-parallel group. Their all-to-all backward already summed the contributions of
  the tokens of every rank in the EP group.
The result equals the gradient of the global-batch mean loss on one process, at any EP size.

megatron-core's DDP averages over the data-parallel group unless told that the loss is already
normalised: the config it gets says `calculate_per_token_loss=True` (gradient scaling factor 1,
SUM collectives, no `num_tokens` division since none is passed), which is exactly the sum above.
DDP keeps dense and expert gradients in separate contiguous buffers (expert parameters are the
ones megatron-core marks `allreduce=False`) and reduces each over its own group, bucket by bucket.
The optimizer is megatron-core's: one FP32Optimizer (AdamW) for dense and one for expert
parameters in a ChainedOptimizer, gradient norm over the whole model (expert squares summed over
the EP group) and its clipping. `MegatronGradients.step` is ChainedOptimizer.step with the
non-finite check between norm and update (train.skip_nonfinite_steps) that megatron-core's FP32
path does not make.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import clip_grads

from epruntime.config import TrainConfig
from epruntime.optim_copies import CopyGradients, corrected_norm

ADAM_BETAS = (0.9, 0.95)


def wrap_ddp(model: torch.nn.Module, config, cfg: TrainConfig) -> DistributedDataParallel:
    """megatron-core's DDP around `model` (its TransformerConfig `config`), configured for summed
    gradients (module docstring). Parameters keep their storage (no distributed optimizer), so
    migration and checkpoints write them in place; `param.main_grad` views DDP's buffers."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.overlap_grad_reduce,
        bucket_size=cfg.ddp_bucket_size, average_in_collective=False,
        use_distributed_optimizer=False)
    # DDP hooks each parameter's gradient accumulator, found through a tiny autograd graph: an
    # engine built inside no_grad (e.g. to read a checkpoint for inference) must still get them
    with torch.enable_grad():
        return DistributedDataParallel(dataclasses.replace(config, calculate_per_token_loss=True),
                                       ddp_config, model)


def build_optimizer(ddp: DistributedDataParallel, cfg: TrainConfig):
    """megatron-core's optimizer for `ddp`: AdamW, no weight decay on biases and 1-D parameters
    (megatron-core's standard wd_mult=0 group), gradient clipping at train.grad_clip."""
    config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1], adam_eps=1e-8,
        clip_grad=cfg.grad_clip, bf16=False, fp16=False, use_distributed_optimizer=False)
    optimizer = get_megatron_optimizer(config, [ddp], use_gloo_process_groups=False)
    for inner in inner_optimizers(optimizer):
        fuse_on_cpu(inner)
    return optimizer


def fuse_on_cpu(optimizer: torch.optim.Optimizer) -> None:
    """torch's AdamW, given CPU tensors and no choice, steps them one by one in Python (its
    foreach and fused defaults are for CUDA); its fused CPU kernel makes the same update in one
    call per group (a step of the tiny config's optimizer 10 ms -> 3 ms here). Set where torch
    reads it, in each param group, and only for an AdamW whose every parameter is on the CPU
    (megatron-core's fused Adams on GPU are left alone)."""
    if not isinstance(optimizer, torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        if all(p.device.type == "cpu" for p in group["params"]) and not group.get("foreach"):
            group["fused"] = True


class MegatronGradients:
    """One rank's gradients and updates through megatron-core: zero, reduce, norm, step."""

    def __init__(self, model: torch.nn.Module, config, cfg: TrainConfig):
        self.ddp = wrap_ddp(model, config, cfg)
        self.optimizer = build_optimizer(self.ddp, cfg)
        self.weight_decay = cfg.weight_decay
        self.copies = CopyGradients(model)  # replicated experts (epruntime.optim_copies)
        self._copies_excess = 0.0

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)

    def reduce(self) -> None:
        """After backward: DDP's bucketed reductions (and megatron-core's other end-of-backward
        work, e.g. the expert-bias update), then `param.grad` views the reduced buffer."""
        finalize_model_grads([self.ddp])
        self.optimizer.prepare_grads()
        self._copies_excess = self.copies.reduce()  # copies' grads summed over their ranks

    def grad_norm(self) -> float:
        """megatron-core's L2 norm of all gradients; host sync (megatron-core returns a float,
        one per chained optimizer whose stats group differs): the clip and skip decisions."""
        return corrected_norm(float(self.optimizer.get_grad_norm()), self._copies_excess)

    def step(self, lr: float, grad_norm: float, max_norm: float) -> None:
        """Clip by `grad_norm` with megatron-core's clip, set the learning rate (and weight
        decay) the way its param scheduler does (lr_mult / wd_mult per group), update."""
        for opt in self.optimizer.chained_optimizers:
            params = opt.get_parameters()
            if params:
                clip_grads.clip_grad_by_total_norm_fp32(params, max_norm, grad_norm)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
                group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
        self.optimizer.step_with_ready_grads()


def build_gradients(model: torch.nn.Module, config, cfg: TrainConfig):
    """train.optimizer: megatron (default) or the earlier hand-written path (epruntime)."""
    if cfg.optimizer == "epruntime":
        from epruntime.optim_flat import FlatGradients

        return FlatGradients(model, config, cfg)
    return MegatronGradients(model, config, cfg)


def inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers that hold the per-parameter state: those inside megatron-core's
    ChainedOptimizer / FP32Optimizer, or `optimizer` itself."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in chained if getattr(o, "optimizer", None) is not None]


class ParamStates:
    """Per-parameter optimizer state (AdamW: exp_avg, exp_avg_sq, step) keyed by the parameter,
    over megatron-core's optimizer, whose own `state` is keyed by (chained index, parameter).
    Live migration and checkpoints read and install expert state through this."""

    def __init__(self, optimizer):
        self._owner: dict[torch.Tensor, Any] = {
            p: opt for opt in inner_optimizers(optimizer)
            for group in opt.param_groups for p in group["params"]}

    def _state(self, param: torch.Tensor) -> dict:
        try:
            return self._owner[param].state
        except KeyError:
            raise KeyError(f"parameter of shape {tuple(param.shape)} is not in the "
                           "optimizer") from None

    def __contains__(self, param: torch.Tensor) -> bool:
        return param in self._owner and param in self._owner[param].state

    def get(self, param: torch.Tensor, default=None) -> dict | None:
        """The state of `param`; `default` when it has none or is no optimizer parameter (a
        buffer)."""
        return self._owner[param].state[param] if param in self else default

    def __getitem__(self, param: torch.Tensor) -> dict:
        state = self._state(param)
        if param not in state:
            raise KeyError(f"parameter of shape {tuple(param.shape)} has no optimizer state")
        return state[param]

    def __setitem__(self, param: torch.Tensor, value: dict) -> None:
        self._state(param)[param] = value

    def pop(self, param: torch.Tensor, default=None):
        return self._owner[param].state.pop(param, default) if param in self._owner else default

    def params(self) -> Iterator[torch.Tensor]:
        return iter(self._owner)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
