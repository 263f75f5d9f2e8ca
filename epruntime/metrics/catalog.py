"""Every metric epruntime exports: name, type, labels, meaning. The exporter builds its metrics
from this table, and the tests and the Grafana generator read it, so the three cannot drift.

Conventions (Prometheus): `epruntime_` prefix, base units in the name (`_seconds`, `_bytes`,
`_tokens`, `_ratio`), `_total` on counters. Every series carries `rank` (global rank). Counters
count this rank's work since the process started; gauges hold the last step's value.

SMoES metrics (`epruntime_smoes_*`) are always exported so dashboards keep working; they stay 0
when `smoes.enabled` is false. `vision_tokens_kept_ratio` and `flops_ratio` come from the last
evaluation (FastMMoE-style reduction, `fastmmoe` config) and are 1 before one or without it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

MetricType = Literal["counter", "gauge", "histogram"]


class MetricSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    type: MetricType
    labels: tuple[str, ...]
    help: str

    @property
    def series(self) -> str:
        """A series name that exists once the metric is exported (histograms: `_count`)."""
        return f"{self.name}_count" if self.type == "histogram" else self.name


def _m(name: str, type_: MetricType, labels: tuple[str, ...], help_: str) -> MetricSpec:
    return MetricSpec(name=name, type=type_, labels=("rank", *labels), help=help_)


LAYER, EXPERT = ("layer",), ("layer", "expert")

METRICS: tuple[MetricSpec, ...] = (
    # -- throughput and optimisation
    _m("epruntime_tokens_processed_total", "counter", (),
       "Tokens (vision + text) this rank pushed through the model in training steps."),
    _m("epruntime_tokens_per_second", "gauge", (),
       "This rank's tokens per second in the last training step (infer: over the "
       "evaluation)."),
    _m("epruntime_step_duration_seconds", "histogram", (),
       "Wall time of one training step (forward, backward, optimizer, rebin/migration)."),
    _m("epruntime_train_step", "gauge", (), "Training steps completed."),
    _m("epruntime_loss", "gauge", (), "Global-batch mean cross-entropy of the last step."),
    _m("epruntime_grad_norm", "gauge", (), "Gradient norm of the last step (before clipping)."),
    _m("epruntime_learning_rate", "gauge", (), "Learning rate of the last step."),
    # -- communication (CommLedger, forward passes; cross-rank cells of this rank's sends)
    _m("epruntime_alltoall_bytes_total", "counter", ("layer", "phase", "locality"),
       "Bytes (payload + routing metadata) this rank sent to other EP ranks in the MoE "
       "all-to-alls; phase dispatch|combine, locality intra_node|inter_node."),
    _m("epruntime_alltoall_rows_sent_total", "counter", LAYER,
       "Rows this rank's dispatcher sent to other EP ranks (dispatch phase)."),
    _m("epruntime_alltoall_expert_rows_total", "counter", LAYER,
       "Rows a per-expert dispatcher would send for the same routing: (token, remote expert) "
       "pairs."),
    _m("epruntime_alltoall_floor_rows_total", "counter", LAYER,
       "Rows no dispatcher can go below: distinct (token, remote EP rank) pairs."),
    _m("epruntime_alltoall_pair_bytes_total", "counter", ("src", "dst"),
       "Bytes (payload + metadata, dispatch + combine, all layers) EP rank src (this rank) sent "
       "to EP rank dst in the MoE all-to-alls; src == dst is local and not counted."),
    # -- EP load balance (epruntime.balance) of the last training step, over ALL ranks' routing
    # (one all-reduce of [layers, EP ranks] per step); every rank exports the same values.
    _m("epruntime_ep_balancedness_ratio", "gauge", LAYER,
       "mean/max over EP ranks of the (token, expert) rows each rank's experts received in "
       "the last training step, all ranks' tokens; 1 is perfectly balanced."),
    _m("epruntime_ep_overload_ratio", "gauge", LAYER,
       "Busiest EP rank's (token, expert) rows over the mean rank's in the last training step "
       "(1: even; every rank waits for the busiest)."),
    _m("epruntime_ep_balancedness_over_layers_ratio", "gauge", ("stat",),
       "epruntime_ep_balancedness_ratio over the MoE layers: stat p50|p95|min (and p5, the "
       "planner's column)."),
    # -- communication time (PhaseTimer, dispatch.timing=on|barrier; empty while it is off)
    _m("epruntime_alltoall_phase_seconds", "histogram", ("direction", "phase", "part"),
       "Seconds of one training step this rank spent in one part of the MoE dispatch/combine "
       "phases, all layers: direction forward|backward, phase dispatch|combine, part "
       "layout|wait|permute|collective|combine (wait: for the slowest peer)."),
    _m("epruntime_alltoall_seconds_total", "counter", ("layer", "direction", "phase"),
       "Seconds this rank spent in each MoE layer's dispatch/combine phases (all parts)."),
    _m("epruntime_moe_tokens_total", "counter", ("layer", "modality"),
       "Tokens entering each MoE layer on this rank, by modality text|vision."),
    # -- routing
    _m("epruntime_expert_load_tokens", "gauge", EXPERT,
       "Tokens routed to each (global) expert from this rank in the last training step "
       "(after an evaluation: over that evaluation)."),
    _m("epruntime_expert_balancedness_ratio", "gauge", LAYER,
       "mean/max of the per-EP-rank load (under the current placement) of this rank's routing "
       "in the last step; 1 is perfectly balanced (all ranks' routing: "
       "epruntime_ep_balancedness_ratio)."),
    _m("epruntime_smoes_msi_ratio", "gauge", LAYER,
       "SMoES modality specialization index over bins in the last step (0 when SMoES is off)."),
    _m("epruntime_smoes_bin_load_tokens", "gauge", ("layer", "bin"),
       "Tokens routed to each SMoES bin in the last step (0 when SMoES is off)."),
    # -- visual-token reduction (epruntime.fastmmoe), from the last evaluation
    _m("epruntime_vision_tokens_kept_ratio", "gauge", (),
       "Fraction of vision tokens that reached the output in the last evaluation (token "
       "pruning; 1: full model)."),
    _m("epruntime_flops_ratio", "gauge", (),
       "Analytic FLOPs of the last evaluation relative to the full model (1: full model)."),
    # -- events
    _m("epruntime_checkpoint_events_total", "counter", (), "Checkpoints saved."),
    _m("epruntime_skipped_steps_total", "counter", (),
       "Training steps skipped for a non-finite loss or gradient norm "
       "(train.skip_nonfinite_steps)."),
    _m("epruntime_migration_events_total", "counter", (),
       "Expert migrations (placement changes) this rank took part in."),
    _m("epruntime_migration_bytes_total", "counter", (),
       "Bytes of expert weights and optimizer state this rank sent in migrations."),
    _m("epruntime_migration_seconds_total", "counter", (), "Seconds spent migrating experts."),
    # -- evaluation (train's end-of-run eval, or infer)
    _m("epruntime_eval_accuracy_ratio", "gauge", (), "Accuracy of the last evaluation."),
    _m("epruntime_eval_loss", "gauge", (), "Mean cross-entropy of the last evaluation."),
    _m("epruntime_eval_items", "gauge", (), "Items in the last evaluation."),
)

BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}

PHASES = ("dispatch", "combine")
LOCALITIES = ("intra_node", "inter_node")
MODALITIES = ("text", "vision")
# Step times on CPU ranks range from tens of ms (tiny) to minutes (large models).
STEP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# One part of the all-to-all phases per step: from a few microseconds (an empty layout on a GPU)
# to seconds (a large collective on CPU ranks).
COMM_BUCKETS_S = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BUCKETS_S = {"epruntime_alltoall_phase_seconds": COMM_BUCKETS_S}
DIRECTIONS = ("forward", "backward")
BALANCE_STATS = ("p5", "p50", "p95", "min")  # keys balancedness_<stat> of balance.over_layers
PARTS = ("layout", "wait", "permute", "collective", "combine")  # epruntime.dispatch.timing.PARTS
