"""Time of one MoE layer's all-to-alls from its traffic: pure functions of [R, R] byte matrices.

Model (alpha-beta per tier, the slowest rank sets the time):
- Rank r's time on a tier is its bytes on that tier / the tier's bandwidth, plus the per-message
  cost for every non-empty message. On GPUs a rank's send and receive sides run at once
  (full-duplex links): it takes the larger. On a CPU host (`full_duplex=False`) both are copies
  its own core makes (shm: memcpy in and out; gloo: the socket copies), so they add up; the
  bandwidth, fitted on uniform rows where both sides are equal, is per direction: the time is
  the mean of the two sides. Intra-node pairs use the NVLink tier (`intra_bandwidth`), pairs
  across nodes the rank's NIC (`inter_bandwidth`); the diagonal (a rank's own rows) is free.
- Tiers: on GPUs NVLink and the NIC are separate engines, so a rank takes max(intra, inter);
  on a CPU host they share one path (loopback TCP, memcpy), so they add up.
- A collective ends when its slowest rank ends, plus a fixed latency (launch, sync, counts).
- Sequential collectives (epruntime's and megatron-core's dispatchers: one all-to-all after
  another) add up. A pipelined kernel (DeepEP's normal kernels: RDMA and NVLink forwarding
  run at once) pays one latency and the slowest rank's max over tiers of all its hops' bytes.
- CPU presets with `cores`: R ranks on C < R cores each get C/R of a core, so bandwidth
  shrinks by C/R and fixed costs grow by R/C (a waiting rank must be scheduled again).

Shapes: bytes_RR [R, R] (src, dst) bytes of one collective; R = EP size; ranks are numbered
node-major (rank // ranks_per_node is the node), as `epruntime.placement.Placement` numbers them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from epruntime.scale.links import LinkPreset

__all__ = ["collective_seconds", "phase_seconds", "predict_phase_seconds", "rank_tier_seconds"]


def _check(bytes_RR: Tensor, ranks_per_node: int) -> int:
    if not isinstance(bytes_RR, Tensor) or bytes_RR.dim() != 2 \
            or bytes_RR.shape[0] != bytes_RR.shape[1]:
        raise ValueError(f"traffic must be a square [R, R] tensor of bytes, got "
                         f"{getattr(bytes_RR, 'shape', type(bytes_RR))}")
    r = bytes_RR.shape[0]
    if ranks_per_node < 1 or r % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} must divide the {r} ranks")
    if bool((bytes_RR < 0).any()):
        raise ValueError("traffic bytes must be >= 0")
    return r


def _oversubscription(preset: LinkPreset, ranks_per_node: int) -> float:
    """>= 1: how many ranks share one core of the host (CPU presets), else 1."""
    if preset.cores is None:
        return 1.0
    return max(1.0, ranks_per_node / preset.cores)


def rank_tier_seconds(bytes_RR: Tensor, ranks_per_node: int, preset: LinkPreset
                      ) -> tuple[Tensor, Tensor]:
    """(intra_R, inter_R) float64 [R]: each rank's seconds on the NVLink tier and on its NIC,
    the larger of its send side (row) and receive side (column), without the fixed latency."""
    r = _check(bytes_RR, ranks_per_node)
    node_R = torch.arange(r) // ranks_per_node
    off_diag = ~torch.eye(r, dtype=torch.bool)
    intra_RR = off_diag & (node_R[:, None] == node_R[None, :])
    inter_RR = node_R[:, None] != node_R[None, :]
    share = _oversubscription(preset, ranks_per_node)
    b = bytes_RR.double()
    out = []
    for mask, bandwidth in ((intra_RR, preset.intra_bandwidth), (inter_RR, preset.inter_bandwidth)):
        sides = []
        for side in (b, b.t()):  # rows: what a rank sends; columns: what it receives
            msgs = ((side > 0) & mask).sum(1).double()
            sides.append((side * mask).sum(1) * share / bandwidth
                         + msgs * preset.message_latency * share)
        out.append(torch.maximum(*sides) if preset.full_duplex else (sides[0] + sides[1]) / 2)
    return out[0], out[1]


def _moves(bytes_RR: Tensor) -> bool:
    """Whether any rank sends another rank a byte (a rank's own rows stay in its memory)."""
    off_diag = ~torch.eye(bytes_RR.shape[0], dtype=torch.bool, device=bytes_RR.device)
    return bool((bytes_RR[off_diag] > 0).any())


def _combine_tiers(intra_R: Tensor, inter_R: Tensor, preset: LinkPreset) -> Tensor:
    return torch.maximum(intra_R, inter_R) if preset.concurrent_tiers else intra_R + inter_R


def collective_seconds(bytes_RR: Tensor, ranks_per_node: int, preset: LinkPreset,
                       phase: str = "dispatch") -> float:
    """Seconds of one all-to-all: the preset's latency plus its slowest rank (0 if no bytes)."""
    intra_R, inter_R = rank_tier_seconds(bytes_RR, ranks_per_node, preset)
    if not _moves(bytes_RR):
        return 0.0
    return _latency(preset, phase, ranks_per_node) \
        + float(_combine_tiers(intra_R, inter_R, preset).max())


def _latency(preset: LinkPreset, phase: str, ranks_per_node: int) -> float:
    return preset.phase_latency(phase) * _oversubscription(preset, ranks_per_node)


def phase_seconds(collectives: list[Tensor], ranks_per_node: int, preset: LinkPreset,
                  phase: str = "dispatch", pipelined: bool = False) -> float:
    """Seconds of one phase made of several all-to-alls (each [R, R] bytes).

    pipelined=False: they run one after another (sum). pipelined=True: one kernel moves them
    all at once (DeepEP's normal kernels): one latency, and each rank's tiers carry the bytes of
    every hop, the slowest rank's slowest tier setting the time.
    """
    if not collectives:
        return 0.0
    if not pipelined:
        return sum(collective_seconds(c, ranks_per_node, preset, phase) for c in collectives)
    intra_R = inter_R = None
    for c in collectives:
        a, e = rank_tier_seconds(c, ranks_per_node, preset)
        intra_R = a if intra_R is None else intra_R + a
        inter_R = e if inter_R is None else inter_R + e
    if not any(_moves(c) for c in collectives):
        return 0.0
    return _latency(preset, phase, ranks_per_node) \
        + float(_combine_tiers(intra_R, inter_R, preset).max())


def predict_phase_seconds(traffic_bytes: Tensor, preset: LinkPreset | str,
                          ranks_per_node: int | None = None,
                          combine_bytes: Tensor | None = None) -> dict[str, float]:
    """Predicted seconds of one dispatch and one combine all-to-all of a layer.

    traffic_bytes [ep, ep]: dispatch bytes per (src, dst) rank, e.g. a CommLedger's per-layer
    matrix or a simulated layer's. combine_bytes [ep, ep]: the combine's (default: the dispatch
    matrix transposed, every row sent back). ranks_per_node: default all ranks on one node.
    Returns {"dispatch", "combine", "total", "slowest_rank_dispatch"} (seconds; the last is
    the rank index whose dispatch time sets the collective's), for comparing with measured
    per-phase times of the ledger.
    """
    from epruntime.scale.links import get_preset

    preset = get_preset(preset) if isinstance(preset, str) else preset
    rpn = ranks_per_node or traffic_bytes.shape[0]
    combine = traffic_bytes.t() if combine_bytes is None else combine_bytes
    d = collective_seconds(traffic_bytes, rpn, preset, "dispatch")
    c = collective_seconds(combine, rpn, preset, "combine")
    intra_R, inter_R = rank_tier_seconds(traffic_bytes, rpn, preset)
    slowest = int(_combine_tiers(intra_R, inter_R, preset).argmax())
    return {"dispatch": d, "combine": c, "total": d + c, "slowest_rank_dispatch": slowest}
