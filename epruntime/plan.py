"""Expert planner: fit placements on routing data, score them on other routing data.

    python -m epruntime.plan --fit runs/train/traces --split 0.5 --ep 8 --redundant 16 \
        --out placement.json --json report.json
    python -m epruntime.plan --fit arxiv.json --score c4.json --ep 32 --ranks-per-node 8 \
        --redundant 32

Inputs (detected by content, not by suffix):
- epruntime traces (a `traces/` directory or one rank*.npz) and their JSONL form
  ({"layer", "experts", "gating_probs"} per line);
- megatron-core's router-trace JSONL (`--moe-routing-trace-path`, megatron-core 0.19): one
  record per (step, stage, block, layer, rank) forward call with `num_tokens`, `topk`,
  `top_indices` [num_tokens][topk] and, when the collector dropped tokens, `token_idx`
  [num_tokens] (or `positions`): a token's identity across layers is (step, stage, block,
  rank, token_idx), so a dropped token stays missing in its layer instead of shifting the rest;
- a routed-experts array [tokens, layers, top_k] (`.npy`, as vLLM and SGLang return it);
- per-layer expert loads ({"expert_usage_by_layer": {layer: {expert: tokens}}}, the
  `expert_statistics.json` format) when only loads are known: balance columns only.

Fit and score apart: `--fit A --score B`, or `--split F` (the first F of the tokens, in token
identity order, fit; the rest score). Without either, fit = score (in-sample, said in the report).

Strategies, side by side on the scored data: contiguous (megatron-core's), eplb (DeepSeek EPLB's
load-only packing, the baseline), traffic (co-activated experts share a rank under a load cap),
traffic+load (traffic, cap --max-imbalance), with --redundant N also eplb and traffic+load with N
redundant copies, and (token inputs) traffic+balance: traffic+load's copies, each source rank
balancing its own batch over the ranks with a local share fitted on calibration calls
(`choose_local_share`). A (token, expert) pair goes to the copy on its own rank, else its node,
else the copies in turn, or by the placement's local share (`placement.replicas.resolve_copies`,
one forward call at a time).

Exit status 2 with a named reason for a bad input, option or an empty result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from epruntime.balance import layer_balance
from epruntime.placement.core import Placement, PlacementError
from epruntime.placement.file import save_placements
from epruntime.placement.groups import RouterGroupError, group_violation
from epruntime.placement.replicas import (eplb_placement, physical_view, rank_loads_from_expert_loads,
                                          resolve_copies, traffic_replica_placement)
from epruntime.placement.strategies import (coactivation_counts, evaluate_placement,
                                            traffic_aware_placement)
from epruntime.traces import TraceError, load_trace


class PlanError(ValueError):
    """A planner input or option that cannot be used; the message names the file or option."""


# ---- routing data ------------------------------------------------------------------------------
@dataclass
class Routing:
    """Routed tokens aligned by identity across layers, or only per-layer expert loads.

    experts_LTK: [L, T, K] int64 logical expert ids, -1 = none (token absent from that layer,
    or fewer than K experts); None for loads-only inputs. key_T: [T] token identity order.
    rank_T: [T] recording rank (-1 unknown). batch_T: [T] forward call (batch) the token was
    routed in (0 when unknown). loads_LE: [L, E] float64 (from tokens when known)."""

    source: str
    num_experts: int
    layers: list[int]  # layer names (as in the input)
    loads_LE: np.ndarray
    experts_LTK: torch.Tensor | None = None
    rank_T: torch.Tensor | None = None
    recorded_ep: int | None = None
    sha256: str = ""
    notes: list[str] = field(default_factory=list)
    batch_T: torch.Tensor | None = None

    @property
    def has_tokens(self) -> bool:
        return self.experts_LTK is not None

    def subset(self, keep_T: torch.Tensor, label: str) -> "Routing":
        e = self.experts_LTK[:, keep_T]
        return Routing(f"{self.source} [{label}]", self.num_experts, self.layers,
                       _loads(e, self.num_experts), e, self.rank_T[keep_T], self.recorded_ep,
                       self.sha256, batch_T=self.batches()[keep_T])

    def batches(self) -> torch.Tensor:
        """[T] forward call of each token (zeros when unknown)."""
        T = self.experts_LTK.shape[1]
        return self.batch_T if self.batch_T is not None else torch.zeros(T, dtype=torch.long)


def _loads(experts_LTK: torch.Tensor, num_experts: int) -> np.ndarray:
    """[L, E] (token, expert) pairs per expert."""
    out = np.zeros((experts_LTK.shape[0], num_experts))
    for layer, e in enumerate(experts_LTK):
        v = e[e >= 0]
        out[layer] = torch.bincount(v, minlength=num_experts)[:num_experts].numpy()
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(path.glob("rank*.npz")) if path.is_dir() else [path]
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def _aligned(records: dict, layers: list[int], k: int, num_experts: int | None, source: str,
             path: Path, recorded_ep: int | None) -> Routing:
    """records: {layer: (keys [N] list of tuples, experts [N, K'] int, rank [N])} -> Routing."""
    keys = sorted({key for layer in layers for key in records[layer][0]})
    pos = {key: i for i, key in enumerate(keys)}
    T, L = len(keys), len(layers)
    experts = torch.full((L, T, k), -1, dtype=torch.long)
    rank = torch.full((T,), -1, dtype=torch.long)
    for li, layer in enumerate(layers):
        ks, ex, rk = records[layer]
        idx = torch.tensor([pos[key] for key in ks], dtype=torch.long)
        ex = torch.as_tensor(ex, dtype=torch.long)
        if len(set(idx.tolist())) != idx.numel():
            raise PlanError(f"{path}: layer {layer} holds the same token twice (duplicate token "
                            "identity: give token_idx per record)")
        experts[li, idx, :ex.shape[1]] = ex
        rank[idx] = torch.as_tensor(rk, dtype=torch.long)
    top = int(experts.max()) if experts.numel() else -1
    e = num_experts or top + 1
    if top >= e:
        raise PlanError(f"{path}: expert id {top} >= --num-experts={e}")
    if T == 0:
        raise PlanError(f"{path}: no routed tokens")
    batch = torch.tensor([key[0] for key in keys], dtype=torch.long)  # keys: (call, rank, token)
    return Routing(source, e, layers, _loads(experts, e), experts, rank, recorded_ep,
                   _sha256(path), batch_T=batch)


def _first_line(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return head.decode("utf-8", "replace").lstrip().split("\n", 1)[0]


def load_routing(path: str | Path, num_experts: int | None = None) -> Routing:
    """Any supported input (see the module docstring), detected by content."""
    path = Path(path)
    if not path.exists():
        raise PlanError(f"{path}: no such file or directory")
    if path.is_dir() or path.read_bytes()[:4] == b"PK\x03\x04":  # trace directory or .npz
        return _from_trace(path, num_experts)
    if path.read_bytes()[:6] == b"\x93NUMPY":
        return _from_npy(path, num_experts)
    first = _first_line(path)
    if not first.startswith("{"):
        raise PlanError(f"{path}: not a trace, router-trace JSONL, routed-experts .npy or loads "
                        "JSON (see python -m epruntime.plan --help)")
    try:
        whole = json.loads(path.read_text())
    except json.JSONDecodeError:
        whole = None  # JSONL: one object per line
    except UnicodeDecodeError as err:
        raise PlanError(f"{path}: not text ({err.reason})") from None
    if isinstance(whole, dict) and "expert_usage_by_layer" in whole:
        return _from_loads(path, whole, num_experts)
    try:
        obj = json.loads(first)
    except json.JSONDecodeError as err:
        raise PlanError(f"{path}:1: not JSON ({err.msg})") from None
    if isinstance(obj, dict) and ("top_indices" in obj or "experts" in obj):
        return _from_trace(path, num_experts)
    raise PlanError(f"{path}:1: neither a megatron-core router-trace record (field "
                    "'top_indices') nor an epruntime JSONL record (field 'experts'), nor a loads "
                    "file (field 'expert_usage_by_layer')")


def _from_trace(path: Path, num_experts: int | None) -> Routing:
    """epruntime traces (npz or JSONL) and megatron-core router traces (epruntime.traces)."""
    try:
        trace = load_trace(path, num_experts=num_experts)
    except TraceError as err:
        raise PlanError(str(err)) from None
    h = trace.header
    if num_experts is not None and h.num_experts > num_experts:
        raise PlanError(f"{path}: the trace has {h.num_experts} experts, --num-experts="
                        f"{num_experts}")
    layers = sorted(set(trace.layer_N.tolist()))
    records = {}
    for layer in layers:
        m = trace.layer_N == layer
        keys = list(zip(trace.call_N[m].tolist(), trace.rank_N[m].tolist(),
                        trace.token_N[m].tolist()))
        records[layer] = (keys, trace.experts_NK[m], trace.rank_N[m])
    return _aligned(records, layers, h.topk, num_experts or h.num_experts,
                    f"epruntime trace {path}", path, h.ep_size)


def _from_npy(path: Path, num_experts: int | None) -> Routing:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise PlanError(f"{path}: not a plain .npy array ({err})") from None
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
        raise PlanError(f"{path}: routed experts must be an integer [tokens, layers, top_k] "
                        f"array, got {arr.dtype} {list(arr.shape)}")
    if arr.size and int(arr.min()) < -1:
        raise PlanError(f"{path}: expert ids must be >= -1 (-1 = none), got {int(arr.min())}")
    T, L, k = arr.shape
    records = {layer: ([(0, 0, t) for t in range(T)], arr[:, layer, :].astype(np.int64),
                       [0] * T) for layer in range(L)}
    out = _aligned(records, list(range(L)), k, num_experts, f"routed experts {path}", path, None)
    out.rank_T[:] = -1
    return out


def _from_loads(path: Path, doc: dict, num_experts: int | None) -> Routing:
    usage = doc["expert_usage_by_layer"]
    if not isinstance(usage, dict) or not usage:
        raise PlanError(f"{path}: field 'expert_usage_by_layer' must be a non-empty object "
                        "{layer: {expert: tokens}}")
    e = num_experts or doc.get("num_experts")
    layers, rows = [], []
    for name, per_expert in usage.items():
        if not isinstance(per_expert, dict) or not per_expert:
            raise PlanError(f"{path}: expert_usage_by_layer[{name!r}] must be an object "
                            "{expert: tokens}")
        try:
            ids = {int(x): v for x, v in per_expert.items()}
            layers.append(int(name))
        except ValueError:
            raise PlanError(f"{path}: expert_usage_by_layer[{name!r}]: layer and expert keys "
                            "must be integers") from None
        bad = [v for v in ids.values() if not isinstance(v, (int, float)) or isinstance(v, bool)
               or not np.isfinite(v) or v < 0]
        if bad:
            raise PlanError(f"{path}: expert_usage_by_layer[{name!r}] holds {bad[0]!r}: loads "
                            "must be finite numbers >= 0")
        e = e or max(ids) + 1
        if not isinstance(e, int) or max(ids) >= e or min(ids) < 0:
            raise PlanError(f"{path}: expert_usage_by_layer[{name!r}] has expert id "
                            f"{max(ids)} outside [0, num_experts={e})")
        row = np.zeros(e)
        row[list(ids)] = list(ids.values())
        rows.append(row)
    order = np.argsort(layers)
    return Routing(f"expert loads {path}", e, [layers[i] for i in order],
                   np.stack([rows[i] for i in order]), sha256=_sha256(path))


# ---- fit / score -------------------------------------------------------------------------------
def split_routing(r: Routing, fraction: float) -> tuple[Routing, Routing]:
    """First `fraction` of the tokens (in identity order) fit, the rest score."""
    if not r.has_tokens:
        raise PlanError(f"--split needs tokens; {r.source} holds only expert loads (use --fit "
                        "and --score with two loads files)")
    if not 0 < fraction < 1:
        raise PlanError(f"--split must be in (0, 1), got {fraction}")
    T = r.experts_LTK.shape[1]
    cut = int(round(T * fraction))
    if cut == 0 or cut == T:
        raise PlanError(f"--split {fraction}: {T} tokens leave nothing to fit or to score")
    keep = torch.zeros(T, dtype=torch.bool)
    keep[:cut] = True
    return r.subset(keep, f"first {cut} tokens"), r.subset(~keep, f"last {T - cut} tokens")


def source_ranks(r: Routing, ep: int) -> torch.Tensor:
    """[T] source rank: as recorded when the recording EP equals `ep`, else dealt round-robin
    in token identity order (the same batch spread over `ep` ranks)."""
    T = r.experts_LTK.shape[1]
    if r.recorded_ep == ep and bool((r.rank_T >= 0).all()):
        return r.rank_T.clone()
    return torch.arange(T) % ep


STRATEGIES = ("contiguous", "eplb", "traffic", "traffic+load")
BALANCED = "traffic+balance"  # traffic+load's copies, each source balancing its own batch


def local_coverage(p: Placement, r: Routing, li: int, src_T: torch.Tensor) -> list[tuple]:
    """[(batch, source rank, pairs, share of them with a copy on the source rank)] for every
    (forward call, source rank) of layer `li`."""
    idx = r.experts_LTK[li]
    valid = idx >= 0
    cand = p.log2phy_EC[idx.clamp(min=0)]
    here = ((cand >= 0) & (torch.div(cand, p.num_local, rounding_mode="floor")
                           == src_T[:, None, None])).any(-1) & valid
    out = []
    batch_T = r.batches()
    for b in torch.unique(batch_T).tolist():
        for s in torch.unique(src_T[batch_T == b]).tolist():
            m = (batch_T == b) & (src_T == s)
            n = int(valid[m].sum())
            if n:
                out.append((b, s, n, float(here[m].sum()) / n))
    return out


def predicted_overload(coverage: list[tuple], share: float, ep: int) -> float:
    """Worst per-call overload (busiest rank / mean) when every source keeps min(share, its
    coverage) of its pairs on its own rank and spreads the rest evenly over the other ranks."""
    worst = 1.0
    for b in dict.fromkeys(c[0] for c in coverage):
        load = np.zeros(ep)
        for _, s, n, f in (c for c in coverage if c[0] == b):
            kept = min(share, f) * n
            load += (n - kept) / max(ep - 1, 1)
            load[s] += kept - (n - kept) / max(ep - 1, 1)
        worst = max(worst, load.max() / load.mean())
    return worst


def choose_local_share(fit: Routing, li: int, ep: int, rpn: int, redundant: int,
                       max_imbalance: float) -> float:
    """Local share for `traffic+balance`, validated apart from the fit (held-out-robust).

    Cross-fitting over the calibration calls (by tokens when there is one call): copies placed
    on one half, the share of each (call, source rank)'s pairs that its rank holds read on the
    other half, and the other way round. The share is the largest (0.01 steps) whose predicted
    per-call overload on those validation calls stays within `max_imbalance`, and at most the
    coverage's mean - 2 std over them: a source whose own copies hold less than the share sends
    the rest evenly and overloads the others, and a few calibration calls under-sample the low
    tail of the coverage that held-out calls will show."""
    batch_T = fit.batches()
    calls = torch.unique(batch_T)
    if calls.numel() >= 2:
        first = batch_T <= calls[(calls.numel() - 1) // 2]
    else:
        first = torch.arange(batch_T.numel()) < batch_T.numel() // 2
    halves = [fit.subset(first, "first half"), fit.subset(~first, "second half")]
    coverage = []
    for h, (part, check) in enumerate((halves, halves[::-1])):
        coact = coactivation_counts(part.experts_LTK[li], fit.num_experts)
        p = traffic_replica_placement(coact, part.loads_LE[li], ep, rpn, redundant, max_imbalance)
        coverage += [((h, c[0]), *c[1:])  # calls of the two halves kept apart
                     for c in local_coverage(p, check, li, source_ranks(check, ep))]
    if not coverage:
        return 1.0 / ep
    f = np.array([c[3] for c in coverage])
    cap = float(f.mean() - 2 * f.std())
    for share in np.arange(100, 0, -1) / 100:
        if share <= cap and predicted_overload(coverage, share, ep) <= max_imbalance:
            return max(float(share), 1.0 / ep)
    return 1.0 / ep


def fit_layer(strategy: str, fit: Routing, li: int, ep: int, rpn: int, redundant: int,
              max_imbalance: float, coact=None, num_groups: int | None = None) -> Placement:
    """One layer's placement by `strategy`; with group-limited routing (`num_groups`) the
    traffic strategy places whole groups and any placement splitting one is a RouterGroupError
    (the strategy is skipped)."""
    p = _fit_layer(strategy, fit, li, ep, rpn, redundant, max_imbalance, coact, num_groups)
    if num_groups is not None and (split := group_violation(p, num_groups)) is not None:
        raise RouterGroupError(split)
    return p


def _fit_layer(strategy: str, fit: Routing, li: int, ep: int, rpn: int, redundant: int,
               max_imbalance: float, coact, num_groups: int | None) -> Placement:
    load = fit.loads_LE[li]
    E = fit.num_experts
    if strategy == "contiguous":
        if redundant:
            raise PlacementError("contiguous has no copies")
        return Placement.contiguous(E, ep, rpn)
    if strategy == "eplb":
        return eplb_placement(load, ep, rpn, redundant)
    if strategy == "traffic":
        if redundant:
            raise PlacementError("traffic places one copy per expert")
        C = coact if coact is not None else torch.diag(torch.as_tensor(load))
        return traffic_aware_placement(C.to(torch.float64), ep, rpn,
                                       load_E=torch.as_tensor(load), max_imbalance=1.1,
                                       num_groups=num_groups)
    placed = traffic_replica_placement(coact, load, ep, rpn, redundant, max_imbalance)
    if strategy == BALANCED:
        if not redundant:
            raise PlacementError(f"{BALANCED} needs copies (--redundant > 0)")
        if not fit.has_tokens:
            raise PlacementError(f"{BALANCED} needs tokens (its copy choice is per batch)")
        return placed.with_local_share(choose_local_share(fit, li, ep, rpn, redundant,
                                                          max_imbalance))
    return placed


def score_layer(p: Placement, score: Routing, li: int, src_T, hidden: int, dtype_bytes: int
                ) -> dict:
    """Balance (and rows, when tokens are known) of placement `p` on layer `li` of `score`."""
    if not score.has_tokens:
        load_R = rank_loads_from_expert_loads(score.loads_LE[li], p)
        out = {"rows_per_token": None, "dedup_rows_per_token": None,
               "node_dedup_rows_per_token": None, "inter_node_rows": None, "expert_bytes": None,
               "dedup_bytes": None}
    else:
        idx = score.experts_LTK[li]
        present = (idx >= 0).any(1)
        idx, src, batch = idx[present], src_T[present], score.batches()[present]
        phys = torch.empty_like(idx)
        for b in torch.unique(batch).tolist():  # one forward call at a time, as the runtime
            m = batch == b
            phys[m] = resolve_copies(idx[m], p, src[m])
        ev = evaluate_placement(phys, physical_view(p), src)
        T = max(int(present.sum()), 1)
        load_R = np.asarray(ev["load_per_rank"], dtype=np.float64)
        row_bytes = hidden * dtype_bytes
        out = {"rows_per_token": ev["expert_rows"] / T, "dedup_rows_per_token": ev["dedup_rows"] / T,
               "node_dedup_rows_per_token": (ev["node_dedup_rows"]
                                             + ev["dedup_rows"] - ev["inter_node_dedup_rows"]) / T,
               "inter_node_rows": ev["inter_node_dedup_rows"],
               "inter_node_expert_rows": ev["inter_node_expert_rows"],
               "expert_bytes": ev["expert_rows"] * row_bytes,
               "dedup_bytes": ev["dedup_rows"] * row_bytes}
    out["balancedness"], out["overload"] = layer_balance(load_R)  # the runtime's definition
    return out


def plan(fit: Routing, score: Routing, ep: int, rpn: int, redundant: int, max_imbalance: float,
         hidden: int, dtype_bytes: int, scored_on: str, num_groups: int | None = None,
         only: set[tuple[str, int]] | None = None) -> tuple[list[dict], dict, list[str]]:
    """(rows, {(strategy, redundant): [Placement per layer]}, skipped reasons); `only` keeps
    those (strategy, redundant) runs."""
    if fit.num_experts != score.num_experts:
        raise PlanError(f"--fit has {fit.num_experts} experts, --score {score.num_experts}")
    if fit.layers != score.layers:
        raise PlanError(f"--fit has layers {fit.layers}, --score {score.layers}")
    if ep % rpn:
        raise PlanError(f"--ranks-per-node={rpn} must divide --ep={ep}")
    runs = [(s, 0) for s in STRATEGIES]
    if redundant:
        runs += [("eplb", redundant), ("traffic+load", redundant)]
        if fit.has_tokens and score.has_tokens:
            runs.append((BALANCED, redundant))
    if only is not None:
        runs = [x for x in runs if x in only]
    src = source_ranks(score, ep) if score.has_tokens else None
    rows, placements, skipped = [], {}, []
    for strategy, red in runs:
        per_layer, layer_rows = [], []
        try:
            for li, layer in enumerate(fit.layers):
                t0 = time.perf_counter()
                coact = (coactivation_counts(fit.experts_LTK[li], fit.num_experts)
                         if fit.has_tokens and strategy != "eplb" else None)
                p = fit_layer(strategy, fit, li, ep, rpn, red, max_imbalance, coact, num_groups)
                t1 = time.perf_counter()
                per_layer.append(p)
                layer_rows.append({"strategy": strategy, "layer": layer, "redundant": red,
                                   "scored_on": scored_on, "local_share": p.local_share,
                                   **score_layer(p, score, li, src, hidden, dtype_bytes),
                                   "fit_seconds": t1 - t0,
                                   "score_seconds": time.perf_counter() - t1})
        except PlacementError as err:
            skipped.append(f"{strategy} redundant={red}: {err}")
            continue
        placements[(strategy, red)] = per_layer
        rows += layer_rows
    if not rows:
        raise PlanError("no strategy fits: " + "; ".join(skipped))
    return rows, placements, skipped


def summarize(rows: list[dict]) -> list[dict]:
    """Per (strategy, redundant): balancedness mean / p5 / min over layers, max overload,
    mean rows per token."""
    out = []
    for key in dict.fromkeys((r["strategy"], r["redundant"]) for r in rows):
        rs = [r for r in rows if (r["strategy"], r["redundant"]) == key]
        b = sorted(r["balancedness"] for r in rs)
        s = {"strategy": key[0], "redundant": key[1], "balancedness_mean": statistics.fmean(b),
             "balancedness_p5": float(np.percentile(b, 5)), "balancedness_min": b[0],
             "overload_max": max(r["overload"] for r in rs)}
        for col in ("rows_per_token", "dedup_rows_per_token", "node_dedup_rows_per_token",
                    "inter_node_rows", "expert_bytes", "dedup_bytes"):
            vals = [r[col] for r in rs if r.get(col) is not None]
            s[col] = (sum(vals) if col in ("inter_node_rows", "expert_bytes", "dedup_bytes")
                      else statistics.fmean(vals)) if vals else None
        out.append(s)
    return out


def format_table(summary: list[dict]) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)
    lines = [f"{'strategy':<14} {'red':>4} {'bal_mean':>8} {'bal_p5':>7} {'bal_min':>7} "
             f"{'overload':>8} {'rows/tok':>8} {'dedup/tok':>9} {'node/tok':>8} "
             f"{'inter_rows':>10} {'dedup_MB':>9}"]
    for s in summary:
        lines.append(f"{s['strategy']:<14} {s['redundant']:>4} {s['balancedness_mean']:>8.4f} "
                     f"{s['balancedness_p5']:>7.4f} {s['balancedness_min']:>7.4f} "
                     f"{s['overload_max']:>8.3f} {f(s['rows_per_token'], '8.3f')} "
                     f"{f(s['dedup_rows_per_token'], '9.3f')} "
                     f"{f(s['node_dedup_rows_per_token'], '8.3f')} "
                     f"{f(s['inter_node_rows'], '10.0f')} "
                     f"{f(None if s['dedup_bytes'] is None else s['dedup_bytes'] / 1e6, '9.2f')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("epruntime.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--fit", required=True, help="routing data to fit placements on")
    p.add_argument("--score", help="routing data to score them on (default: --split, or --fit)")
    p.add_argument("--split", type=float, help="fit on the first F of --fit's tokens, score on "
                   "the rest")
    p.add_argument("--ep", type=int, required=True, help="EP ranks")
    p.add_argument("--ranks-per-node", type=int, default=None, help="default: --ep (one node)")
    p.add_argument("--redundant", type=int, default=0, help="extra physical slots (copies)")
    p.add_argument("--max-imbalance", type=float, default=1.05,
                   help="traffic strategies: busiest rank at most this x the mean (fit data)")
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--hidden", type=int, default=4096, help="price rows at this hidden size")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per element (2 = bf16)")
    p.add_argument("--out", help="write the chosen strategy's placement file here")
    p.add_argument("--out-strategy", default="traffic+load",
                   help="which strategy's placements --out writes (at --redundant); "
                        "traffic+balance writes each layer's local_share too")
    p.add_argument("--json", help="write {'rows': [...], 'summary': [...]} here")
    p.add_argument("--router-groups", type=int, default=None,
                   help="the model's moe_router_num_groups (group-limited routing): place whole "
                        "groups; strategies that would split one are skipped")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        for name in ("ep", "hidden", "dtype_bytes"):
            if getattr(args, name) < 1:
                raise PlanError(f"--{name.replace('_', '-')} must be >= 1")
        if args.ranks_per_node is not None and args.ranks_per_node < 1:
            raise PlanError("--ranks-per-node must be >= 1")
        if args.redundant < 0:
            raise PlanError(f"--redundant must be >= 0, got {args.redundant}")
        if not args.max_imbalance >= 1.0:
            raise PlanError(f"--max-imbalance must be >= 1.0, got {args.max_imbalance}")
        if args.num_experts is not None and args.num_experts < 1:
            raise PlanError("--num-experts must be >= 1")
        if args.score and args.split is not None:
            raise PlanError("give --score or --split, not both")
        fit = load_routing(args.fit, args.num_experts)
        if args.score:
            score = load_routing(args.score, args.num_experts or fit.num_experts)
            scored_on = f"held-out: fit {args.fit}, scored on {args.score}"
        elif args.split is not None:
            fit, score = split_routing(fit, args.split)
            scored_on = f"held-out: {fit.source} fit, {score.source} scored"
        else:
            score = fit
            scored_on = f"in-sample: fit and scored on {args.fit}"
        rpn = args.ranks_per_node or args.ep
        rows, placements, skipped = plan(fit, score, args.ep, rpn, args.redundant,
                                         args.max_imbalance, args.hidden, args.dtype_bytes,
                                         scored_on, args.router_groups)
        key = (args.out_strategy, args.redundant)
        if args.out and key not in placements:
            raise PlanError(f"--out-strategy {args.out_strategy} at --redundant {args.redundant} "
                            f"was not computed (computed: {sorted(placements)}; skipped: "
                            f"{skipped})")
    except (PlanError, PlacementError, OSError) as err:
        print(f"epruntime.plan: {err}", file=sys.stderr)
        return 2
    summary = summarize(rows)
    print(f"epruntime.plan: {scored_on}; EP={args.ep}, {args.ep // rpn} node(s), "
          f"{fit.num_experts} experts, {len(fit.layers)} layers, redundant={args.redundant}"
          + ("" if score.has_tokens else " (loads only: balance columns)"))
    print(format_table(summary))
    for reason in skipped:
        print(f"skipped: {reason}")
    if args.out:
        save_placements(args.out, placements[key], fit.sha256, args.out_strategy,
                        {"redundant": args.redundant, "fit": args.fit, "scored_on": scored_on})
        print(f"placement file: {args.out} ({args.out_strategy}, redundant={args.redundant})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary,
                                               "scored_on": scored_on, "skipped": skipped,
                                               "seconds": time.perf_counter() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
