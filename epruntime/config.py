"""One typed config tree for every entry point, loaded from YAML with `--set a.b=value` overrides.

Every section forbids unknown keys, so a typo is an error that names the field, raised before any
process group exists.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot run; the message names the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """A small MoE-VLM: patch projector -> megatron-core GPTModel with MoE MLPs in every layer."""

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
        return self

    @property
    def num_vision_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ParallelConfig(Section):
    ep_size: int = Field(1, gt=0, description="expert-parallel ranks; data parallel is the rest")
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = Field(300.0, gt=0, description="collective timeout in seconds")
    threads_per_rank: int = Field(1, gt=0, description="torch intra-op threads per CPU rank")


class DataConfig(Section):
    dataset: Literal["easy-vqa", "synthetic"] = "easy-vqa"
    global_batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    max_train_items: int | None = Field(None, gt=0, description="first N training questions")
    max_eval_items: int | None = Field(None, gt=0, description="first N test questions")
    synthetic_items: int = Field(4096, gt=0)
    synthetic_question_len: int = Field(8, gt=1)


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
    log_interval: int = Field(10, gt=0)
    resume: bool = True
    eval_at_end: bool = True
    progress: bool = True


class InferConfig(Section):
    output_dir: Path = Path("runs/infer")


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
    # fastv (least attention received), text2vision (least text-to-vision attention).
    policy: Literal["none", "fastmmoe", "fastv", "text2vision"] = "none"
    layers: list[int] = Field([0], description="prune after these decoder layers (0-based)")
    # Fraction of the visual tokens entering each pruning layer that stay (one value or one per
    # entry of `layers`); the count kept is round(retention * visual tokens), same per sample.
    retention: float | list[float] = 0.5
    similarity: Literal["cosine", "js"] = "cosine"  # fastmmoe: routing-distribution similarity
    mode: Literal["drop", "merge"] = "drop"  # merge: a pruned token is averaged into its closest kept

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


class DispatchConfig(Section):
    # alltoall: megatron-core's MoEAlltoAllTokenDispatcher (one row per (token, expert) pair,
    # contiguous placement only). dedup: one row per (token, destination rank). dedup-hier: one
    # row per (token, destination node) across nodes, forwarded inside the node.
    kind: Literal["alltoall", "dedup", "dedup-hier"] = "alltoall"
    # contiguous: expert e on rank e // n_local. bins: SMoES bin k on EP rank k, re-placed (experts
    # and their optimizer state migrated) whenever the bins change.
    placement: Literal["contiguous", "bins"] = "contiguous"
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
    shm_mib: int = Field(
        64, ge=1, description="MiB of /dev/shm receive buffer per rank with transport=shm; each "
        "of the node's other ranks gets shm_mib / (2 * (ranks_per_node - 1)) MiB of it "
        "(double-buffered), the largest message one rank can send another per all-to-all")

    @model_validator(mode="after")
    def _transport_fits_kind(self) -> "DispatchConfig":
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


class Config(Section):
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    infer: InferConfig = InferConfig()
    smoes: SmoesConfig = SmoesConfig()
    fastmmoe: FastMMoEConfig = FastMMoEConfig()
    dispatch: DispatchConfig = DispatchConfig()
    metrics: MetricsConfig = MetricsConfig()
    trace: TraceConfig = TraceConfig()

    @model_validator(mode="after")
    def _experts_split_over_ep(self) -> "Config":
        if self.model.num_experts % self.parallel.ep_size:
            raise ValueError(
                f"parallel.ep_size={self.parallel.ep_size} does not divide "
                f"model.num_experts={self.model.num_experts}"
            )
        if self.model.num_experts % self.num_bins:
            raise ValueError(
                f"smoes.num_bins={self.num_bins} does not divide "
                f"model.num_experts={self.model.num_experts}"
            )
        self.fastmmoe.check_layers(self.model.num_layers)
        d = self.dispatch
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
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key")
        else:
            got = e.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"{field}: {e['msg']}{got_text}")
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
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(raw, overrides or []))
