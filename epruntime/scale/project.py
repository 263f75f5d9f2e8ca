"""Project a training step at cluster scale: compute from the FLOPs model, all-to-all time from the
row plan's traffic and a link preset, for megatron-core's dispatcher and epruntime's.

    python -m epruntime.scale --shape deepseek-v3 --json projection.json

Per MoE layer and micro-batch (fwd + bwd):
- compute = 3 x (attention + shared + router FLOPs x tokens per rank + routed FLOPs x the
  (token, expert) pairs of the busiest rank) / achieved FLOP/s: the slowest rank sets it.
- comm = 2 x (dispatch + combine) all-to-alls of `epruntime.simulate.layer_exchanges` (the same
  row plan the dispatchers send by) timed by `timemodel.phase_seconds` (collectives one after
  another); the backward moves the same bytes the other way.
- overlap off: compute + comm; overlap on: max(compute, comm) (the ideal that DualPipe-like
  schedules approach; a bound, not a schedule).
Step time = per-layer time x the shape's MoE layers (dense layers, embeddings and the
optimizer are left out: the same for every variant).

Routing: `olmoe` draws each token's experts from OLMoE-1B-7B's measured per-expert loads of one
text domain per rank (shared/data/olmoe-routing; 64 experts, each split evenly into
E/64 finer experts under a seeded relabelling when the shape has more), `balanced` from
uniform loads, `trace` replays a routing trace of this project (tokens dealt round-robin to the
ranks). Experts are drawn by Gumbel top-k (without replacement, in proportion to load), with
node-limited routing when the shape has it (top `node_limit` nodes by the sum of each node's
two best scores, DeepSeek-V3's rule, under the contiguous layout the router was trained on).
Placements and replicas are fitted on one sample of the routing and scored on another.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from epruntime.dispatch.ledger import CommLedger
from epruntime.placement import Placement
from epruntime.placement.strategies import coactivation_counts, traffic_aware_placement
from epruntime.scale.compute import ACHIEVED_TFLOPS_H100, SHAPES, ModelShape, layer_flops
from epruntime.scale.links import LinkPreset, get_preset
from epruntime.scale.timemodel import phase_seconds
from epruntime.simulate import layer_exchanges

__all__ = ["VARIANTS", "Scenario", "assign_copies", "gumbel_routing", "olmoe_popularity",
           "project", "replicate", "variant_layer"]

ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """The project's shared/data: $EPRUNTIME_SHARED_DATA, else shared/data inside the checkout,
    else beside it (../shared/data, where CI and the main checkout keep it)."""
    if os.environ.get("EPRUNTIME_SHARED_DATA"):
        return Path(os.environ["EPRUNTIME_SHARED_DATA"])
    inside = ROOT / "shared" / "data"
    return inside if inside.is_dir() else ROOT.parent / "shared" / "data"


OLMOE_SUBDIR = Path("olmoe-routing") / "olmoe-1b-7b"
OLMOE_DOMAINS = ("arxiv", "c4", "github")
# variant -> (dispatch kind of epruntime.simulate, placement, replica slots per rank)
VARIANTS = {
    "megatron-alltoall": ("alltoall", "contiguous", 0),
    "dedup": ("dedup", "contiguous", 0),
    "dedup-hier": ("dedup-hier", "contiguous", 0),
    "dedup-hier+placement": ("dedup-hier", "traffic", 0),
    "dedup-hier+placement+replicas": ("dedup-hier", "traffic", 1),
}


@dataclass(frozen=True)
class Scenario:
    shape: ModelShape
    ep: int
    nodes: int
    tokens_per_rank: int  # per micro-batch
    routing: str  # olmoe | balanced | trace
    sim_tokens_per_rank: int = 1024  # simulated; bytes and loads scale by tokens / sim tokens
    trace_path: str | None = None
    hidden_bytes: int = 2  # BF16 rows

    @property
    def ranks_per_node(self) -> int:
        return self.ep // self.nodes


# ---- routing -------------------------------------------------------------------------------
def olmoe_popularity(num_experts: int, layer: str = "7", seed: int = 0,
                     data_dir: Path | None = None) -> torch.Tensor:
    """[3, E] expert popularity per OLMoE domain (arxiv, c4, github); E a multiple of 64."""
    data_dir = data_dir or shared_data_dir() / OLMOE_SUBDIR
    if num_experts % 64:
        raise ValueError(f"olmoe routing needs a multiple of 64 experts, got {num_experts}")
    rows = []
    for d in OLMOE_DOMAINS:
        path = data_dir / f"{d}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: OLMoE routing loads missing (shared/data beside "
                                    "the checkout, or set EPRUNTIME_SHARED_DATA)")
        usage = json.loads(path.read_text())["expert_usage_by_layer"][layer]
        rows.append(torch.tensor([float(usage[str(e)]) for e in range(64)]))
    split = num_experts // 64
    pop = torch.stack(rows).repeat_interleave(split, 1) / split
    perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))
    return (pop[:, perm] / pop.sum(1, keepdim=True)).clamp_min(1e-9)


def gumbel_routing(pop_GE: torch.Tensor, group_N: torch.Tensor, topk: int, nodes: int,
                   node_limit: int | None, seed: int) -> torch.Tensor:
    """[N, K] experts per token: Gumbel top-k over log popularity of the token's group
    (pop_GE [G, E], group_N [N]), limited to `node_limit` of `nodes` contiguous expert groups."""
    gen = torch.Generator().manual_seed(seed)
    n, e = group_N.numel(), pop_GE.shape[1]
    u = torch.rand(n, e, generator=gen).clamp(1e-12, 1 - 1e-12)
    scores = pop_GE[group_N].log() - torch.log(-torch.log(u))
    if node_limit is not None and node_limit < nodes:
        node_score = scores.view(n, nodes, -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros(n, nodes, dtype=torch.bool)
        keep.scatter_(1, node_score.topk(node_limit, dim=1).indices, True)
        scores = scores.masked_fill(~keep.repeat_interleave(e // nodes, 1), float("-inf"))
    return scores.topk(topk, dim=1).indices


def _trace_samples(sc: Scenario) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer of the trace: (experts_NK, src_N, modality_N) of the fit half and the score
    half (calls before / after the midpoint of the later half of training)."""
    from epruntime.simulate import source_ranks
    from epruntime.traces import load_trace

    trace = load_trace(sc.trace_path)
    if trace.header.num_experts != sc.shape.num_experts or trace.header.topk != sc.shape.topk:
        raise ValueError(f"trace {sc.trace_path}: {trace.header.num_experts} experts top-"
                         f"{trace.header.topk}, the shape needs {sc.shape.num_experts} top-"
                         f"{sc.shape.topk}")
    last = int(trace.call_N.max())
    src = source_ranks(trace, sc.ep)
    out = []
    for layer in range(trace.header.num_layers):
        for lo, hi in ((last // 2, 3 * last // 4), (3 * last // 4 + 1, last)):
            keep = (trace.layer_N == layer) & (trace.call_N >= lo) & (trace.call_N <= hi)
            out.append((trace.experts_NK[keep], src[keep], trace.modality_N[keep]))
    return out


def routing_samples(sc: Scenario, seed: int = 0):
    """[(fit, score)] per layer sample: each (experts_NK, src_N, modality_N)."""
    if sc.routing == "trace":
        s = _trace_samples(sc)
        return [(s[i], s[i + 1]) for i in range(0, len(s), 2)]
    e = sc.shape.num_experts
    n = sc.sim_tokens_per_rank * sc.ep
    src = torch.arange(sc.ep).repeat_interleave(sc.sim_tokens_per_rank)
    if sc.routing == "olmoe":
        pop, group = olmoe_popularity(e, seed=seed), src % len(OLMOE_DOMAINS)  # a domain per rank
    elif sc.routing == "balanced":
        pop, group = torch.full((1, e), 1.0 / e), torch.zeros(n, dtype=torch.long)
    else:
        raise ValueError(f"routing {sc.routing!r}: expected olmoe, balanced or trace")
    unknown = torch.full((n,), 255, dtype=torch.long)
    draw = [gumbel_routing(pop, group, sc.shape.topk, sc.nodes, sc.shape.node_limit, seed + i)
            for i in (1, 2)]
    return [((draw[0], src, unknown), (draw[1], src, unknown))]


# ---- replicas ------------------------------------------------------------------------------
def replicate(placement: Placement, load_E: torch.Tensor, extra_per_rank: int
              ) -> list[list[int]]:
    """Rank lists of logical experts with `extra_per_rank` copies added per rank (EPLB's
    greedy: the expert with the most load per copy goes to the least-loaded rank that has a free
    slot and no copy of it yet). load_E [E]: (token, expert) pairs per expert (fit sample)."""
    ranks = [list(x) for x in placement.experts_per_rank()]
    copies = torch.ones(load_E.numel(), dtype=torch.float64)
    free = [extra_per_rank] * len(ranks)

    def rank_load(r: int) -> float:
        return sum(float(load_E[e] / copies[e]) for e in ranks[r])

    for _ in range(extra_per_rank * len(ranks)):
        for e in torch.argsort(load_E / copies, descending=True).tolist():
            options = [r for r in range(len(ranks)) if free[r] and e not in ranks[r]]
            if options:
                break
        else:
            raise ValueError("replicate: every free slot's rank already holds every expert")
        copies[e] += 1
        r = min(options, key=rank_load)
        ranks[r].append(e)
        free[r] -= 1
    return ranks


def assign_copies(experts_NK: torch.Tensor, src_N: torch.Tensor, rank_lists: list[list[int]],
                  ranks_per_node: int) -> tuple[torch.Tensor, Placement]:
    """Physical slot per (token, expert): the copy on the token's rank, else the copies in turn
    by token index (EPLB spreads a hot expert's load evenly over its copies). Returns (slots_NK,
    a Placement over the slots)."""
    slot_of: dict[int, list[tuple[int, int]]] = {}  # expert -> [(rank, physical id)]
    slots, nxt = [], 0
    for r, experts in enumerate(rank_lists):
        ids = list(range(nxt, nxt + len(experts)))
        nxt += len(experts)
        slots.append(ids)
        for e, p in zip(experts, ids):
            slot_of.setdefault(e, []).append((r, p))
    num_e = experts_NK.max().item() + 1 if experts_NK.numel() else 0
    out = experts_NK.clone()
    for e in range(int(num_e)):
        where = slot_of.get(e, [])
        if len(where) <= 1:
            if where:
                out[experts_NK == e] = where[0][1]
            continue
        n_idx, k_idx = (experts_NK == e).nonzero(as_tuple=True)
        src = src_N[n_idx]
        rank_T = torch.tensor([r for r, _ in where])
        phys_T = torch.tensor([p for _, p in where])
        same_rank = src[:, None] == rank_T[None, :]
        spread = torch.zeros_like(same_rank)
        spread[torch.arange(n_idx.numel()), n_idx % len(where)] = True
        pref = same_rank * 2 + spread  # the token's own rank, else round-robin
        out[n_idx, k_idx] = phys_T[pref.float().argmax(1)]
    return out, Placement.from_rank_lists(slots, ranks_per_node)


# ---- one layer -----------------------------------------------------------------------------
def variant_layer(sc: Scenario, variant: str, fit, score, preset: LinkPreset,
                  tflops: float) -> dict[str, float]:
    """Seconds and bytes of one MoE layer (fwd + bwd, one micro-batch) for `variant`."""
    kind, place, extra = VARIANTS[variant]
    e, rpn = sc.shape.num_experts, sc.ranks_per_node
    experts, src, modality = score
    dealt = experts.shape[0] / sc.ep  # simulated tokens per rank
    scale = sc.tokens_per_rank / dealt
    placement = Placement.contiguous(e, sc.ep, rpn)
    if place == "traffic":
        counts = coactivation_counts(fit[0], e)
        placement = traffic_aware_placement(counts, sc.ep, rpn)
    if extra:
        load_E = torch.bincount(fit[0][fit[0] >= 0], minlength=e).double()
        lists = replicate(placement, load_E, extra)
        experts, placement = assign_copies(experts, src, lists, rpn)
        e = placement.num_experts
    ledger = CommLedger(1, sc.ep, 0, rpn)
    ex = layer_exchanges(kind, experts, src, modality, placement, sc.shape.topk,
                         sc.shape.hidden, sc.hidden_bytes, 4, 1, ledger, 0)
    phases = {"dispatch": [], "combine": []}
    for x in ex:
        phases[x.phase].append(x.bytes_RR.double() * (scale if x.scales_with_tokens else 1.0))
    comm_fwd = sum(phase_seconds(m, rpn, preset, ph) for ph, m in phases.items())
    f = layer_flops(sc.shape)
    pairs_R = torch.bincount(placement.rank_E[experts[experts >= 0]], minlength=sc.ep).double()
    busiest = float(pairs_R.max()) * scale
    dense = (f["attention"] + f["shared"] + f["router"]) * sc.tokens_per_rank
    routed_per_pair = f["routed"] / sc.shape.topk
    compute = 3 * (dense + routed_per_pair * busiest) / (tflops * 1e12)
    cross = sum(float(m.sum() - m.diagonal().sum()) for ms in phases.values() for m in ms)
    return {"compute_s": compute, "comm_s": 2 * comm_fwd,
            "fwd_cross_rank_bytes_per_rank": cross / sc.ep,
            "balancedness": float(pairs_R.mean() / pairs_R.max()) if pairs_R.max() > 0 else 1.0}


def project(sc: Scenario, preset: LinkPreset | str = "h100-nccl",
            tflops: float = ACHIEVED_TFLOPS_H100, variants: list[str] | None = None,
            seed: int = 0) -> list[dict]:
    """Rows per (variant, overlap): step seconds (MoE layers of one micro-batch, fwd + bwd),
    all-to-all share and speedup over megatron-core's alltoall dispatcher."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    variants = variants or list(VARIANTS)
    if "megatron-alltoall" not in variants:
        variants = ["megatron-alltoall", *variants]
    samples = routing_samples(sc, seed)
    per_variant = {}
    for v in variants:
        layers = [variant_layer(sc, v, fit, score, preset, tflops) for fit, score in samples]
        per_variant[v] = {k: sum(x[k] for x in layers) / len(layers) for k in layers[0]}
    rows = []
    for overlap in (False, True):
        base = None
        for v in variants:
            x = per_variant[v]
            layer = max(x["compute_s"], x["comm_s"]) if overlap else x["compute_s"] + x["comm_s"]
            exposed = max(0.0, x["comm_s"] - x["compute_s"]) if overlap else x["comm_s"]
            step = layer * sc.shape.moe_layers
            base = step if v == "megatron-alltoall" else base
            rows.append({
                "variant": f"{sc.shape.name}/{sc.routing}/{v}/overlap-{'on' if overlap else 'off'}",
                "shape": sc.shape.name, "routing": sc.routing, "dispatcher": v,
                "overlap": overlap, "ep": sc.ep, "nodes": sc.nodes,
                "tokens_per_rank": sc.tokens_per_rank, "preset": preset.name,
                "tflops_per_gpu": tflops, "step_s": step,
                "compute_s": x["compute_s"] * sc.shape.moe_layers,
                "a2a_s": x["comm_s"] * sc.shape.moe_layers,
                "a2a_share": x["comm_s"] / (x["compute_s"] + x["comm_s"]),
                "exposed_a2a_fraction": exposed / layer,
                "fwd_cross_rank_MB_per_rank_layer": x["fwd_cross_rank_bytes_per_rank"] / 1e6,
                "balancedness": x["balancedness"], "speedup_vs_megatron": base / step})
    return rows
