"""One rank's share of the MoE-VLM: build it, take a training step, evaluate.

train.py, infer.py, the tests and the benchmarks all go through this, so the path that is
measured is the path that trains.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)

from epruntime import kernels, optim
from epruntime.config import Config, ConfigError, ep_ranks_per_node
from epruntime.dispatch import CommLedger, dispatcher_class
from epruntime.dispatch.timing import PhaseTimer, clock_for
from epruntime.distributed import DistEnv, check_router_groups, host_all_reduce
from epruntime.model.vision import load_pretrained
from epruntime.model.vlm import MoEVLM, init_weights_
from epruntime.placement.controller import build_placements, file_placements
from epruntime.routing_stats import RoutingRecorder
from epruntime.runtime import Observers, layer_runtimes
from epruntime.transport import setup_transport


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm: training stops before the optimizer step (exit 4)."""


@dataclass
class StepResult:
    loss: float  # global-batch mean cross-entropy
    grad_norm: float
    lr: float
    tokens: int  # tokens this rank pushed through the model
    aux_losses: dict[str, float]  # megatron-core's aux-loss tracker: name -> mean over layers
    skipped: bool = False  # non-finite loss or gradient norm: no update (train.skip_nonfinite_steps)


class Engine:
    def __init__(self, cfg: Config, env: DistEnv, text_vocab_size: int, num_answers: int,
                 max_question_len: int, router_cls: type | None = None,
                 dispatcher_cls: type | None = None):
        self.cfg, self.env = cfg, env
        per_node = self.ranks_per_node = ep_ranks_per_node(cfg, env.local_world_size)
        check_router_groups(cfg, per_node)  # every routing group whole on a rank / node
        backend = None if cfg.dispatch.kernels == "auto" else cfg.dispatch.kernels
        try:  # before any collective: an unusable backend is a config error, not a dead rank
            kernels.resolve_backend(backend, env.device)
        except ValueError as err:
            raise ConfigError(f"dispatch.kernels={cfg.dispatch.kernels}: {err}") from None
        # dispatch.transport=shm: the dispatchers' row all-to-alls on the EP group go through
        # shared memory inside a node (collective over the EP group).
        self.transport = setup_transport(cfg, ps.get_expert_model_parallel_group(), per_node)
        # Forward all-to-all bytes of every MoE layer since the last reset (summary's `comm`);
        # the dispatchers see it through the observers of their runtime.
        self.ledger = CommLedger(cfg.model.num_moe_layers, env.ep_size, env.ep_rank, per_node)
        # Seconds of every dispatch/combine phase (summary's `comm_time`), dispatch.timing.
        self.timer = self._new_timer()
        self.observers = Observers(self.ledger if cfg.dispatch.ledger else None, self.timer)
        runtimes = layer_runtimes(cfg.model.num_moe_layers, self.transport, backend, self.observers,
                                  overlap=cfg.dispatch.overlap, timeout_s=cfg.parallel.timeout_s)
        # dispatch.placement=file:PATH, read once; one with copies of hot experts sizes the
        # expert slots: the model is built with it (else the controller migrates to it).
        self.file_placements = file_placements(cfg, per_node)
        placements = build_placements(self.file_placements)
        self.model = MoEVLM(cfg, text_vocab_size, num_answers, max_question_len, router_cls,
                            dispatcher_cls or dispatcher_class(cfg.dispatch.kind), per_node,
                            runtimes=runtimes, placements=placements)
        self.model.to(env.device)
        self.num_local_experts = self.model.placements[0].num_local
        init_weights_(self.model, cfg.train.seed, cfg.model.init_std, cfg.model.num_layers,
                      env.ep_rank)
        vision = cfg.model.vision
        if vision.pretrained is not None:  # every rank reads the same file: replicas agree
            load_pretrained(self.model.vision.encoder, cfg.model, vision.pretrained)
            # Frozen before the optimizer is built: megatron-core's DDP buffers and the optimizer
            # take only parameters that require grad.
            self.model.vision.encoder.requires_grad_(not vision.freeze)
        # train.optimizer: megatron-core's DDP + optimizer (or the earlier flat path); the model
        # stays unwrapped (DDP's hooks fire on its parameters' gradients).
        self.gradients = optim.build_gradients(self.model, self.model.gpt.config, cfg.train)
        self.optimizer = self.gradients.optimizer
        self.optimizer_state = optim.ParamStates(self.optimizer)  # keyed by parameter

    def _new_timer(self) -> PhaseTimer | None:
        if self.cfg.dispatch.timing == "off":
            return None
        return PhaseTimer(self.cfg.model.num_moe_layers, clock_for(self.env.device),
                          barrier=self.cfg.dispatch.timing == "barrier", device=self.env.device)

    def global_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters under their global names."""
        return {n: p.detach() for n, p in
                self.model.global_named_parameters(self.env.ep_rank)}

    def local_loss(self, batch, global_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of CE over this rank's samples / global_batch_size, logits [B, A])."""
        # Labels too (the forward checks the rest): an unknown answer is an InputError, not a
        # silent wrong loss or an index error deep in cross_entropy.
        if self.cfg.debug_checks:  # once, labels included; the forward then skips its own
            self.model.check_batch(batch.images, batch.question_ids, batch.question_lens,
                                   batch.answers)
        logits = self.model(batch.images, batch.question_ids, batch.question_lens, check=False)
        ce_sum = F.cross_entropy(logits, batch.answers, reduction="sum")
        return ce_sum / global_batch_size, logits

    def forward_backward(self, batch, global_batch_size: int) -> float:
        """Loss and reduced gradients of the global batch (this rank holds `batch` of it).
        Returns the global mean loss."""
        self.gradients.zero_grad()
        loss, _ = self.local_loss(batch, global_batch_size)
        # Each rank's aux loss is over its own micro-batch; grads are summed over DP, so scale the
        # aux-loss gradient to the mean over ranks. megatron-core keeps this scale process-wide:
        # set it where this engine's backward uses it.
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / self.env.dp_size))
        loss.backward()
        self.gradients.reduce()
        total = loss.detach().clone()
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return total.item()

    def train_step(self, batch, step: int, may_skip: bool = False) -> StepResult:
        """One optimizer step on the global batch. A non-finite loss or gradient norm (the same on
        every rank: both are reduced over all ranks) raises NonFiniteError before anything is
        updated, or, with `may_skip`, returns a result marked `skipped` without updating."""
        clear_aux_losses_tracker()
        loss = self.forward_backward(batch, self.cfg.data.global_batch_size)
        grad_norm = self.gradients.grad_norm()  # host sync: the clip and skip decisions
        lr = optim.lr_at(step, self.cfg.train)
        bad = [f"{name} is {value}" for name, value in (("the loss", loss),
                                                       ("the gradient norm", grad_norm))
               if not math.isfinite(value)]
        if bad:
            if not may_skip:
                raise NonFiniteError(
                    f"step {step}: {' and '.join(bad)} (train.lr={self.cfg.train.lr:g}, lr at this "
                    f"step {lr:.3g}); stopped before the optimizer step, nothing was updated or "
                    "saved; lower train.lr, check the data, or set train.skip_nonfinite_steps=N "
                    "to skip up to N such steps")
            self.gradients.zero_grad()
            return StepResult(loss, grad_norm, lr, len(batch) * self.model.seq_len, {},
                              skipped=True)
        self.gradients.step(lr, grad_norm, self.cfg.train.grad_clip)
        if self.timer is not None:
            self.timer.settle()  # CUDA: the one host sync of phase timing, once per step
        aux = {name: entry["values"].mean().item()  # host sync: logged figures
               for name, entry in get_moe_layer_wise_logging_tracker().items()}
        return StepResult(loss, grad_norm, lr, len(batch) * self.model.seq_len, aux)

    @torch.no_grad()
    def evaluate(self, dataset, batch_size: int | None = None, per_item: bool = False
                 ) -> dict[str, float]:
        """Accuracy over the whole `dataset`, sharded over DP ranks, `batch_size` per rank
        (default: data.eval_batch_size split over the ranks). per_item: also `hits`, a list of
        len(dataset) 0/1 (the item's answer was right), for paired comparisons of two runs.

        Every rank runs the same number of forward passes (the EP all-to-alls need all ranks of
        the group): the last global batch is padded with repeats of item 0 that are not counted.
        """
        self.model.eval()
        recorder = RoutingRecorder(self.model, self.cfg.num_bins)
        env = self.env
        eval_ledger = CommLedger(self.cfg.model.num_moe_layers, env.ep_size, env.ep_rank,
                                 self.ranks_per_node)
        with self.observing(eval_ledger):
            figures = self._evaluate(dataset, batch_size, recorder, per_item)
        self.model.train()
        return figures

    @contextlib.contextmanager
    def observing(self, ledger):
        """Record the dispatchers' bytes into `ledger` for the enclosed block (and report it as
        `comm_summary`), then return to the training ledger. Results never change."""
        previous = self.ledger, self.timer
        self.ledger, self.timer = ledger, self._new_timer()
        try:
            with self.observers.observing(ledger if self.cfg.dispatch.ledger else None,
                                          self.timer):
                yield ledger
        finally:
            self.ledger, self.timer = previous

    def _evaluate(self, dataset, batch_size, recorder, per_item: bool = False) -> dict:
        n, dp, rank = len(dataset), self.env.dp_size, self.env.dp_rank
        batch_size = batch_size or max(1, self.cfg.data.eval_batch_size // dp)
        per_step = dp * batch_size
        counts_dev = torch.zeros(3, dtype=torch.float64, device=self.env.device)  # hit, n, ce
        hits_N = torch.zeros(n, dtype=torch.float64, device=self.env.device) if per_item else None
        reducer = self.model.reducer
        reducer.reset_stats()
        self.model.skipper.reset_stats()  # MoDES: pairs skipped in this evaluation
        forward_s = 0.0  # prefill: the model's forward passes only, not batch assembly
        for start in range(0, n, per_step):
            idx = torch.arange(start + rank * batch_size, start + (rank + 1) * batch_size)
            valid = idx < n
            batch = dataset.batch(torch.where(valid, idx, 0)).to(self.env.device)
            valid = valid.to(self.env.device)
            _synchronize(self.env.device)  # host sync: prefill timing waits for the device
            t0 = time.perf_counter()
            logits = self.model(batch.images, batch.question_ids, batch.question_lens)
            _synchronize(self.env.device)
            forward_s += time.perf_counter() - t0
            hit = (logits.argmax(-1) == batch.answers) & valid
            ce = F.cross_entropy(logits, batch.answers, reduction="none")
            counts_dev = counts_dev + torch.stack([hit.sum().double(), valid.sum().double(),
                                                   ce[valid].double().sum()])
            if hits_N is not None:  # each item counted by the one rank that holds it
                hits_N.index_add_(0, idx.to(hits_N.device)[valid], hit[valid].double())
        counts = counts_dev.cpu()  # host sync: once, at the end of the evaluation
        host_all_reduce(counts, group=ps.get_data_parallel_group())
        hits = {}
        if hits_N is not None:
            hits_N = hits_N.cpu()  # host sync: per_item, once at the end
            host_all_reduce(hits_N, group=ps.get_data_parallel_group())
            hits = {"hits": [int(h) for h in hits_N.tolist()]}
        prefill = self._prefill_summary(forward_s)
        recorder.close()
        eval_comm = self.comm_summary()
        eval_time = self.comm_time_summary()
        # Padding repeats of item 0 are routed too; at most one batch per rank, so they are
        # left in the routing statistics.
        return {"eval_accuracy": counts[0].item() / counts[1].item(),
                "eval_loss": counts[2].item() / counts[1].item(),
                "eval_items": int(counts[1].item()),
                **recorder.summary(ps.get_data_parallel_group()),
                **prefill,
                "comm": eval_comm, "comm_time": eval_time, **hits}

    def _prefill_summary(self, forward_s: float) -> dict:
        """FLOPs (as run and for the full model), prompt tokens per second of forward time
        (slowest rank) and visual tokens kept, over the evaluate() just run (collective)."""
        reducer, world = self.model.reducer, dist.group.WORLD
        flops = reducer.flops.summary(world)
        sums = torch.tensor([reducer.passes, reducer.kept_vision], dtype=torch.float64)
        host_all_reduce(sums, group=world)
        slowest = torch.tensor([forward_s], dtype=torch.float64)
        host_all_reduce(slowest, group=world, op=dist.ReduceOp.MAX)
        samples = sums[0].item()
        modes = ({"modes": self.model.skipper.summary(world)} if self.cfg.modes.enabled
                 else {})  # MoDES skip ratios (collective)
        return {**modes, "flops": flops, "flops_ratio": flops["ratio"],
                "prefill_tokens_per_s": samples * self.model.seq_len / max(slowest.item(), 1e-9),
                "prefill_seconds": slowest.item(),
                "vision_tokens": self.model.num_vision_tokens,
                "vision_tokens_kept": sums[1].item() / max(samples, 1)}

    def comm_time_summary(self) -> dict | None:
        """The phase timer's figures gathered over all ranks (collective), or None when
        dispatch.timing is off."""
        if self.timer is None:
            return None
        return self.timer.summary(dist.group.WORLD)

    def comm_summary(self) -> dict | None:
        """The ledger summed over all ranks (collective), or None when the ledger is off."""
        if not self.cfg.dispatch.ledger:
            return None
        return self.ledger.summary(dist.group.WORLD)
