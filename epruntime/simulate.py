"""Scale simulator: replay a routing trace at any EP size, node count, placement and dispatcher.

    python -m epruntime.simulate --trace runs/train/traces --ep 8,16,32 --nodes 1,2,4 \
        --preset nvlink-ib --json sweep.json

For each dispatcher it rebuilds the (src, dst) row matrices the real one would hand to
all_to_all from the same row plan the dispatchers move bytes by (`epruntime.dispatch.plan`,
whose docstring defines every payload, metadata and control byte): alltoall is the plan's
"expert" kind (megatron-core), dedup its "rank" kind, dedup-hier its "node" kind (with the
modality column the ledger's runs carry). Combine sends every dispatch row back, hops in reverse.

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
from epruntime.dispatch.plan import COUNT_BYTES, META_BYTES, routing_map_from_topk, row_plan
from epruntime.placement import Placement
from epruntime.placement.replicas import physical_view, resolve_copies
from epruntime.traces import RoutingTrace, load_trace

KINDS = ("alltoall", "dedup", "dedup-hier")
PLAN_KINDS = {"alltoall": "expert", "dedup": "rank", "dedup-hier": "node"}  # dispatch.kind -> plan
__all__ = ["COUNT_BYTES", "KINDS", "META_BYTES", "LinkModel", "PRESETS", "SimResult",
           "exchange_time", "layer_exchanges", "main", "simulate", "source_ranks", "sweep"]


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


def copies_by_call(experts_NK: torch.Tensor, placement: Placement, src_N: torch.Tensor,
                   call_N: torch.Tensor | None) -> torch.Tensor:
    """[N, K] physical slot of each pair: `resolve_copies` over one forward call at a time when
    the placement balances each source's own batch (`local_share`) and calls are known."""
    if placement.local_share is None or call_N is None:
        return resolve_copies(experts_NK, placement, src_N)
    out = torch.empty_like(experts_NK, dtype=torch.long)
    for call in torch.unique(call_N).tolist():
        m = call_N == call
        out[m] = resolve_copies(experts_NK[m], placement, src_N[m])
    return out


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
                    layer: int, call_N: torch.Tensor | None = None) -> list[Exchange]:
    """Fill `ledger`'s cells for one layer and return its all-to-alls (summed over calls).

    experts_NK [N, K] logical expert ids (-1 none), src_N [N] source rank, modality_N [N]
    (traces.UNKNOWN_MODALITY = unknown). Rows and bytes are the row plan's
    (`epruntime.dispatch.plan`) for every source rank at once. call_N [N] forward call of each
    record: a placement with a `local_share` balances each (call, source rank)'s own batch, as
    the runtime does, so its copies are chosen call by call.
    """
    if kind not in KINDS:
        raise ValueError(f"dispatch kind {kind!r}: expected one of {KINDS}")
    if placement.is_replicated:  # each pair to one copy; then route slot by slot
        experts_NK = copies_by_call(experts_NK, placement, src_N, call_N)
        placement = physical_view(placement)
    routing_NE = routing_map_from_topk(experts_NK, placement.num_experts)
    plan = row_plan(routing_NE, None, placement, PLAN_KINDS[kind], source_rank=src_N, topk=topk,
                    hidden_size=hidden, hidden_bytes=hidden_bytes, prob_bytes=prob_bytes,
                    modality_column=True)  # the ledger records: node dedup's modality column
    ledger.record_plan(layer, plan, modality_N, calls)
    ex: list[Exchange] = []
    for i, hop in enumerate(plan.hops):
        if hop.control_bytes:
            name = "counts" if len(plan.hops) == 1 else f"counts{i + 1}"
            ex.append(Exchange("dispatch", name, hop.control_bytes_RR * calls, False))
        ex += [Exchange("dispatch", name, bytes_RR) for name, bytes_RR in hop.messages()]
    ex += [Exchange("combine", hop.name, hop.rows_RR.t() * hop.payload_row_bytes)
           for hop in reversed(plan.hops)]
    return ex


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
    if isinstance(spec, str) and spec.startswith("file:"):
        from epruntime.placement.file import check_fits, load_placements
        spec_list, _ = load_placements(spec[len("file:"):], ranks_per_node)
        check_fits(spec_list, h.num_layers, h.num_experts, ep_size, spec)
        spec = spec_list
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
    if ep_size % per_node:
        raise ValueError(f"ranks_per_node={per_node} does not divide ep_size={ep_size}")
    link = link or PRESETS["nvlink-ib"]
    hidden, hb = hidden or h.hidden, hidden_dtype_bytes or h.hidden_dtype_bytes
    if h.num_experts % ep_size and not (isinstance(placements, list) or (
            isinstance(placements, str) and placements.startswith("file:"))):
        raise ValueError(f"ep_size={ep_size} does not divide the trace's {h.num_experts} experts "
                         "(a placement file with copies can hold them)")
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
                                    h.prob_dtype_bytes, calls, ledger, layer,
                                    call_N=trace.call_N[keep])
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
            uneven = trace.header.num_experts % ep and not str(placements).startswith("file:")
            if uneven or nodes > ep or ep % nodes:
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


def _placement_spec(text: str) -> str:
    if text in ("contiguous", "traffic", "trace") or (text.startswith("file:") and text[5:]):
        return text
    raise argparse.ArgumentTypeError(f"expected contiguous, traffic, trace or file:PATH, got "
                                     f"{text!r}")


def is_jsonl(path: str | Path) -> bool:
    """Whether `path` is a JSON-lines file, by its first bytes (a directory or .npz is not)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return head.startswith(b"{")


def check_expert_ids(trace: RoutingTrace, num_experts: int | None, where: str) -> None:
    """ValueError when the trace's expert ids do not fit --num-experts (either way: ids beyond
    it, or a count that would invent experts that never appear in the trace's header)."""
    if num_experts is None:
        return
    top = int(trace.experts_NK.max()) if trace.num_records else -1
    if top >= num_experts:
        raise ValueError(f"{where}: expert id {top} >= --num-experts={num_experts}")
    if trace.header.num_experts != num_experts:
        raise ValueError(f"{where}: the trace has {trace.header.num_experts} experts, "
                         f"--num-experts={num_experts}")
    seen = int(trace.experts_NK[trace.experts_NK >= 0].unique().numel())
    if seen < num_experts:  # not an error (cold experts exist), but say it plainly
        print(f"epruntime.simulate: warning: {where}: {num_experts - seen} of --num-experts="
              f"{num_experts} never routed in the trace (ids seen: {seen}, largest {top})",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("epruntime.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, help="trace directory, rank*.npz file or .jsonl")
    p.add_argument("--ep", type=_int_list, default=None, help="EP sizes (default: the trace's)")
    p.add_argument("--nodes", type=_int_list, default=[1], help="node counts")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--placement", type=_placement_spec, default="contiguous",
                   help="contiguous, traffic (in-sample), trace, or file:PATH (a placement file "
                   "from python -m epruntime.plan, copies included)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="nvlink-ib")
    p.add_argument("--hidden", type=int, default=None, help="price rows at this hidden size")
    p.add_argument("--hidden-bytes", type=int, default=None, help="hidden dtype size (2 = bf16)")
    p.add_argument("--num-experts", type=int, default=None, help="JSONL traces: expert count")
    p.add_argument("--json", default=None, help="write the full results here")
    args = p.parse_args(argv)
    try:
        if args.num_experts is not None and args.num_experts < 1:
            raise ValueError(f"--num-experts must be >= 1, got {args.num_experts}")
        jsonl = is_jsonl(args.trace)
        opts = {"num_experts": args.num_experts} if jsonl else {}
        trace = load_trace(args.trace, jsonl=jsonl, **opts)
        check_has_tokens(trace, args.trace)
        check_expert_ids(trace, args.num_experts, args.trace)
        kinds = [k for k in args.kinds.split(",") if k]
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"--kinds: unknown {bad}, expected some of {list(KINDS)}")
        out = sweep(trace, args.ep or [trace.header.ep_size], args.nodes, kinds, args.placement,
                    PRESETS[args.preset], args.hidden, args.hidden_bytes)
    except (ValueError, OSError) as err:  # TraceError and PlacementError are ValueErrors
        print(f"epruntime.simulate: {err}", file=sys.stderr)
        return 2
    if not out["results"]:
        tried = ", ".join(f"EP{s['ep_size']}x{s['num_nodes']}" for s in out["skipped"])
        print(f"epruntime.simulate: nothing to simulate: every (EP, nodes) was invalid ({tried}); "
              f"EP must divide the trace's {trace.header.num_experts} experts (or use a placement "
              "file with copies) and the node count must divide EP", file=sys.stderr)
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
