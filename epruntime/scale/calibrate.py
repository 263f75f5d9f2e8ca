"""Replay published all-to-all measurements through the time model (`bench.py calibration`).

Each published row is re-created as the benchmark that measured it did: the same tokens per
rank, hidden size, top-k, expert count and routing generator (DeepEP's tests draw |N(0,1)|+1
scores; the normal-kernel test limits each token to min(nodes, 4) node groups), the same byte
accounting (DeepEP's "logical" bandwidth counts every (token, node) pair or received row,
the rank's own included; nccl-tests' busbw is algbw x (n-1)/n), and the rows every rank sends
come from this project's row plan (`epruntime.dispatch.plan`): DeepEP's normal kernels are
node dedup (RDMA to the same-lane GPU of each node, then NVLink forwarding, pipelined), its
low-latency kernels one row per (token, expert) like megatron-core's dispatcher.

Rows marked split="fit" were used to choose a preset parameter (see `links.PRESETS[...].fitted`);
split="score" rows were not.
"""

from __future__ import annotations

import statistics

import torch

from epruntime.dispatch.plan import routing_map_from_topk, row_plan
from epruntime.placement import Placement
from epruntime.scale.links import SOURCES, LinkPreset, get_preset
from epruntime.scale.timemodel import phase_seconds

__all__ = ["PUBLISHED", "deepep_routing", "fit_ll_latencies", "fp8_row_bytes", "replay",
           "replay_all"]

HIDDEN = 7168
TOPK = 8
NUM_EXPERTS = 256
GPUS_PER_NODE = 8
BF16_ROW = HIDDEN * 2


def fp8_row_bytes(hidden: int = HIDDEN) -> int:
    """FP8 payload plus one float32 scale per 128 channels (DeepEP's FP8 dispatch format)."""
    return hidden + hidden // 128 * 4


# LL dispatch messages also carry a 16-byte token header in DeepEP's test accounting.
LL_FP8_ROW = fp8_row_bytes() + 16

_N, _LL = SOURCES["deepep-v1"] + ", normal kernels", SOURCES["deepep-v1"] + ", low-latency kernels"
# (kind, ep, phase, metric, published, split, source)
PUBLISHED: list[dict] = [
    dict(kind="normal", ep=8, phase="dispatch", metric="GB/s", published=153, split="fit", source=_N),
    dict(kind="normal", ep=8, phase="combine", metric="GB/s", published=158, split="score", source=_N),
    dict(kind="normal", ep=16, phase="dispatch", metric="GB/s", published=43, split="score", source=_N),
    dict(kind="normal", ep=16, phase="combine", metric="GB/s", published=43, split="score", source=_N),
    dict(kind="normal", ep=32, phase="dispatch", metric="GB/s", published=58, split="score", source=_N),
    dict(kind="normal", ep=32, phase="combine", metric="GB/s", published=57, split="score", source=_N),
    dict(kind="normal", ep=64, phase="dispatch", metric="GB/s", published=51, split="score", source=_N),
    dict(kind="normal", ep=64, phase="combine", metric="GB/s", published=50, split="score", source=_N),
] + [
    dict(kind="low-latency", ep=ep, phase=phase, metric="us", published=us,
         split="fit" if ep in (8, 32, 128) else "score", source=_LL)
    for ep, d_us, c_us in [(8, 77, 114), (16, 118, 195), (32, 155, 273), (64, 173, 314),
                           (128, 192, 369), (256, 194, 360)]
    for phase, us in (("dispatch", d_us), ("combine", c_us))
] + [
    dict(kind="nccl", ep=8, phase="alltoall", metric="busbw GB/s", published=370, split="score",
         source=SOURCES["nccl-tests-212"]),
] + [
    dict(kind="nccl", ep=8 * n, phase="alltoall", metric="busbw GB/s",
         published=round(48 * n / (n - 1), 1), split="score",
         source=SOURCES["nccl-tests-130"] + "; with 48 GB/s per NIC from " + SOURCES["nccl-tests-267"])
    for n in (2, 4, 8)
]


def deepep_routing(tokens_per_rank: int, ep: int, topk_groups: int | None, seed: int = 0,
                   num_experts: int = NUM_EXPERTS, topk: int = TOPK) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts_NK [ep*T, K], source_N [ep*T]) as DeepEP's tests draw them: scores |N(0,1)|+1,
    optionally limited to the `topk_groups` node groups of highest max score, then top-k."""
    gen = torch.Generator().manual_seed(seed)
    n = tokens_per_rank * ep
    scores = torch.randn(n, num_experts, generator=gen).abs() + 1
    nodes = max(1, ep // GPUS_PER_NODE)
    if topk_groups is not None and topk_groups < nodes:
        group_best = scores.view(n, nodes, -1).amax(-1)
        keep = torch.zeros(n, nodes, dtype=torch.bool)
        keep.scatter_(1, group_best.topk(topk_groups, dim=1).indices, True)
        scores = scores.masked_fill(~keep.repeat_interleave(num_experts // nodes, 1), -1.0)
    experts = scores.topk(topk, dim=1).indices
    return experts, torch.arange(ep).repeat_interleave(tokens_per_rank)


def _plan(experts_NK, src_N, ep, kind):
    per_node = min(ep, GPUS_PER_NODE)
    placement = Placement.contiguous(NUM_EXPERTS, ep, per_node)
    return row_plan(routing_map_from_topk(experts_NK, NUM_EXPERTS), None, placement, kind,
                    source_rank=src_N, topk=TOPK), per_node


def _normal(row: dict, preset: LinkPreset, tokens: int, seed: int) -> tuple[float, float]:
    """(simulated GB/s, simulated seconds) of one DeepEP normal-kernel row."""
    ep, phase = row["ep"], row["phase"]
    nodes = max(1, ep // GPUS_PER_NODE)
    experts, src = deepep_routing(tokens, ep, min(nodes, 4), seed)
    row_bytes = fp8_row_bytes() if phase == "dispatch" else BF16_ROW
    if nodes == 1:  # intranode kernel: one row per (token, rank), NVLink only
        plan, per_node = _plan(experts, src, ep, "rank")
        hops = [plan.hops[0].rows_RR]
        logical_rows_R = plan.floor_rows_RR.sum(0).double()  # received rows, own included
    else:  # RDMA to the same-lane GPU of each node, NVLink forwarding inside it
        plan, per_node = _plan(experts, src, ep, "node")
        hops = [h.rows_RR for h in plan.hops]
        to_nodes_R = plan.hops[0].rows_RR.sum(1).double()  # (token, node) pairs, own node too
        logical_rows_R = to_nodes_R
    mats = [h * row_bytes for h in hops]
    if phase == "combine":  # rows come back, hops in reverse
        mats = [m.t() for m in reversed(mats)]
    seconds = phase_seconds(mats, per_node, preset, phase, pipelined=True)
    return float(logical_rows_R.mean()) * row_bytes / seconds / 1e9, seconds


def _low_latency(row: dict, preset: LinkPreset, tokens: int, seed: int) -> float:
    """Simulated seconds of one DeepEP low-latency row (one row per (token, expert), 128 tokens)."""
    ep, phase = row["ep"], row["phase"]
    experts, src = deepep_routing(tokens, ep, None, seed)
    plan, per_node = _plan(experts, src, ep, "expert")
    rows = plan.hops[0].rows_RR
    mat = rows * LL_FP8_ROW if phase == "dispatch" else rows.t() * BF16_ROW
    return phase_seconds([mat], per_node, preset, phase)


def _nccl(row: dict, preset: LinkPreset, size: int = 1 << 30) -> tuple[float, float]:
    """(simulated busbw GB/s, seconds) of nccl-tests' alltoall_perf at `size` bytes per rank."""
    n = row["ep"]
    mat = torch.full((n, n), size / n, dtype=torch.float64)
    seconds = phase_seconds([mat], min(n, GPUS_PER_NODE), preset)
    return size * (n - 1) / n / seconds / 1e9, seconds


PRESET_OF_KIND = {"normal": "h800-deepep", "low-latency": "h800-deepep", "nccl": "h100-nccl"}


def replay(row: dict, preset: LinkPreset | None = None, seed: int = 0,
           normal_tokens: int = 4096) -> dict:
    """One published row replayed: the row plus `simulated` and `relative_error`."""
    preset = preset or get_preset(PRESET_OF_KIND[row["kind"]])
    if row["kind"] == "normal":
        sim, seconds = _normal(row, preset, normal_tokens, seed)
    elif row["kind"] == "low-latency":
        seconds = _low_latency(row, preset, 128, seed)
        sim = seconds * 1e6
    else:
        sim, seconds = _nccl(row, preset)
    return {**row, "preset": preset.name, "simulated": round(sim, 2),
            "relative_error": (sim - row["published"]) / row["published"],
            "simulated_seconds": seconds}


def replay_all(seed: int = 0, normal_tokens: int = 4096) -> list[dict]:
    return [replay(r, seed=seed, normal_tokens=normal_tokens) for r in PUBLISHED]


def fit_ll_latencies(seed: int = 0) -> dict[str, float]:
    """Least-squares fixed latency per phase on the low-latency rows marked split="fit": the
    mean of published minus the bandwidth-only simulated time (latency set to 0)."""
    base = get_preset("h800-deepep").model_copy(update={"latency": 0.0, "combine_latency": 0.0})
    out = {}
    for phase in ("dispatch", "combine"):
        rows = [r for r in PUBLISHED if r["kind"] == "low-latency" and r["split"] == "fit"
                and r["phase"] == phase]
        out[phase] = statistics.mean(r["published"] * 1e-6 - _low_latency(r, base, 128, seed)
                                     for r in rows)
    return out


def fit_intra_bandwidth(seed: int = 0, normal_tokens: int = 4096) -> float:
    """NVLink bytes/s that makes the intranode EP8 dispatch row exact (its split="fit" row):
    the slowest rank's NVLink bytes / the published time (logical bytes / 153 GB/s)."""
    row = next(r for r in PUBLISHED if r["kind"] == "normal" and r["split"] == "fit")
    probe = get_preset("h800-deepep").model_copy(update={"intra_bandwidth": 1.0, "latency": 0.0})
    gbps, seconds_at_1 = _normal(row, probe, normal_tokens, seed)  # seconds at 1 B/s = bytes
    logical_bytes = gbps * 1e9 * seconds_at_1
    t_published = logical_bytes / (row["published"] * 1e9) - get_preset("h800-deepep").latency
    return seconds_at_1 / t_published


# ---- this machine: cpu-gloo / cpu-shm from `bench.py alltoall` --------------------------------
CPU_FIT_SIZES = (65536, 4194304)  # EP=2 rows the CPU presets are fitted on; the rest are scored


def _uniform_alltoall(ep: int, nbytes: float) -> torch.Tensor:
    """[ep, ep] bytes of `bench.py alltoall`: `nbytes` off-rank per rank, split evenly."""
    mat = torch.full((ep, ep), nbytes / (ep - 1), dtype=torch.float64)
    return mat.fill_diagonal_(0.0)


def fit_cpu_preset(alltoall_rows: list[dict], transport: str,
                   sizes: tuple[int, int] = CPU_FIT_SIZES) -> dict[str, float]:
    """Two-point fit of (fixed seconds, bandwidth) on the EP=2 rows of `transport` whose
    `bytes` are `sizes`: at EP=2 a rank sends one message, t = fixed + bytes / bw (the
    preset puts `fixed` per collective for gloo, per message for shm)."""
    pts = sorted((r["bytes"], r["seconds"]) for r in alltoall_rows
                 if r["transport"] == transport and r["ep"] == 2 and r["bytes"] in sizes)
    if len(pts) != 2:
        raise ValueError(f"alltoall results: need {transport} rows at EP=2 of {sizes} bytes")
    (b0, t0), (b1, t1) = pts
    inv_bw = (t1 - t0) / (b1 - b0)
    return {"fixed_seconds": t0 - b0 * inv_bw, "bandwidth": 1.0 / inv_bw}


def fitted_cpu_preset(alltoall_rows: list[dict], transport: str,
                      sizes: tuple[int, int] = CPU_FIT_SIZES, name: str | None = None
                      ) -> LinkPreset:
    """The cpu-gloo / cpu-shm preset refitted on `alltoall_rows` (`fit_cpu_preset`): same
    structure (where the fixed cost sits, cores), this machine's numbers of the moment."""
    fit = fit_cpu_preset(alltoall_rows, transport, sizes)
    base = get_preset(f"cpu-{transport}")
    fixed = "latency" if base.latency > 0 else "message_latency"
    return base.model_copy(update={
        "name": name or f"{base.name}@refit", "intra_bandwidth": fit["bandwidth"],
        "inter_bandwidth": fit["bandwidth"], fixed: max(fit["fixed_seconds"], 0.0),
        "fitted": f"{fixed}, bandwidth: two-point fit on {transport} EP=2 all-to-alls of "
                  f"{sizes[0]} and {sizes[1]} bytes per rank"})


def replay_cpu(alltoall_rows: list[dict], source: str) -> list[dict]:
    """Measured `bench.py alltoall` rows against the cpu-gloo / cpu-shm presets."""
    out = []
    for r in alltoall_rows:
        preset = get_preset(f"cpu-{r['transport']}")
        mat = _uniform_alltoall(r["ep"], r["bytes"])
        sim = phase_seconds([mat], r["ep"], preset)
        fit = r["ep"] == 2 and r["bytes"] in CPU_FIT_SIZES
        out.append({"kind": f"cpu-{r['transport']}", "ep": r["ep"], "phase": "alltoall",
                    "metric": "us", "bytes": r["bytes"], "published": round(r["seconds"] * 1e6, 1),
                    "split": "fit" if fit else "score", "source": source, "preset": preset.name,
                    "simulated": round(sim * 1e6, 1),
                    "relative_error": (sim - r["seconds"]) / r["seconds"],
                    "simulated_seconds": sim})
    return out
