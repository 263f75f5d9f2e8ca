"""One typed config tree for every entry point, loaded from YAML with `--set a.b=value` overrides.

Every section forbids unknown keys, so a typo is an error that names the field, raised before any
process group exists. The YAML loader refuses a key given twice in one mapping (plain YAML keeps the
last one without a word), every float must be finite, and two checks need the launcher's
environment and so run at process-group time: `check_metrics_port` (LOCAL_WORLD_SIZE) and
`check_backend_available` (whether torch sees CUDA GPUs).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_PORT = 65535
MAX_LR = 10.0  # above this a learning rate is a typo (1e6 for 1e-6), not a schedule


class ConfigError(ValueError):
    """A config that cannot run; the message names the field."""


class Section(BaseModel):
    # allow_inf_nan=False: every float field (lr, grad_clip, timeout_s, coefficients, ...) must be
    # finite; YAML's .inf / .nan and --set x=inf are named errors, not a silent NaN run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _non_empty_path(field: str, value: Any, example: str) -> Any:
    """Before-validator body: an empty path ('' / None from `--set train.output_dir=`) would
    silently mean the current directory, or fail deep inside the run."""
    if value is None or (isinstance(value, (str, Path)) and not str(value).strip()):
        raise ValueError(f"{field}: must be a non-empty path (got {value!r}); {example}")
    return value


def _port_span_message(port: int, ranks: int, what: str) -> str | None:
    """Each local rank serves /metrics on port + local_rank: the highest must be a valid port."""
    last = port + ranks - 1
    if last <= MAX_PORT:
        return None
    return (f"metrics.port={port}: rank on local index {ranks - 1} would bind {last}; "
            f"metrics.port + {what} - 1 must be <= {MAX_PORT} ({what}={ranks}: lower "
            f"metrics.port to at most {MAX_PORT + 1 - ranks})")


class VisionConfig(Section):
    """The vision encoder ahead of the projector (epruntime.model.vision). Whatever the kind,
    each vision token stands for one model.patch_size square of the image."""

    # patch: no encoder (pixels of each patch straight into the projector); conv: strided
    # convolutional stem; vit: a small ViT over the patches.
    kind: Literal["patch", "conv", "vit"] = "patch"
    channels: list[int] = Field([32, 64, 64], min_length=1,
                                description="conv: output channels of each stride-2 3x3 conv")
    global_context: bool = Field(False, description="conv: append the image's mean last-stage "
                                 "features to every token")
    pool: Literal["avg", "max"] = Field("avg", description="conv: how each stage is pooled to "
                                        "the token grid (max keeps a small shape's features "
                                        "whole instead of averaging them with the background)")
    width: int = Field(64, gt=0, description="vit: embedding width")
    layers: int = Field(2, gt=0, description="vit: transformer blocks")
    heads: int = Field(4, gt=0, description="vit: attention heads")
    grid_positions: bool = Field(False, description="add a learned row and a learned column "
                                 "embedding to each vision token (factored 2-D positions), so "
                                 "'row r, column c' in a question is a sum the attention can "
                                 "match; off, the decoder's learned 1-D positions alone place "
                                 "the tokens")
    pretrained: Path | None = Field(None, description="encoder weights written by "
                                       "`python -m epruntime.model.pretrain_vision` (conv or vit); "
                                       "loaded over the initialisation where the model is built")
    freeze: bool = Field(False, description="keep the pretrained encoder fixed (requires_grad="
                         "False: DDP and the optimizer skip it); the projector still trains")

    @model_validator(mode="after")
    def _shapes(self) -> "VisionConfig":
        if any(c < 1 for c in self.channels):
            raise ValueError(f"model.vision.channels={self.channels}: each must be >= 1")
        if self.width % self.heads:
            raise ValueError(f"model.vision.width={self.width} is not divisible by "
                             f"model.vision.heads={self.heads}")
        if self.freeze and self.pretrained is None:
            raise ValueError("model.vision.freeze=true needs model.vision.pretrained (a frozen "
                             "encoder that was never trained stays at its random initialisation)")
        if self.pretrained is not None and self.kind not in ("conv", "vit"):
            raise ValueError(f"model.vision.pretrained needs model.vision.kind conv or vit "
                             f"(kind={self.kind} has no encoder weights)")
        return self


class ModelConfig(Section):
    """A small MoE-VLM: vision encoder + projector -> megatron-core GPTModel with MoE MLPs in
    every layer (or in the layers `moe_layer_freq` names, dense MLPs in the others)."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_experts: int = Field(32, gt=0)
    moe_topk: int = Field(4, gt=0)
    moe_ffn_hidden_size: int = Field(64, gt=0)
    moe_aux_loss_coeff: float = Field(1e-2, ge=0)
    image_size: int = Field(64, gt=0)
    patch_size: int = Field(8, gt=0)
    init_std: float = Field(0.02, gt=0)
    vision: VisionConfig = VisionConfig()
    # router options: megatron-core 0.16's own names, passed through to TransformerConfig
    # (README "Router options"); defaults are today's routing (softmax top-k, aux loss, fp32)
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: float | None = Field(None, gt=0)
    moe_router_enable_expert_bias: bool = Field(
        False, description="aux-loss-free balancing: a per-expert bias on the selection scores, "
        "moved by moe_router_bias_update_rate after every step (sigmoid scoring only)")
    moe_router_bias_update_rate: float = Field(1e-3, ge=0)
    moe_router_num_groups: int | None = Field(
        None, gt=0, description="group-limited routing: experts in this many contiguous groups "
        "(= EP ranks: device-limited; = nodes of an EP group: node-limited)")
    moe_router_group_topk: int | None = Field(None, gt=0, description="groups per token")
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss",
                                            "none"] = "aux_loss"
    moe_z_loss_coeff: float | None = Field(None, ge=0)
    moe_router_dtype: Literal["fp32", "fp64"] = "fp32"

    # capacity: megatron-core's token dropping, shared experts and dense layers (its own names).
    moe_expert_capacity_factor: float | None = Field(
        None, gt=0, description="each expert takes at most ceil(tokens * topk / experts * factor) "
        "(token, expert) pairs of a rank's tokens, the rest are dropped; None: dropless")
    moe_token_drop_policy: Literal["probs", "position"] = Field(
        "probs", description="over capacity, keep an expert's highest-probability pairs (probs) "
        "or its first tokens in sequence order (position)")
    moe_pad_expert_input_to_capacity: bool = Field(
        False, description="pad every expert's input to exactly its capacity (static shapes)")
    moe_shared_expert_intermediate_size: int | None = Field(
        None, gt=0, description="FFN width of the shared experts every token goes through "
        "(number of shared experts x their width); None: no shared expert")
    moe_shared_expert_overlap: bool = Field(
        False, description="run the shared experts on a CUDA side stream during the all-to-all "
        "(megatron-core's alltoall dispatcher, CUDA only), or during the dedup dispatchers' "
        "asynchronous all-to-all (any backend)")
    expert_compute: Literal["grouped", "loop"] = Field(
        "grouped", description="how a rank runs its local experts: grouped = all of them in two "
        "grouped GEMMs on CPU tensors (epruntime.model.experts: megatron-core's SequentialMLP "
        "parameters, one call instead of one per expert; the loop where that path does not "
        "apply, e.g. on CUDA); loop = megatron-core's SequentialMLP, one MLP call per expert")
    moe_layer_freq: int | list[int] = Field(
        1, description="which decoder layers are MoE: N = every N-th from layer 0, or a 0/1 "
        "list per layer (0 dense, 1 MoE), e.g. [0, 1, 1] for a dense first layer")

    @model_validator(mode="after")
    def _shapes_agree(self) -> "ModelConfig":
        if self.moe_topk > self.num_experts:
            raise ValueError(
                f"model.moe_topk={self.moe_topk} exceeds model.num_experts={self.num_experts}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.image_size={self.image_size} is not divisible by "
                f"model.patch_size={self.patch_size}"
            )
        stride = 2 ** len(self.vision.channels)
        if self.vision.kind == "conv" and stride > self.patch_size:
            # the stem would end on a grid coarser than the vision tokens it must give
            raise ValueError(
                f"model.vision.channels has {len(self.vision.channels)} stride-2 convs (stride "
                f"{stride}), more than model.patch_size={self.patch_size} allows; use at most "
                f"log2(patch_size) convs"
            )
        self._check_capacity_options()
        return self

    @model_validator(mode="after")
    def _router_options(self) -> "ModelConfig":
        """What megatron-core 0.16 would assert (or silently mis-route) at model build time, as
        named errors at config load."""
        k, e = self.moe_topk, self.num_experts
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ValueError("model.moe_router_enable_expert_bias=true needs "
                             "model.moe_router_score_function=sigmoid (megatron-core's "
                             "aux-loss-free balancing biases sigmoid scores only)")
        if k == 1 and self.moe_router_score_function == "softmax" and \
                not self.moe_router_pre_softmax:
            raise ValueError("model.moe_topk=1 with softmax scoring needs "
                             "model.moe_router_pre_softmax=true (a softmax over one selected "
                             "logit is constant: its gradient is zero)")
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if (groups is None) != (group_topk is None):
            raise ValueError("model.moe_router_num_groups and model.moe_router_group_topk go "
                             f"together (got {groups} and {group_topk}): set both for "
                             "group-limited routing, or neither")
        if groups is not None:
            if e % groups:
                raise ValueError(f"model.moe_router_num_groups={groups} does not divide "
                                 f"model.num_experts={e}")
            if group_topk > groups:
                raise ValueError(f"model.moe_router_group_topk={group_topk} exceeds "
                                 f"model.moe_router_num_groups={groups}")
            if k < group_topk:
                raise ValueError(f"model.moe_topk={k} is below model.moe_router_group_topk="
                                 f"{group_topk}: megatron-core scores a group by its top "
                                 "moe_topk // moe_router_group_topk experts, which would be none")
            if k // group_topk > e // groups or k > group_topk * (e // groups):
                raise ValueError(f"model.moe_topk={k} experts do not fit in "
                                 f"model.moe_router_group_topk={group_topk} groups of "
                                 f"{e // groups} experts")
        return self

    def _check_capacity_options(self) -> None:
        if self.moe_pad_expert_input_to_capacity and self.moe_expert_capacity_factor is None:
            raise ValueError("model.moe_pad_expert_input_to_capacity=true needs "
                             "model.moe_expert_capacity_factor (the capacity to pad to)")
        balancing = getattr(self, "moe_router_load_balancing_type", "aux_loss")
        if (self.moe_expert_capacity_factor is not None
                and balancing not in ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")):
            raise ValueError(f"model.moe_expert_capacity_factor needs "
                             f"model.moe_router_load_balancing_type aux_loss, seq_aux_loss, "
                             f"global_aux_loss or none (megatron-core), got {balancing}")
        if self.moe_shared_expert_overlap and self.moe_shared_expert_intermediate_size is None:
            raise ValueError("model.moe_shared_expert_overlap=true needs "
                             "model.moe_shared_expert_intermediate_size (a shared expert)")
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            if freq < 1:
                raise ValueError(f"model.moe_layer_freq={freq}: expected N >= 1 (every N-th "
                                 "layer is MoE) or a 0/1 list per layer")
        else:
            if len(freq) != self.num_layers or any(v not in (0, 1) for v in freq):
                raise ValueError(f"model.moe_layer_freq={freq}: expected one 0 (dense) or 1 (MoE) "
                                 f"per layer, model.num_layers={self.num_layers} values")
            if not any(freq):
                raise ValueError(f"model.moe_layer_freq={freq}: no MoE layer (at least one 1)")

    @property
    def moe_layer_pattern(self) -> list[int]:
        """[num_layers] 1 for an MoE layer, 0 for a dense one, as megatron-core's
        get_gpt_decoder_block_spec reads `moe_layer_freq`."""
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            return [int(i % freq == 0) for i in range(self.num_layers)]
        return list(freq)

    @property
    def moe_layer_indices(self) -> list[int]:
        """Decoder-layer indices (0-based) of the MoE layers; epruntime's per-layer state (layer
        runtimes, placements, ledger rows, checkpointed expert keys) is indexed by position in
        this list."""
        return [i for i, moe in enumerate(self.moe_layer_pattern) if moe]

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    @property
    def num_vision_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ParallelConfig(Section):
    ep_size: int = Field(1, gt=0, description="expert-parallel ranks; data parallel is the rest")
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # At least 1 s: the TCP store cannot even connect in less (and then drowns the error in C++
    # frames).
    timeout_s: float = Field(300.0, ge=1, description="collective timeout in seconds")
    threads_per_rank: int = Field(1, gt=0, description="torch intra-op threads per CPU rank")


class DataConfig(Section):
    # The data source: easy-vqa (its PyPI package), synthetic, or jsonl (the user's own images
    # and questions: epruntime.data.jsonl; train_jsonl / eval_jsonl / image_root below).
    dataset: Literal["easy-vqa", "synthetic", "jsonl"] = "easy-vqa"
    global_batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    max_train_items: int | None = Field(None, gt=0, description="first N training questions")
    max_eval_items: int | None = Field(None, gt=0, description="first N test questions")
    synthetic_items: int = Field(4096, gt=0)
    synthetic_question_len: int = Field(8, gt=1)
    train_jsonl: Path | None = Field(None, description="jsonl: the training split")
    eval_jsonl: Path | None = Field(None, description="jsonl: the evaluation split")
    # Image paths in the JSONL files are relative to this folder (default: each file's own).
    image_root: Path | None = None
    # Question length the model is built for (default: the longest question of the splits).
    max_question_len: int | None = Field(None, gt=0)

    @field_validator("train_jsonl", "eval_jsonl", "image_root", mode="before")
    @classmethod
    def _paths_given(cls, value: Any, info) -> Any:
        if value is None:
            return None
        return _non_empty_path(f"data.{info.field_name}", value,
                               "name a file or folder, or leave it out (null)")

    @model_validator(mode="after")
    def _source_fields(self) -> "DataConfig":
        jsonl_fields = [f for f in ("train_jsonl", "eval_jsonl", "image_root", "max_question_len")
                        if getattr(self, f) is not None]
        if self.dataset != "jsonl" and jsonl_fields:
            raise ValueError(f"data.{jsonl_fields[0]} is set but data.dataset={self.dataset}: it "
                             "applies to data.dataset=jsonl only")
        if self.dataset == "jsonl" and self.train_jsonl is None:
            raise ValueError("data.dataset=jsonl needs data.train_jsonl (a JSONL file of "
                             '{"image": ..., "question": ..., "answer": ...} lines)')
        return self


class TrainConfig(Section):
    output_dir: Path = Path("runs/train")
    max_steps: int = Field(300, gt=0)
    seed: int = 1234
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_interval: int = Field(100, gt=0)
    # Save checkpoints in the background (torch.distributed.checkpoint's async_save): training
    # waits only for a host copy of the state; `latest` moves once every shard is durable.
    async_checkpoint: bool = False
    log_interval: int = Field(10, gt=0)
    resume: bool = Field(True, description="continue from the newest complete checkpoint")
    # With resume=false, delete the checkpoints already under output_dir instead of refusing to
    # start over on top of them (epruntime.checkpoint.prepare_run).
    overwrite: bool = False
    # Steps whose loss or gradient norm is non-finite that may be skipped (no update) before the
    # job stops with exit code 4; 0 stops at the first.
    skip_nonfinite_steps: int = Field(0, ge=0)
    eval_at_end: bool = True
    progress: bool = True
    # mcore-ddp: gradients and updates. megatron: megatron-core's DistributedDataParallel (dense
    # and expert grads in separate contiguous buffers, summed over the data- and expert-data-
    # parallel groups) and its optimizer (AdamW, grad-norm clipping). epruntime: the earlier
    # hand-written flat all-reduce, clipping loop and AdamW, kept for side-by-side step times.
    optimizer: Literal["megatron", "epruntime"] = "megatron"
    # megatron only: reduce each gradient bucket (ddp_bucket_size parameters, megatron-core's
    # default when unset) as soon as its backward is done, overlapping backward.
    overlap_grad_reduce: bool = False
    ddp_bucket_size: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ddp_options(self) -> "TrainConfig":
        if self.optimizer != "megatron" and (self.overlap_grad_reduce or self.ddp_bucket_size):
            raise ValueError("train.overlap_grad_reduce and train.ddp_bucket_size configure "
                             "megatron-core's DDP; they need train.optimizer=megatron")
        if self.ddp_bucket_size is not None and not self.overlap_grad_reduce:
            raise ValueError(f"train.ddp_bucket_size={self.ddp_bucket_size} needs "
                             "train.overlap_grad_reduce=true (without overlap megatron-core "
                             "reduces each gradient buffer as one bucket)")
        return self

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_dir_given(cls, value: Any) -> Any:
        return _non_empty_path("train.output_dir", value,
                               "set it to a directory, e.g. --set train.output_dir=runs/train")

    @model_validator(mode="after")
    def _learning_rates(self) -> "TrainConfig":
        for name in ("lr", "min_lr"):
            value = getattr(self, name)
            if value > MAX_LR:
                raise ValueError(f"train.{name}={value!r}: learning rates above {MAX_LR:g} "
                                 "diverge; expected a value like 3e-3")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr!r} exceeds train.lr={self.lr!r}: the "
                             "schedule decays from train.lr down to train.min_lr; set "
                             "train.min_lr <= train.lr")
        return self


class InferConfig(Section):
    output_dir: Path = Path("runs/infer")
    # Fraction of each image's patches (model.patch_size squares) painted over with the image's
    # mean colour before the model sees it, chosen at random per example (seeded by the row, so
    # the same at any EP size): how much the answers depend on the image. 0 leaves images alone.
    occlude_vision: float = Field(0.0, ge=0, le=1)
    occlude_seed: int = 0

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_dir_given(cls, value: Any) -> Any:
        return _non_empty_path("infer.output_dir", value,
                               "set it to a directory, e.g. --set infer.output_dir=runs/infer")


class SmoesConfig(Section):
    """Soft Modality-guided Expert Specialization (arXiv 2604.23996); defaults are the paper's."""

    enabled: bool = False
    score: Literal["hard", "attention", "gaussian"] = "attention"
    num_bins: int | None = Field(None, gt=0, description="default: parallel.ep_size")
    rebin_interval: int = Field(50, gt=0, description="steps between re-binning")
    count_beta: float = Field(0.99, ge=0, lt=1, description="EMA of expert x modality counts")
    gaussian_beta: float = Field(0.99, ge=0, lt=1)
    tau: float | None = Field(None, gt=0, description="gaussian temperature; default hidden/2")
    mi_coeff: float = Field(1e-4, ge=0)
    bal_coeff: float = Field(1e-3, ge=0)
    # bin: N_B * sum_k F_k P_k, balance across bins (DESIGN.md); expert: the earlier
    # N_B * sum_e f_e P_e, which does not depend on the bins (kept for comparison).
    bal_form: Literal["bin", "expert"] = "bin"
    detach_scores: bool = True


class FastMMoEConfig(Section):
    """Training-free inference reduction for visual tokens (epruntime.fastmmoe).

    FastMMoE (arXiv 2511.17885): visual tokens use only their top-`vision_topk` experts, and at
    `layers` the visual tokens whose routing distributions are most redundant are pruned (or
    merged) down to `retention`. The same section runs the attention-based baselines (FastV,
    LearnPruner's text-to-vision stage) through the same pruning path, so they compare fairly.
    Applies in eval mode only; training is never changed.
    """

    enabled: bool = False
    # k' for visual tokens: one value for every layer or one per layer; None keeps the model's k.
    vision_topk: int | list[int] | None = Field(None, description="experts per visual token")
    # Which tokens to prune: none (reduced activation only), fastmmoe (routing redundancy),
    # fastv (least attention received), text2vision (least text-to-vision attention), random
    # (a seeded uniform choice: the control).
    policy: Literal["none", "fastmmoe", "fastv", "text2vision", "random"] = "none"
    layers: list[int] = Field([0], description="prune after these decoder layers (0-based)")
    # Fraction of the visual tokens entering each pruning layer that stay (one value or one per
    # entry of `layers`); the count kept is round(retention * visual tokens), same per sample.
    retention: float | list[float] = 0.5
    similarity: Literal["cosine", "js"] = "cosine"  # fastmmoe: routing-distribution similarity
    mode: Literal["drop", "merge"] = "drop"  # merge: a pruned token is averaged into its closest kept

    @field_validator("retention", mode="before")
    @classmethod
    def _finite_retention(cls, value: Any) -> Any:
        # one named line, not pydantic's error per branch of float | list[float]
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"fastmmoe.retention={value!r}: each value must be a finite "
                             "fraction in [0, 1]")
        return value

    @model_validator(mode="after")
    def _per_layer_lists(self) -> "FastMMoEConfig":
        values = self.retention if isinstance(self.retention, list) else [self.retention]
        if any(not 0 <= r <= 1 for r in values):
            raise ValueError(f"fastmmoe.retention={self.retention}: each value must be in [0, 1]")
        if isinstance(self.retention, list) and len(self.retention) != len(self.layers):
            raise ValueError(f"fastmmoe.retention has {len(self.retention)} values for "
                             f"{len(self.layers)} fastmmoe.layers")
        if len(set(self.layers)) != len(self.layers) or any(x < 0 for x in self.layers):
            raise ValueError(f"fastmmoe.layers={self.layers}: expected distinct layer indices >= 0")
        ks = self.vision_topk if isinstance(self.vision_topk, list) else [self.vision_topk]
        if any(k is not None and k < 1 for k in ks):
            raise ValueError(f"fastmmoe.vision_topk={self.vision_topk}: each k' must be >= 1")
        if self.mode == "merge" and self.policy not in ("fastmmoe", "none"):
            # fastv/text2vision rank tokens by attention, which gives no "closest kept token".
            raise ValueError(f"fastmmoe.mode=merge needs fastmmoe.policy=fastmmoe, got "
                             f"{self.policy}")
        return self

    def check_layers(self, num_layers: int) -> None:
        """ValueError unless the per-layer settings fit a model of `num_layers` layers."""
        if isinstance(self.vision_topk, list) and len(self.vision_topk) != num_layers:
            raise ValueError(f"fastmmoe.vision_topk has {len(self.vision_topk)} values for "
                             f"model.num_layers={num_layers}")
        if self.policy != "none" and max(self.layers) >= num_layers:
            raise ValueError(f"fastmmoe.layers={self.layers}: the model has layers "
                             f"0..{num_layers - 1}")

    def vision_topk_at(self, layer: int, k: int) -> int:
        """k' of `layer` (never more than the model's k)."""
        v = self.vision_topk
        if isinstance(v, list):
            v = v[layer]
        return k if v is None else min(v, k)

    def retention_at(self, layer: int) -> float | None:
        """Retention of a pruning layer, None when `layer` does not prune."""
        if self.policy == "none" or layer not in self.layers:
            return None
        r = self.retention
        return r[self.layers.index(layer)] if isinstance(r, list) else r


class ModesConfig(Section):
    """MoDES (arXiv 2511.15690): training-free expert skipping with one threshold per modality
    (epruntime.modes). Within each token's top-k, an expert whose score alpha[layer, modality] x
    routing weight is under the token's modality threshold is not dispatched. `alpha` and the
    calibrated thresholds come from a calibration file (`python -m epruntime.modes.calibrate`);
    without one alpha is 1 (the routing weight alone). Eval mode only; training never changes.
    """

    enabled: bool = False
    calibration: Path | None = Field(None, description="calibration JSON (alpha, thresholds) "
                                     "written by epruntime.modes.calibrate for this checkpoint")
    # None: the calibration file's threshold (0 without a file: nothing skipped).
    text_threshold: float | None = Field(None, description="skip under this score (text tokens)")
    vision_threshold: float | None = Field(None, description="skip under this score (visual)")
    # Calibration (epruntime.modes.calibrate): training samples, their seeded choice, the bound
    # on mean KL(full || skipped) of the answer distributions, threshold grid points per modality.
    calibration_samples: int = Field(256, gt=0)
    calibration_seed: int = 0
    kl_bound: float = Field(0.01, ge=0, description="mean KL bound of the threshold search")
    grid_points: int = Field(32, ge=2, le=1000)

    @field_validator("text_threshold", "vision_threshold")
    @classmethod
    def _threshold_in_range(cls, value: float | None, info) -> float | None:
        # scores are alpha (a share of 1 over the layers) x a routing weight: both in [0, 1]
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"modes.{info.field_name}={value!r}: must be in [0, 1] (a score is "
                             "alpha x routing weight, both in [0, 1]; 0 skips nothing)")
        return value

    @field_validator("calibration", mode="before")
    @classmethod
    def _calibration_given(cls, value: Any) -> Any:
        if value is None:
            return None
        return _non_empty_path("modes.calibration", value,
                               "name a calibration JSON or leave it out (null)")


# ---- learned visual-token compression (issue 17): LearnPruner stage 1, QMoP ----------------------
class VisualBudget(Section):
    """How many visual tokens a learned compressor hands the language model: `tokens` when given,
    else round(budget * P) (at least 1), P the visual tokens the model makes."""

    enabled: bool = False
    budget: float = Field(0.25, gt=0, le=1, description="fraction of the visual tokens kept")
    tokens: int | None = Field(None, ge=1, description="visual tokens kept (overrides budget)")

    def keep(self, num_vision: int) -> int:
        if self.tokens is not None:
            return self.tokens
        return max(1, min(num_vision, round(self.budget * num_vision)))


class LearnPrunerConfig(VisualBudget):
    """LearnPruner (arXiv 2604.23950): a learned scorer after the projector keeps the budget of
    visual tokens (straight-through top-k, trained with the model; epruntime.compress), then
    text-to-vision attention keeps `stage2_retention` of them after a middle decoder layer (the
    token reducer's text2vision policy, eval only)."""

    # Of the kept tokens, this fraction are diversity tokens: score-weighted merges of the
    # tokens the scorer drops, grouped around the dropped tokens least like the kept ones.
    diversity: float = Field(0.25, ge=0, lt=1)
    scorer_hidden: int = Field(32, gt=0, description="width of the scorer MLP")
    stage2: bool = True
    stage2_layer: int | None = Field(None, ge=0, description="default: (num_layers - 1) // 2")
    stage2_retention: float = Field(0.25, ge=0, le=1)


class QMoPConfig(VisualBudget):
    """QMoP (arXiv 2603.21232): pooling, resampler and pruning branches each give the budget of
    visual tokens; a query-guided router (visual mean + question mean) weights them
    (epruntime.compress). At the full budget nothing is compressed: the projector's tokens pass
    through unchanged (the model without QMoP)."""

    resampler_heads: int = Field(4, gt=0)
    router_topk: int = Field(3, ge=1, le=3, description="branches mixed per sample")


def check_visual_compression(cfg: "Config") -> None:
    """ValueError naming the field when learnpruner/qmop do not fit the model."""
    p, m = cfg.model.num_vision_tokens, cfg.model
    for name in ("learnpruner", "qmop"):
        section = getattr(cfg, name)
        if section.enabled and section.tokens is not None and section.tokens > p:
            raise ValueError(f"{name}.tokens={section.tokens} exceeds the {p} visual tokens the "
                             f"model makes ((model.image_size / model.patch_size)^2 = "
                             f"({m.image_size} / {m.patch_size})^2)")
    lp, q = cfg.learnpruner, cfg.qmop
    if lp.enabled and q.enabled:
        raise ValueError("learnpruner.enabled and qmop.enabled are both true: choose one "
                         "visual-token compressor")
    if q.enabled and m.hidden_size % q.resampler_heads:
        raise ValueError(f"qmop.resampler_heads={q.resampler_heads} does not divide "
                         f"model.hidden_size={m.hidden_size}")
    if lp.enabled and lp.stage2:
        if lp.stage2_layer is not None and lp.stage2_layer >= m.num_layers:
            raise ValueError(f"learnpruner.stage2_layer={lp.stage2_layer}: the model has layers "
                             f"0..{m.num_layers - 1}")
        if cfg.fastmmoe.enabled:
            raise ValueError("learnpruner.stage2=true runs text-to-vision pruning through the "
                             "token reducer: leave fastmmoe.enabled=false (or set "
                             "learnpruner.stage2=false)")


class DispatchConfig(Section):
    # alltoall: megatron-core's MoEAlltoAllTokenDispatcher (one row per (token, expert) pair,
    # contiguous placement only). dedup: one row per (token, destination rank). dedup-hier: one
    # row per (token, destination node) across nodes, forwarded inside the node.
    kind: Literal["alltoall", "dedup", "dedup-hier"] = "alltoall"
    # contiguous: expert e on rank e // n_local. bins: SMoES bin k on EP rank k, re-placed (experts
    # and their optimizer state migrated) whenever the bins change. file:PATH: the per-layer
    # placements of a placement file (`python -m epruntime.plan`), migrated to at start.
    placement: str = "contiguous"
    # EP ranks per node; None takes it from torchrun (LOCAL_WORLD_SIZE).
    ranks_per_node: int | None = Field(None, ge=1)
    # Count exact bytes of every dispatch and combine (summary.json `comm`).
    ledger: bool = True
    # epruntime.kernels backend of the dedup dispatcher's gather/combine and of token pruning's
    # compaction: auto = cuda for CUDA tensors, else the C++ cpu kernels, else torch.
    kernels: Literal["auto", "torch", "cpu", "triton", "cuda"] = "auto"
    transport: Literal["pg", "shm"] = Field(
        "pg", description="how the dedup dispatchers' row all-to-alls move bytes: pg = the process "
        "group's all_to_all_single; shm = shared memory between ranks of one node "
        "(epruntime.transport.shm), the process group only to other nodes")
    timing: Literal["off", "on", "barrier"] = Field(
        "off", description="time every dispatch and combine phase per layer and rank, forward and "
        "backward (summary.json comm_time, Prometheus, epruntime.dispatch.timing): on = barrier-"
        "free (the wait for the slowest peer is the split-count exchange, or the shm transport's "
        "arrival stamps); barrier = a timed 1-element all_reduce before every collective as the "
        "wait (one extra collective per phase)")
    overlap: bool = Field(
        False, description="dedup and dedup-hier: start the last hop's all-to-all asynchronously "
        "and run this rank's own rows through its experts while the remote rows travel, then the "
        "remote rows (epruntime.dispatch.overlap); results agree with overlap off to fp32 "
        "rounding (the experts run as two calls)")
    shm_mib: int = Field(
        64, ge=1, description="MiB of /dev/shm receive buffer per rank with transport=shm; each "
        "of the node's other ranks gets shm_mib / (2 * (ranks_per_node - 1)) MiB of it "
        "(double-buffered), the largest message one rank can send another per all-to-all")

    @field_validator("timing", mode="before")
    @classmethod
    def _timing_yaml_bool(cls, value: Any) -> Any:
        """YAML reads a bare on/off as a bool: take it as the mode it spells."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("placement")
    @classmethod
    def _placement_spec(cls, value: str) -> str:
        if value in ("contiguous", "bins") or (value.startswith("file:") and value[5:].strip()):
            return value
        raise ValueError(f"dispatch.placement={value!r}: expected contiguous, bins or file:PATH "
                         "(a placement file written by python -m epruntime.plan)")

    @model_validator(mode="after")
    def _transport_fits_kind(self) -> "DispatchConfig":
        if self.overlap and self.kind == "alltoall":
            raise ValueError("dispatch.overlap=true needs dispatch.kind=dedup or dedup-hier: "
                             "megatron-core's alltoall dispatcher runs its own collectives")
        if self.transport == "shm" and self.kind == "alltoall":
            raise ValueError(
                "dispatch.transport=shm needs dispatch.kind=dedup or dedup-hier: megatron-core's "
                "alltoall dispatcher runs its own collectives on the process group")
        return self


class MetricsConfig(Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9400, gt=0, lt=65536)
    # Keep serving /metrics this long after the run so the final values get scraped.
    linger_s: float = Field(0.0, ge=0, description="seconds to keep /metrics up after the run")


class TraceConfig(Section):
    """Routing traces for the scale simulator (epruntime.traces, epruntime.simulate)."""

    enabled: bool = False
    sample_rate: float = Field(1.0, gt=0, le=1, description="fraction of tokens kept (seeded)")
    path: Path | None = Field(None, description="default: <train/infer output_dir>/traces")
    format: Literal["npz", "megatron-jsonl"] = Field(
        "npz", description="npz: epruntime's rank*.npz; megatron-jsonl: rank*.jsonl records in "
        "megatron-core 0.19's router-trace schema (plus token_idx), read by epruntime.plan and "
        "epruntime.simulate alike")

    @field_validator("path", mode="before")
    @classmethod
    def _path_given(cls, value: Any) -> Any:
        if value is None:  # the default: <train/infer output_dir>/traces
            return None
        return _non_empty_path("trace.path", value, "leave it out (null) for "
                               "<train/infer output_dir>/traces, or name a directory")


class Config(Section):
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    infer: InferConfig = InferConfig()
    smoes: SmoesConfig = SmoesConfig()
    fastmmoe: FastMMoEConfig = FastMMoEConfig()
    modes: ModesConfig = ModesConfig()
    learnpruner: LearnPrunerConfig = LearnPrunerConfig()
    qmop: QMoPConfig = QMoPConfig()
    dispatch: DispatchConfig = DispatchConfig()
    metrics: MetricsConfig = MetricsConfig()
    trace: TraceConfig = TraceConfig()
    # Validate every batch at the model boundary (shapes, dtypes, token and label ranges, finite
    # pixels): a few min/max/isfinite passes, each a host sync. On by default; switch it off for
    # speed once the data pipeline is trusted (--set debug_checks=false).
    debug_checks: bool = True

    @model_validator(mode="after")
    def _experts_split_over_ep(self) -> "Config":
        # A placement file may hold copies of hot experts, so that EP need not divide the
        # experts (EP may exceed them): the Engine checks the file's slots against EP.
        replicas_allowed = self.dispatch.placement.startswith("file:")
        if self.model.num_experts % self.parallel.ep_size and not replicas_allowed:
            raise ValueError(
                f"parallel.ep_size={self.parallel.ep_size} does not divide "
                f"model.num_experts={self.model.num_experts} (unless dispatch.placement=file:PATH"
                " names a placement with copies of experts)"
            )
        if self.model.num_experts % self.num_bins and (self.smoes.enabled
                                                       or not replicas_allowed):
            raise ValueError(
                f"smoes.num_bins={self.num_bins} does not divide "
                f"model.num_experts={self.model.num_experts}"
            )
        self.fastmmoe.check_layers(self.model.num_layers)
        check_visual_compression(self)
        d = self.dispatch
        pruned_dense = [x for x in self.fastmmoe.layers
                        if x < self.model.num_layers and not self.model.moe_layer_pattern[x]]
        if self.fastmmoe.enabled and self.fastmmoe.policy != "none" and pruned_dense:
            raise ValueError(f"fastmmoe.layers={self.fastmmoe.layers}: layer(s) {pruned_dense} "
                             f"are dense (model.moe_layer_freq={self.model.moe_layer_freq}); "
                             "routing-aware pruning needs an MoE layer's router")
        if d.kind == "alltoall" and d.placement != "contiguous":
            raise ValueError(f"dispatch.placement={d.placement} needs dispatch.kind=dedup or "
                             "dedup-hier (megatron-core's alltoall dispatcher assumes contiguous "
                             "placement)")
        if d.placement == "bins":
            if not self.smoes.enabled:
                raise ValueError("dispatch.placement=bins needs smoes.enabled=true (bins come "
                                 "from the SMoES router)")
            if self.num_bins != self.parallel.ep_size:
                raise ValueError(f"dispatch.placement=bins puts bin k on EP rank k: smoes.num_bins"
                                 f"={self.num_bins} must equal parallel.ep_size="
                                 f"{self.parallel.ep_size}")
        if self.metrics.enabled and d.ranks_per_node is not None:
            # the same check as check_metrics_port, with the node size the config states
            message = _port_span_message(self.metrics.port, d.ranks_per_node,
                                         "dispatch.ranks_per_node")
            if message:
                raise ValueError(message)
        return self

    @model_validator(mode="after")
    def _router_groups_stay_whole(self) -> "Config":
        # SMoES bins are cut by modality preference, expert by expert: they would split groups.
        if self.model.moe_router_num_groups is not None and self.dispatch.placement == "bins":
            raise ValueError(f"dispatch.placement=bins with model.moe_router_num_groups="
                             f"{self.model.moe_router_num_groups}: SMoES bins move experts one "
                             "by one and would split the routing groups; use "
                             "dispatch.placement=contiguous or a placement file that keeps the "
                             "groups whole")
        return self

    @model_validator(mode="after")
    def _eval_split_given(self) -> "Config":
        if self.data.dataset == "jsonl" and self.data.eval_jsonl is None and self.train.eval_at_end:
            raise ValueError("data.dataset=jsonl with train.eval_at_end=true needs "
                             "data.eval_jsonl (the split to evaluate on); name one or set "
                             "train.eval_at_end=false")
        return self

    @property
    def num_bins(self) -> int:
        """SMoES bins: one per EP rank unless smoes.num_bins says otherwise."""
        return self.smoes.num_bins or self.parallel.ep_size

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: ranks compare it to prove they loaded the same config."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


def ep_ranks_per_node(cfg: Config, local_world_size: int) -> int:
    """How many ranks of one EP group share a node (placement's and the ledger's node size).

    EP groups are runs of `ep_size` consecutive ranks (megatron-core with TP = PP = 1), and
    torchrun numbers ranks node by node, so a group spans ep_size / ranks_per_node nodes.
    """
    ep = cfg.parallel.ep_size
    per_node = cfg.dispatch.ranks_per_node or local_world_size
    if per_node >= ep:
        if per_node % ep:
            raise ConfigError(f"parallel.ep_size={ep} does not divide the {per_node} ranks per "
                              "node (an EP group would straddle nodes unevenly)")
        return ep
    if ep % per_node:
        raise ConfigError(f"{per_node} ranks per node (dispatch.ranks_per_node or torchrun's "
                          f"LOCAL_WORLD_SIZE) does not divide parallel.ep_size={ep}")
    return per_node


def check_world(cfg: Config, world_size: int) -> int:
    """Data-parallel size for this world; a named error when EP does not fit it.

    As in megatron-core, expert parallelism is carved out of data parallelism: with TP = PP = 1
    every rank is a data-parallel rank of the dense layers, and EP groups of `ep_size` ranks
    shard the experts.
    """
    ep = cfg.parallel.ep_size
    if world_size % ep:
        raise ConfigError(
            f"parallel.ep_size={ep} does not divide the world size {world_size} "
            f"(number of ranks torchrun started)"
        )
    if cfg.data.global_batch_size % world_size:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} is not divisible by the "
            f"data-parallel size {world_size}"
        )
    return world_size


def check_metrics_port(cfg: Config, local_world_size: int) -> None:
    """ConfigError unless every local rank's /metrics port (metrics.port + local_rank) is valid.

    The number of local ranks is torchrun's LOCAL_WORLD_SIZE, known only at launch: call this
    before any process group exists. A no-op unless metrics.enabled (nothing binds otherwise).
    """
    if not cfg.metrics.enabled:
        return
    message = _port_span_message(cfg.metrics.port, local_world_size, "LOCAL_WORLD_SIZE")
    if message:
        raise ConfigError(message)


def check_backend_available(cfg: Config) -> None:
    """ConfigError when parallel.backend=nccl is asked for on a host where torch sees no CUDA GPU
    (else torch.cuda.set_device fails with an AttributeError or 'no CUDA GPUs are available').
    Imports torch, so call it at process-group time, not at config load."""
    if cfg.parallel.backend != "nccl":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA GPUs, and torch sees none "
                          "(torch.cuda.is_available() is False); use parallel.backend=gloo or "
                          "auto")


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping; str() is `line N: duplicate key ...`."""

    def __init__(self, key: str, line: int, first_line: int, section: str):
        where = f"in {section}" if section else "at the top level"
        super().__init__(f"line {line}: duplicate key {key!r} ({where}; first at line "
                         f"{first_line}); remove one of them")
        self.key, self.line, self.first_line, self.section = key, line, first_line, section


_MERGE_TAG = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that raises DuplicateKeyError on a key given twice in one mapping, where
    SafeLoader keeps the last value without a word. `<<` merge keys may still be overridden."""

    def construct_document(self, node):
        _check_unique_keys(node, "", set())
        return super().construct_document(node)


def _check_unique_keys(node: yaml.Node, section: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            child = section
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                key = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise DuplicateKeyError(key_node.value, line, first[key], section)
                first[key] = line
                child = f"{section}.{key_node.value}" if section else key_node.value
            _check_unique_keys(value_node, child, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{section}[{i}]", seen)


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 4 -> int, 1e-3 -> float, true -> bool, null -> None."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of the raw (not yet validated) config dict with `a.b=value` overrides applied."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE with a dotted key, got {item!r}")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _format_validation_error(err: ValidationError) -> str:
    """One line per error; a single error (the usual case) is one line in all."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key")
        elif e["type"] == "value_error" and "error" in e.get("ctx", {}):
            # our validators' messages name their fields (and the value) themselves
            text = str(e["ctx"]["error"])
            lines.append(text if field == "config" or field in text else f"{field}: {text}")
        else:
            got = e.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"{field}: {e['msg']}{got_text}")
    if len(lines) == 1:
        return f"invalid config: {lines[0]}"
    return "invalid config:\n  " + "\n  ".join(lines)


def config_from_dict(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or the defaults when path is None), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
        except DuplicateKeyError as err:
            raise ConfigError(f"--config {path}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: not valid YAML: {err}") from None
        if raw is None:  # empty, only comments, or `null`
            raise ConfigError(f"--config {path}: the file is empty (expected sections such as "
                              "model:, parallel:, train:)")
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(raw, overrides or []))
