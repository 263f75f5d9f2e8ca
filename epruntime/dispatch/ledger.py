"""CommLedger: exact bytes of every dispatch and combine all-to-all, as the collective saw them.

Dispatchers record from their row plan (`epruntime.dispatch.plan`) at the moment they hand the
rows to the collective: the plan's split counts and row sizes are the very ones the all-to-all
moves, so the ledger's bytes are the bytes that moved (tests/test_dedup_dispatch.py checks them
against a recording transport). Each rank records the row of the (src, dst) matrix it sends;
`summary()` sums the matrices over all ranks.

Counted per layer, phase (dispatch / combine), (src, dst) EP rank, and modality: payload bytes
(hidden rows), metadata bytes (routing weights and slots that travel with them), rows. Alongside,
for the routing each layer saw under its placement: `expert_rows`, the rows a per-expert
dispatcher (megatron-core's alltoall) sends, and `floor_rows`, the (token, remote rank) pairs a
rank-deduplicating dispatcher cannot go below (DESIGN.md, "Communication"); and the (token,
expert) pairs megatron-core's expert capacity dropped or padded (`epruntime.dispatch.capacity`).

The counters live on the device of what is recorded (moved there by the first record) and are
only added to there: recording never syncs with the host. They are read out at report time
(`totals()`, `summary()`), which is where the host syncs happen.

Forward passes only: the backward all-to-alls mirror them (gradients of the combine rows travel
the dispatch path and vice versa), so training moves twice these bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from epruntime.balance import over_layers, rank_balance

if TYPE_CHECKING:
    from epruntime.dispatch.plan import RowPlan

PHASES = ("dispatch", "combine")
MODALITIES = ("text", "vision")
_COUNTERS = ("payload_bytes", "meta_bytes", "rows", "modality_rows", "expert_rows", "floor_rows",
             "tokens", "control_bytes", "tokens_by_nodes", "dropped_pairs", "padded_pairs")


class CommLedger:
    def __init__(self, num_layers: int, ep_size: int, ep_rank: int, ranks_per_node: int):
        if ep_size % ranks_per_node:
            raise ValueError(f"ranks_per_node={ranks_per_node} does not divide ep_size={ep_size}")
        self.num_layers, self.ep_size, self.ep_rank = num_layers, ep_size, ep_rank
        self.ranks_per_node = ranks_per_node
        self.enabled = True
        self.device = torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        L, P, R, M = self.num_layers, len(PHASES), self.ep_size, len(MODALITIES)

        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.int64, device=self.device)

        # [layer, phase, src, dst]; this rank fills the cells it can see.
        self.payload_bytes = zeros(L, P, R, R)
        self.meta_bytes = zeros(L, P, R, R)
        self.rows = zeros(L, P, R, R)
        self.modality_rows = zeros(L, P, M, R, R)
        # [layer, src, dst] for the routing this rank's tokens had.
        self.expert_rows = zeros(L, R, R)
        self.floor_rows = zeros(L, R, R)
        self.tokens = zeros(L, M)
        # [layer, src, dst]: split counts exchanged before the rows (not rows themselves).
        self.control_bytes = zeros(L, R, R)
        # [layer, n]: tokens whose experts live on n nodes (n = 0 .. nodes; group-limited
        # routing's bound, recorded by the token owner)
        self.tokens_by_nodes = zeros(L, R // self.ranks_per_node + 1)
        # [layer, modality] (token, expert) pairs megatron-core's expert capacity dropped, and
        # [layer] padding pairs it added (moe_pad_expert_input_to_capacity); this rank's tokens.
        self.dropped_pairs = zeros(L, M)
        self.padded_pairs = zeros(L)
        self.calls = 0

    def _follow(self, device: torch.device) -> None:
        """Keep the counters where the recorded tensors are (moved once, on the first record)."""
        if device != self.device:
            self.device = device
            for name in _COUNTERS:
                setattr(self, name, getattr(self, name).to(device))

    def _counts(self, x: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """int64 counts on the ledger's device: a device tensor as is, host numbers copied there
        (host to device: no sync)."""
        if isinstance(x, torch.Tensor):
            self._follow(x.device)
            return x.to(torch.int64)
        return torch.as_tensor([int(v) for v in x], dtype=torch.int64, device=self.device)

    def _add(self, name: str, index: tuple, x: torch.Tensor | Sequence[int]) -> None:
        """counter[index] [..., R, R] += x: [..., R, R] (src, dst), or [..., R] = this rank's
        sends (x first brought to the counters' device, which may move them there)."""
        x = self._counts(x)
        cells = getattr(self, name)[index]
        if x.dim() == cells.dim():
            cells += x
        else:
            cells.select(-2, self.ep_rank).add_(x)

    # ---- recording (called by dispatchers, from their row plan) ----------------------------
    def record_rows(self, layer: int, phase: str, rows: torch.Tensor | Sequence[int],
                    payload_row_bytes: int, meta_row_bytes: int = 0,
                    modality_rows: torch.Tensor | None = None) -> None:
        """This rank hands `rows` [R] rows to the all-to-all of `phase` (rows[r] to rank r), each
        `payload_row_bytes` of hidden state and `meta_row_bytes` of metadata. `rows` may be
        [R, R] (src, dst) for a whole group.

        `modality_rows` [2, R] (or [2, R, R]) counts the dispatch rows by their token's
        modality, when the sender knows it (the token owner; see `record_combine_modality` for
        the combine rows).
        """
        if not self.enabled:
            return
        self._record_rows(layer, PHASES.index(phase), rows, payload_row_bytes, meta_row_bytes,
                          modality_rows)
        if phase == "dispatch":
            self.calls += 1

    def _record_rows(self, layer, p, rows, payload_row_bytes, meta_row_bytes, modality_rows):
        rows = self._counts(rows)
        self._add("rows", (layer, p), rows)
        self._add("payload_bytes", (layer, p), rows * payload_row_bytes)
        if meta_row_bytes:
            self._add("meta_bytes", (layer, p), rows * meta_row_bytes)
        if modality_rows is not None:
            self._add("modality_rows", (layer, p), modality_rows)

    def record_exchange(self, layer: int, phase: str, send_splits: Sequence[int],
                        payload: torch.Tensor, meta: torch.Tensor | None = None,
                        src_modality_N: torch.Tensor | None = None) -> None:
        """`record_rows` from the tensors themselves: this rank sends `payload` [N, ...] (and
        `meta` [N, ...]) split by `send_splits` [R]; `src_modality_N` [N] is the modality of each
        row, in split order, when this rank knows it."""
        if not self.enabled:
            return
        if sum(int(s) for s in send_splits) != payload.shape[0]:
            raise ValueError(f"send splits sum to {sum(int(s) for s in send_splits)}, payload "
                             f"has {payload.shape[0]} rows")
        modality = None
        if src_modality_N is not None:
            modality = _count_by_modality(src_modality_N, send_splits)
        self.record_rows(layer, phase, send_splits, row_bytes(payload),
                         0 if meta is None else row_bytes(meta), modality)

    def record_combine_modality(self, layer: int, modality_rows: torch.Tensor) -> None:
        """The token owner's dispatch rows by modality, [2, R] (or [2, R, R] (src, dst)), come
        back in the combine: record them transposed (the expert rank does not know them)."""
        if not self.enabled:
            return
        counts = self._counts(modality_rows)
        cells = self.modality_rows[layer, 1]  # after _counts: on the counters' device
        if counts.dim() == 3:
            cells += counts.transpose(1, 2)
        else:
            cells.select(-1, self.ep_rank).add_(counts)

    def record_control(self, layer: int, bytes_per_dst: torch.Tensor | Sequence[int]) -> None:
        """Bytes of split-count metadata sent before a dispatch: [R] from this rank to each rank,
        or [R, R] (src, dst)."""
        if self.enabled:
            self._add("control_bytes", (layer,), bytes_per_dst)

    def record_routing(self, layer: int, expert_rows: torch.Tensor, floor_rows: torch.Tensor,
                       modality_T: torch.Tensor | None, num_tokens: int,
                       token_nodes_T: torch.Tensor | None = None) -> None:
        """Per destination rank ([R] this rank's, or [R, R] (src, dst), e.g. a plan's
        `expert_rows_RR` / `floor_rows_RR`): (token, expert) pairs and distinct (token, rank)
        pairs; tokens by modality (values other than 0 / 1, or None, count as text);
        `token_nodes_T` [T] (a plan's): the nodes each token's experts live on, counted into
        `tokens_by_nodes` (no host sync)."""
        if not self.enabled:
            return
        self._add("expert_rows", (layer,), expert_rows)
        self._add("floor_rows", (layer,), floor_rows)
        if token_nodes_T is not None:
            nodes_T = self._counts(token_nodes_T)
            self.tokens_by_nodes[layer].index_add_(0, nodes_T, torch.ones_like(nodes_T))
        if modality_T is None:
            self.tokens[layer, 0] += num_tokens
        else:
            vision = (modality_T.to(self.device) == 1).sum()
            self.tokens[layer] += torch.stack([num_tokens - vision, vision])

    def record_capacity(self, layer: int, dropped_M: torch.Tensor, padded: torch.Tensor) -> None:
        """This rank's tokens lost `dropped_M` [2] (text, vision) (token, expert) pairs to expert
        capacity and were given `padded` padding pairs (epruntime.dispatch.capacity)."""
        if not self.enabled:
            return
        dropped_M, padded = self._counts(dropped_M), self._counts(padded)  # may move counters
        self.dropped_pairs[layer] += dropped_M
        self.padded_pairs[layer] += padded

    def record_plan(self, layer: int, plan: "RowPlan", modality_T: torch.Tensor | None = None,
                    calls: int = 1) -> None:
        """Every cell of a group's `plan` (source_rank [T]) over `calls` forward calls: routing,
        control (paid per call), each hop's dispatch rows and the combine rows back. The
        simulator's ledger; does not count calls."""
        if not self.enabled:
            return
        self.record_routing(layer, plan.expert_rows_RR, plan.floor_rows_RR, modality_T,
                            plan.num_tokens, plan.token_nodes_T)
        self.record_control(layer, plan.control_bytes_RR * calls)
        modality = [None if modality_T is None else hop.modality_rows(modality_T)
                    for hop in plan.hops]
        for hop, mod in zip(plan.hops, modality):
            self._record_rows(layer, 0, hop.rows_RR, hop.payload_row_bytes, hop.meta_row_bytes,
                              mod)
        for hop, mod in zip(reversed(plan.hops), reversed(modality)):
            self._record_rows(layer, 1, hop.rows_RR.t(), hop.payload_row_bytes, 0, None)
            if mod is not None:
                self.record_combine_modality(layer, mod)

    # ---- reporting ---------------------------------------------------------------------------
    def totals(self, group=None) -> "CommLedger":
        """A CPU copy with every rank's cells summed over `group` (None: this rank only): the
        read-out, where the counters come to the host."""
        out = CommLedger(self.num_layers, self.ep_size, self.ep_rank, self.ranks_per_node)
        reduce = group is not None and dist.get_world_size(group) > 1
        # NCCL reduces device tensors, gloo host ones.
        device = self.device
        if reduce:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        for name in _COUNTERS:
            t = getattr(self, name).to(device, copy=True)
            if reduce:
                dist.all_reduce(t, group=group)
            setattr(out, name, t.cpu())
        out.calls = self.calls
        return out

    def masks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[R, R] bool on the counters' device: cross-rank (src != dst), intra-node cross-rank,
        inter-node."""
        r = torch.arange(self.ep_size, device=self.device)
        node = r // self.ranks_per_node
        cross = r[:, None] != r[None, :]
        inter = node[:, None] != node[None, :]
        return cross, cross & ~inter, inter

    def summary(self, group=None) -> dict:
        """Totals and per-layer figures summed over `group` (JSON-able). Balance: per layer
        `balancedness` and `overload` of the rank loads, and over layers `balancedness` (mean),
        `balancedness_p5/p50/p95/min`, `overload_max/p50` (epruntime.balance)."""
        t = self.totals(group)
        cross, intra, inter = t.masks()
        bytes_LPRR = t.payload_bytes + t.meta_bytes
        # Balance per layer (epruntime.balance, the planner's definition) and over layers.
        balancedness_L, overload_L = rank_balance(t.expert_rows.sum(dim=1))

        def figures(layers: slice) -> dict:
            b = bytes_LPRR[layers]
            rows_sent = int(t.rows[layers, 0][:, cross].sum())
            floor = int(t.floor_rows[layers][:, cross].sum())
            expert = int(t.expert_rows[layers][:, cross].sum())
            out = {
                "cross_rank_bytes": int(b[..., cross].sum()),
                "intra_node_bytes": int(b[..., intra].sum()),
                "inter_node_bytes": int(b[..., inter].sum()),
                "local_bytes": int(b[..., ~cross].sum()),
                "control_bytes": int(t.control_bytes[layers][:, cross].sum()),
                "payload_bytes": int(t.payload_bytes[layers][..., cross].sum()),
                "meta_bytes": int(t.meta_bytes[layers][..., cross].sum()),
                "rows_sent": rows_sent,
                "inter_node_rows": int(t.rows[layers, 0][:, inter].sum()),
                "expert_rows": expert,
                "floor_rows": floor,
                "rows_over_floor": rows_sent / floor if floor else None,
                "rows_over_expert_rows": rows_sent / expert if expert else None,
                # (token, expert) pairs each rank's experts computed (the rank load), and
                # mean/max over ranks (vLLM's balancedness), averaged over layers.
                "load_per_rank": t.expert_rows[layers].sum(dim=(0, 1)).tolist(),
                "balancedness": float(balancedness_L[layers].mean()),
                # [src][dst] bytes (payload + metadata, dispatch + combine, diagonal = local)
                "bytes_matrix": b.sum(dim=(0, 1)).tolist(),
                # expert capacity (model.moe_expert_capacity_factor): pairs dropped, by the
                # token's modality, and padding pairs added
                "dropped_pairs": int(t.dropped_pairs[layers].sum()),
                **{f"dropped_pairs_{mod}": int(t.dropped_pairs[layers, m].sum())
                   for m, mod in enumerate(MODALITIES)},
                "padded_pairs": int(t.padded_pairs[layers].sum()),
            }
            for p, phase in enumerate(PHASES):
                out[f"{phase}_cross_rank_bytes"] = int(b[:, p][..., cross].sum())
                for m, mod in enumerate(MODALITIES):
                    out[f"{phase}_{mod}_cross_rank_rows"] = int(
                        t.modality_rows[layers, p, m][:, cross].sum())
            return out

        per_layer = [figures(slice(layer, layer + 1)) | {"overload": float(overload_L[layer])}
                     for layer in range(self.num_layers)]
        by_nodes = t.tokens_by_nodes.sum(0)
        reached = by_nodes.nonzero()
        return {
            "ep_size": self.ep_size,
            "ranks_per_node": self.ranks_per_node,
            "forward_calls": t.calls,
            # tokens (summed over layers) whose experts lived on n nodes, n = 0 .. nodes, and the
            # most nodes any token reached (group-limited routing bounds it by group_topk)
            "tokens_by_nodes": by_nodes.tolist(),
            "max_nodes_per_token": int(reached.max()) if reached.numel() else 0,
            "tokens": {mod: int(t.tokens[:, m].sum()) for m, mod in enumerate(MODALITIES)},
            **figures(slice(None)),
            **{k: v for k, v in over_layers(balancedness_L, overload_L).items()
               if k != "balancedness_mean"},  # that is "balancedness"
            "per_layer": per_layer,
        }


def row_bytes(t: torch.Tensor) -> int:
    """Bytes of one row (first dimension) of `t`."""
    return math.prod(t.shape[1:]) * t.element_size()


def _count_by_modality(modality_N: torch.Tensor, splits: Sequence[int]) -> torch.Tensor:
    """[2, R] rows per (modality, rank) for rows laid out in rank order by host `splits` (on
    modality_N's device, no sync)."""
    r, dev = len(splits), modality_N.device
    counts = torch.as_tensor([int(s) for s in splits], dtype=torch.int64, device=dev)
    rank_N = torch.repeat_interleave(torch.arange(r, device=dev), counts,
                                     output_size=modality_N.shape[0])
    flat = modality_N.to(torch.int64) * r + rank_N
    out = torch.zeros(2 * r, dtype=torch.int64, device=dev)
    return out.index_add_(0, flat, torch.ones_like(flat)).view(2, r)

