"""Scale simulator: replay a routing trace at any EP size, node count, placement and dispatcher.

    python -m epruntime.simulate --trace runs/train/traces --ep 8,16,32 --nodes 1,2,4 \
        --preset nvlink-ib --json sweep.json

For each dispatcher it rebuilds the (src, dst) row matrices the real one would hand to
all_to_all, with the CommLedger's byte conventions (DESIGN.md, "Communication"):

- alltoall (megatron-core): one row per (token, expert); payload H x hidden dtype, metadata one
  router prob (prob dtype); control: every rank all-gathers E int64 counts per call.
- dedup: one row per (token, destination rank); metadata 2M float32, M = min(top-k, E / R);
  control: R int64 counts per call.
- dedup-hier: stage 1 one row per (token, node) to the gateway with the sender's local index in
  that node, metadata 2 M1 + 1 float32 (M1 = min(top-k, experts per node)); stage 2 one row per
  (token, rank) from the gateway inside the node, metadata 2M; control: two rounds of R int64.
- combine sends every dispatch row back (H x hidden dtype, no metadata), stage 2 before stage 1.

At the recorded EP size and placement the figures equal the ledger's (tests/test_simulate.py).
Tokens keep their recorded source rank when the EP size equals the trace's; otherwise they are
dealt to source ranks round-robin in (call, rank, token) order, i.e. the same global batch
spread over more ranks. Sampled traces (trace.sample_rate < 1) give exact figures for the
sampled tokens; `scaled` figures multiply the token-driven ones by 1 / sample_rate.

Time uses an alpha-beta model per all-to-all: a rank pays `latency` per non-empty message and
bytes / bandwidth on each link class (intra- / inter-node); the collective takes as long as its
slowest rank (max of send and receive side); a layer's phase is the sum of its collectives
(they run one after another). Forward pass only; training's backward mirrors it (x2).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from epruntime.dispatch.ledger import CommLedger
from epruntime.placement import Placement
from epruntime.traces import UNKNOWN_MODALITY, RoutingTrace, load_trace

KINDS = ("alltoall", "dedup", "dedup-hier")
COUNT_BYTES = 8  # int64 split counts
META_BYTES = 4  # dedup metadata travels as float32


# ---- link model ----------------------------------------------------------------------------
class LinkModel(BaseModel):
    """Alpha-beta model of one rank's links (bandwidths per rank per direction)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    intra_bandwidth: float = Field(gt=0, description="bytes/s per rank, to ranks of its node")
    inter_bandwidth: float = Field(gt=0, description="bytes/s per rank, to other nodes")
    intra_latency: float = Field(ge=0, description="seconds per message inside a node")
    inter_latency: float = Field(ge=0, description="seconds per message across nodes")
    # NVLink and the NIC are separate engines: intra- and inter-node traffic overlap. Over one
    # shared path (gloo over loopback TCP, PCIe through the NIC) they add up.
    concurrent_links: bool = True
    source: str = ""

    def send_time(self, intra_bytes, inter_bytes, intra_msgs, inter_msgs):
        """Seconds for one rank to push its share (floats or [R] tensors, elementwise)."""
        intra = intra_msgs * self.intra_latency + intra_bytes / self.intra_bandwidth
        inter = inter_msgs * self.inter_latency + inter_bytes / self.inter_bandwidth
        if isinstance(intra, torch.Tensor):
            return torch.maximum(intra, inter) if self.concurrent_links else intra + inter
        return max(intra, inter) if self.concurrent_links else intra + inter


PRESETS: dict[str, LinkModel] = {
    "nvlink-ib": LinkModel(
        name="nvlink-ib", intra_bandwidth=450e9, inter_bandwidth=50e9,
        intra_latency=3e-6, inter_latency=10e-6,
        source="bandwidth: NVIDIA H100 SXM datasheet (NVLink 4: 900 GB/s bidirectional = 450 GB/s "
               "per direction per GPU); InfiniBand NDR 400 Gb/s = 50 GB/s per GPU with one "
               "ConnectX-7 per GPU (NVIDIA Quantum-2 / ConnectX-7 datasheets). Peak figures; "
               "DeepEP's README measures ~153 GB/s NVLink (H800, 160 GB/s peak) and ~43-58 GB/s "
               "RDMA for its normal kernels. Latencies are assumptions of the order of NCCL's "
               "small-message all-to-all latency, not measurements."),
    "deepep-h800": LinkModel(
        name="deepep-h800", intra_bandwidth=153e9, inter_bandwidth=45e9,
        intra_latency=3e-6, inter_latency=10e-6,
        source="achieved bandwidths of DeepEP's normal kernels, DeepEP README (H800 with ~160 "
               "GB/s NVLink, CX7 InfiniBand 400 Gb/s ~50 GB/s): ~153 GB/s intranode, ~43-46 GB/s "
               "internode RDMA at EP16-64. Latencies assumed as in nvlink-ib."),
    "pcie": LinkModel(
        name="pcie", intra_bandwidth=25e9, inter_bandwidth=25e9,
        intra_latency=10e-6, inter_latency=10e-6, concurrent_links=False,
        source="PCIe 4.0 x16: 31.5 GB/s per direction (PCI-SIG), ~25 GB/s achievable; inter-node "
               "InfiniBand HDR 200 Gb/s = 25 GB/s; intra- and inter-node share the PCIe root. "
               "Latencies assumed."),
    "cpu-gloo": LinkModel(
        name="cpu-gloo", intra_bandwidth=0.65e9, inter_bandwidth=0.65e9,
        intra_latency=300e-6, inter_latency=300e-6, concurrent_links=False,
        source="measured on this machine (2 busy cores, torch 2.13 gloo, all_to_all_single, "
               "2 ranks): ~290-340 us for an 8 B-4 KiB message, 0.58-0.71 GB/s per rank for "
               "1-16 MiB per peer; 4 ranks on 2 cores: 0.39-0.61 GB/s."),
}


def exchange_time(bytes_RR: torch.Tensor, ranks_per_node: int, link: LinkModel) -> float:
    """Time of one all-to-all moving bytes_RR [R, R] (src, dst), diagonal (local) free.

    Each rank's time is the larger of its send and receive side; the collective ends with the
    slowest rank.
    """
    r = bytes_RR.shape[0]
    node = torch.arange(r) // ranks_per_node
    cross = ~torch.eye(r, dtype=torch.bool)
    intra_m = cross & (node[:, None] == node[None, :])
    inter_m = node[:, None] != node[None, :]
    b = bytes_RR.double()
    worst = 0.0
    for side in (b, b.t()):  # send rows, then receive rows (columns)
        msgs = (side > 0).double()
        t_R = link.send_time((side * intra_m).sum(1), (side * inter_m).sum(1),
                             (msgs * intra_m).sum(1), (msgs * inter_m).sum(1))
        worst = max(worst, float(t_R.max()))
    return worst


# ---- row matrices --------------------------------------------------------------------------
def source_ranks(trace: RoutingTrace, ep_size: int) -> torch.Tensor:
    """[N] source rank of every record: as recorded at the trace's EP size, else round-robin
    over (call, rank, token) order (separately per layer, so a token keeps its rank)."""
    if ep_size == trace.header.ep_size:
        return trace.rank_N.clone()
    out = torch.empty_like(trace.rank_N)
    big = int(trace.token_N.max()) + 1 if trace.num_records else 1
    ranks = int(trace.rank_N.max()) + 1 if trace.num_records else 1
    for layer in trace.layer_N.unique().tolist():
        idx = (trace.layer_N == layer).nonzero(as_tuple=True)[0]
        key = (trace.call_N[idx] * ranks + trace.rank_N[idx]) * big + trace.token_N[idx]
        order = idx[torch.argsort(key, stable=True)]
        out[order] = torch.arange(order.numel()) % ep_size
    return out


def _pair_matrix(src_X: torch.Tensor, dst_X: torch.Tensor, r: int) -> torch.Tensor:
    """[R, R] int64 count of (src, dst) pairs."""
    return torch.bincount(src_X * r + dst_X, minlength=r * r).view(r, r)


def _modality_matrix(mod_X: torch.Tensor, src_X, dst_X, r: int) -> torch.Tensor:
    """[2, R, R] rows per (modality, src, dst); records of unknown modality are left out."""
    known = mod_X != UNKNOWN_MODALITY
    flat = (mod_X[known] * r + src_X[known]) * r + dst_X[known]
    return torch.bincount(flat, minlength=2 * r * r).view(2, r, r)


@dataclass
class Exchange:
    """One all-to-all of one average forward call: bytes [R, R] and its phase."""

    phase: str
    name: str
    bytes_RR: torch.Tensor
    scales_with_tokens: bool = True


def layer_exchanges(kind: str, experts_NK: torch.Tensor, src_N: torch.Tensor,
                    modality_N: torch.Tensor, placement: Placement, topk: int, hidden: int,
                    hidden_bytes: int, prob_bytes: int, calls: int, ledger: CommLedger,
                    layer: int) -> list[Exchange]:
    """Fill `ledger`'s cells for one layer and return its all-to-alls (summed over calls).

    experts_NK [N, K] logical expert ids (-1 none), src_N [N] source rank, modality_N [N].
    """
    r, per_node, n_local = placement.num_ranks, placement.ranks_per_node, placement.num_local
    e = placement.num_experts
    row = hidden * hidden_bytes
    valid = experts_NK >= 0
    tok_X = torch.arange(experts_NK.shape[0])[:, None].expand_as(experts_NK)[valid]
    dst_X = placement.rank_E[experts_NK[valid]]
    src_X = src_N[tok_X]
    expert_RR = _pair_matrix(src_X, dst_X, r)
    # distinct (token, rank): the dedup floor
    key = torch.unique(tok_X * r + dst_X)
    ftok, fdst = key // r, key % r
    floor_RR = _pair_matrix(src_N[ftok], fdst, r)
    ledger.expert_rows[layer] += expert_RR
    ledger.floor_rows[layer] += floor_RR
    known = modality_N != UNKNOWN_MODALITY
    ledger.tokens[layer] += torch.bincount(modality_N[known], minlength=2)[:2]
    ledger.tokens[layer, 0] += int((~known).sum())

    def add(phase: int, rows_RR, meta_row_bytes: int, mod_2RR) -> None:
        ledger.rows[layer, phase] += rows_RR
        ledger.payload_bytes[layer, phase] += rows_RR * row
        ledger.meta_bytes[layer, phase] += rows_RR * meta_row_bytes
        ledger.modality_rows[layer, phase] += mod_2RR

    def control(per_pair: int) -> torch.Tensor:
        c = torch.full((r, r), per_pair * calls, dtype=torch.int64)
        ledger.control_bytes[layer] += c
        return c

    ex: list[Exchange] = []
    if kind == "alltoall":
        mod = _modality_matrix(modality_N[tok_X], src_X, dst_X, r)
        add(0, expert_RR, prob_bytes, mod)
        add(1, expert_RR.t(), 0, mod.transpose(1, 2))
        if r > 1:  # megatron-core all-gathers the [E] int64 counts of every rank
            ex.append(Exchange("dispatch", "counts", control(e * COUNT_BYTES), False))
        ex += [Exchange("dispatch", "tokens", expert_RR * row),
               Exchange("dispatch", "probs", expert_RR * prob_bytes),
               Exchange("combine", "tokens", expert_RR.t() * row)]
    elif kind == "dedup":
        m = min(topk, n_local)
        mod = _modality_matrix(modality_N[ftok], src_N[ftok], fdst, r)
        add(0, floor_RR, 2 * m * META_BYTES, mod)
        add(1, floor_RR.t(), 0, mod.transpose(1, 2))
        ex.append(Exchange("dispatch", "counts", control(COUNT_BYTES), False))
        ex += _rows_exchanges("dispatch", "rows", floor_RR, row, 2 * m * META_BYTES, hidden_bytes)
        ex.append(Exchange("combine", "rows", floor_RR.t() * row))
    elif kind == "dedup-hier":
        m1, m = min(topk, per_node * n_local), min(topk, n_local)
        # stage 1: distinct (token, node) to the gateway with the sender's local index there
        nkey = torch.unique(tok_X * placement.num_nodes + dst_X // per_node)
        ntok, nnode = nkey // placement.num_nodes, nkey % placement.num_nodes
        gate_Y = nnode * per_node + src_N[ntok] % per_node
        s1_RR = _pair_matrix(src_N[ntok], gate_Y, r)
        mod1 = _modality_matrix(modality_N[ntok], src_N[ntok], gate_Y, r)
        # stage 2: distinct (token, rank) from that node's gateway
        gate_F = (fdst // per_node) * per_node + src_N[ftok] % per_node
        s2_RR = _pair_matrix(gate_F, fdst, r)
        mod2 = _modality_matrix(modality_N[ftok], gate_F, fdst, r)
        meta1, meta2 = (2 * m1 + 1) * META_BYTES, 2 * m * META_BYTES
        add(0, s1_RR, meta1, mod1)
        add(0, s2_RR, meta2, mod2)
        add(1, s2_RR.t(), 0, mod2.transpose(1, 2))
        add(1, s1_RR.t(), 0, mod1.transpose(1, 2))
        ex.append(Exchange("dispatch", "counts1", control(COUNT_BYTES), False))
        ex += _rows_exchanges("dispatch", "rows1", s1_RR, row, meta1, hidden_bytes)
        ex.append(Exchange("dispatch", "counts2", control(COUNT_BYTES), False))
        ex += _rows_exchanges("dispatch", "rows2", s2_RR, row, meta2, hidden_bytes)
        ex += [Exchange("combine", "rows2", s2_RR.t() * row),
               Exchange("combine", "rows1", s1_RR.t() * row)]
    else:
        raise ValueError(f"dispatch kind {kind!r}: expected one of {KINDS}")
    return ex


def _rows_exchanges(phase, name, rows_RR, row_bytes, meta_bytes, hidden_bytes) -> list[Exchange]:
    """epruntime packs rows and float32 metadata into one all-to-all when the hidden dtype is
    float32 too; otherwise they travel as two."""
    if hidden_bytes == META_BYTES:
        return [Exchange(phase, name, rows_RR * (row_bytes + meta_bytes))]
    return [Exchange(phase, name, rows_RR * row_bytes), Exchange(phase, name + "-meta",
                                                                 rows_RR * meta_bytes)]


# ---- simulation ----------------------------------------------------------------------------
PlacementSpec = Literal["contiguous", "traffic", "trace"]


@dataclass
class SimResult:
    kind: str
    ep_size: int
    ranks_per_node: int
    ledger: CommLedger  # the cells the real ledger would hold, summed over ranks
    layer_times: list[dict[str, float]]  # per layer: dispatch / combine seconds per forward call
    scale: float  # 1 / sample_rate

    def summary(self) -> dict:
        """The CommLedger summary (same keys as engine.comm_summary())."""
        return self.ledger.summary()

    def report(self) -> dict:
        """Compact JSON-able figures; `scaled_*` multiply token-driven ones by 1 / sample_rate."""
        s = self.ledger.summary()
        keys = ("rows_sent", "inter_node_rows", "expert_rows", "floor_rows", "cross_rank_bytes",
                "intra_node_bytes", "inter_node_bytes", "payload_bytes", "meta_bytes",
                "control_bytes", "dispatch_cross_rank_bytes", "combine_cross_rank_bytes")
        out = {"kind": self.kind, "ep_size": self.ep_size,
               "num_nodes": self.ep_size // self.ranks_per_node,
               "ranks_per_node": self.ranks_per_node, **{k: s[k] for k in keys},
               "rows_over_floor": s["rows_over_floor"], "balancedness": s["balancedness"],
               "forward_comm_s": sum(t["dispatch"] + t["combine"] for t in self.layer_times),
               "per_layer": [{k: p[k] for k in keys} | t for p, t in
                             zip(s["per_layer"], self.layer_times)]}
        out["train_step_comm_s"] = 2 * out["forward_comm_s"]  # backward mirrors the forward
        for k in ("rows_sent", "inter_node_rows", "cross_rank_bytes", "intra_node_bytes",
                  "inter_node_bytes", "payload_bytes", "meta_bytes"):
            out[f"scaled_{k}"] = s[k] * self.scale
        return out


def placements_for(trace: RoutingTrace, spec: PlacementSpec | list[Placement], ep_size: int,
                   ranks_per_node: int) -> list[Placement]:
    """One Placement per layer: contiguous, traffic-aware from the trace's co-activations, the
    trace's recorded ones, or the given list."""
    h = trace.header
    if isinstance(spec, list):
        if len(spec) != h.num_layers:
            raise ValueError(f"{len(spec)} placements for {h.num_layers} layers")
        return spec
    if spec == "contiguous":
        return [Placement.contiguous(h.num_experts, ep_size, ranks_per_node)] * h.num_layers
    if spec == "trace":
        if not h.placements or h.ep_size != ep_size:
            raise ValueError("placement=trace needs a trace with placements recorded at this EP "
                             f"size ({h.ep_size})")
        return [Placement.from_rank_lists(p["experts_per_rank"], ranks_per_node)
                for p in h.placements]
    if spec == "traffic":
        from epruntime.placement.strategies import coactivation_counts, traffic_aware_placement
        out = []
        for layer in range(h.num_layers):
            experts = trace.experts_NK[trace.layer_N == layer]
            counts = coactivation_counts(experts, h.num_experts)
            out.append(traffic_aware_placement(counts, ep_size, ranks_per_node))
        return out
    raise ValueError(f"placement {spec!r}: expected contiguous, traffic, trace or a list")


def check_has_tokens(trace: RoutingTrace, where: str = "the trace") -> None:
    """ValueError when `trace` holds no routed tokens: every figure would be 0, not a result."""
    if trace.num_records:
        return
    h = trace.header
    seen = int(trace.tokens_seen_L.max()) if trace.tokens_seen_L.numel() else 0  # per layer
    raise ValueError(f"{where}: the trace holds no tokens (recorded with trace.sample_rate="
                     f"{h.sample_rate:g}, {seen} tokens routed before sampling), so there is "
                     "nothing to simulate; record it again with a higher trace.sample_rate")


def simulate(trace: RoutingTrace, kind: str, ep_size: int, ranks_per_node: int | None = None,
             placements: PlacementSpec | list[Placement] = "contiguous",
             link: LinkModel | None = None, hidden: int | None = None,
             hidden_dtype_bytes: int | None = None) -> SimResult:
    """Rows, bytes and alpha-beta time of one dispatcher at one EP size / node size."""
    check_has_tokens(trace)
    h = trace.header
    per_node = ranks_per_node or ep_size
    if h.num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide the trace's {h.num_experts} experts")
    if ep_size % per_node:
        raise ValueError(f"ranks_per_node={per_node} does not divide ep_size={ep_size}")
    link = link or PRESETS["nvlink-ib"]
    hidden, hb = hidden or h.hidden, hidden_dtype_bytes or h.hidden_dtype_bytes
    plist = placements_for(trace, placements, ep_size, per_node)
    src_N = source_ranks(trace, ep_size)
    ledger = CommLedger(h.num_layers, ep_size, 0, per_node)
    scale = 1.0 / h.sample_rate
    layer_times = []
    for layer in range(h.num_layers):
        keep = trace.layer_N == layer
        calls = int(trace.calls_L[layer]) if layer < trace.calls_L.numel() else 1
        exchanges = layer_exchanges(kind, trace.experts_NK[keep], src_N[keep],
                                    trace.modality_N[keep], plist[layer], h.topk, hidden, hb,
                                    h.prob_dtype_bytes, calls, ledger, layer)
        times = {"dispatch": 0.0, "combine": 0.0}
        for x in exchanges:  # the average forward call; sampled token bytes scaled up
            per_call = x.bytes_RR.double() / max(calls, 1) * (scale if x.scales_with_tokens else 1)
            times[x.phase] += exchange_time(per_call, per_node, link)
        layer_times.append(times)
    return SimResult(kind, ep_size, per_node, ledger, layer_times, scale)


def sweep(trace: RoutingTrace, ep_sizes: list[int], node_counts: list[int],
          kinds: list[str] = list(KINDS), placements: PlacementSpec = "contiguous",
          link: LinkModel | None = None, hidden: int | None = None,
          hidden_dtype_bytes: int | None = None) -> dict:
    """Every (EP, nodes, kind) that fits: EP must divide the experts, nodes must divide EP."""
    results, skipped = [], []
    for ep in ep_sizes:
        for nodes in node_counts:
            if trace.header.num_experts % ep or nodes > ep or ep % nodes:
                skipped.append({"ep_size": ep, "num_nodes": nodes})
                continue
            for kind in kinds:
                res = simulate(trace, kind, ep, ep // nodes, placements, link, hidden,
                               hidden_dtype_bytes)
                results.append(res.report())
    link = link or PRESETS["nvlink-ib"]
    h = trace.header
    return {"trace": {"num_experts": h.num_experts, "topk": h.topk, "num_layers": h.num_layers,
                      "ep_size": h.ep_size, "records": trace.num_records,
                      "sample_rate": h.sample_rate, "source": h.source},
            "hidden": hidden or h.hidden,
            "hidden_dtype_bytes": hidden_dtype_bytes or h.hidden_dtype_bytes,
            "placement": placements, "link": link.model_dump(),
            "source_ranks": "as recorded at the trace's EP size, else tokens dealt round-robin",
            "results": results, "skipped": skipped}


def format_table(out: dict) -> str:
    lines = [f"{'EP':>4} {'nodes':>5} {'kind':<11} {'rows_sent':>11} {'inter_rows':>11} "
             f"{'cross_MB':>10} {'inter_MB':>10} {'/floor':>7} {'fwd_comm_ms':>11}"]
    for r in out["results"]:
        ratio = f"{r['rows_over_floor']:.2f}" if r["rows_over_floor"] else "-"
        lines.append(f"{r['ep_size']:>4} {r['num_nodes']:>5} {r['kind']:<11} "
                     f"{r['scaled_rows_sent']:>11.0f} {r['scaled_inter_node_rows']:>11.0f} "
                     f"{r['scaled_cross_rank_bytes'] / 1e6:>10.2f} "
                     f"{r['scaled_inter_node_bytes'] / 1e6:>10.2f} {ratio:>7} "
                     f"{r['forward_comm_s'] * 1e3:>11.3f}")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("epruntime.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, help="trace directory, rank*.npz file or .jsonl")
    p.add_argument("--ep", type=_int_list, default=None, help="EP sizes (default: the trace's)")
    p.add_argument("--nodes", type=_int_list, default=[1], help="node counts")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--placement", choices=["contiguous", "traffic", "trace"], default="contiguous")
    p.add_argument("--preset", choices=sorted(PRESETS), default="nvlink-ib")
    p.add_argument("--hidden", type=int, default=None, help="price rows at this hidden size")
    p.add_argument("--hidden-bytes", type=int, default=None, help="hidden dtype size (2 = bf16)")
    p.add_argument("--num-experts", type=int, default=None, help="JSONL traces: expert count")
    p.add_argument("--json", default=None, help="write the full results here")
    args = p.parse_args(argv)
    try:
        opts = {"num_experts": args.num_experts} if args.trace.endswith(".jsonl") else {}
        trace = load_trace(args.trace, **opts)
        check_has_tokens(trace, args.trace)
        kinds = [k for k in args.kinds.split(",") if k]
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"--kinds: unknown {bad}, expected some of {list(KINDS)}")
        out = sweep(trace, args.ep or [trace.header.ep_size], args.nodes, kinds, args.placement,
                    PRESETS[args.preset], args.hidden, args.hidden_bytes)
    except (ValueError, OSError) as err:
        print(f"epruntime.simulate: {err}", file=sys.stderr)
        return 2
    print(format_table(out))
    if out["skipped"]:
        print("skipped (EP must divide the experts, nodes must divide EP): "
              + ", ".join(f"EP{s['ep_size']}x{s['num_nodes']}" for s in out["skipped"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
