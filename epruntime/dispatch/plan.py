"""The row plan: which rows of one MoE layer cross the wire, to whom, and what every byte costs.

One definition of the wire format (DESIGN.md, "Communication"), EPLB style: tensors in, a frozen
dataclass out, no process group, no megatron-core. The dispatchers move bytes by it, the
CommLedger records from it, the simulator and `placement.strategies.evaluate_placement` count
with it.

    plan = row_plan(routing_map_TE, probs_TE, placement, "rank", source_rank=ep_rank,
                    topk=k, hidden_size=H, hidden_bytes=x.element_size())
    hop = plan.hops[0]                       # the all-to-all(s) of the dispatch, in order
    hop.splits_R                             # rows this rank sends to each rank
    token_N, dest_N = hop.rows(num_rows=N)   # rank-major, tokens ascending within a rank
    slot_NM, prob_NM = hop.entries(token_N, dest_N)
    plan.expert_rows_RR, plan.floor_rows_RR, plan.control_bytes_RR   # what the ledger records

Kinds (combine sends every dispatch row back, payload only, hops in reverse order):

    "expert"  megatron-core's MoEAlltoAllTokenDispatcher: one row per (token, expert) pair.
              Metadata: the pair's routing prob (prob dtype). Control: every rank all-gathers the
              [E] int64 counts of every rank (E x 8 bytes to each rank; none at EP 1).
    "rank"    rank dedup (DedupTokenDispatcher, DeepEP's layout): one row per (token,
              destination rank). Metadata: 2M float32 (M weights, then M local slots as floats,
              -1 unused), M = min(top-k, experts per rank). Control: the [R] int64 row counts
              (8 bytes to each rank).
    "node"    node dedup (HierDedupTokenDispatcher): hop 1, one row per (token, destination
              node) to the gateway rank with the sender's local index in that node, metadata
              2 M1 float32, M1 = min(top-k, experts per node), plus one modality column when
              the ledger records (`modality_column`); hop 2, one row per (token, rank) from the
              gateway inside the node, metadata 2M. Control: [R] int64 counts before each hop.

Rows and weights travel packed in one all-to-all when the hidden dtype is float32 like the
metadata (`Hop.packed`), else as two; megatron-core always sends its probs separately.

Shapes: T tokens, E experts, R ranks, L experts per rank, G destination groups of a hop (ranks,
or nodes for node dedup's hop 1), Q expert slots per group, M (slot, weight) entries per row,
N rows. (src, dst) matrices are [R, R]: a rank's own plan (`source_rank` an int) fills its row
only; a group's plan (`source_rank` a [T] tensor, the simulator) fills every row.

Everything stays on the routing's device with fixed shapes: nothing here syncs with the host,
except `Hop.rows()` without `num_rows` (its length is data-dependent) and `debug_checks=True`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from epruntime import kernels
from epruntime.placement.core import Placement

KINDS = ("expert", "rank", "node")
COUNT_BYTES = 8  # int64 split counts
META_BYTES = 4  # dedup metadata (weights, slots as floats, modality) travels as float32

__all__ = ["COUNT_BYTES", "KINDS", "META_BYTES", "Hop", "RowPlan", "physical_row_plan",
           "routing_map_from_topk", "row_plan", "to_physical"]


@dataclass(frozen=True, eq=False)
class Hop:
    """One all-to-all of rows (derived quantities are cached properties)."""

    name: str  # "tokens" (per-expert), "rows" (rank dedup), "rows1" / "rows2" (node dedup)
    rows_TR: Tensor  # [T, R] int64: rows token t sends to rank r (0 or 1 for the dedup kinds)
    source_TR: Tensor  # [T, R] int64: the rank sending them (the token's; hop 2: the gateway)
    single_source: int | None  # the sending rank of a rank's own plan; None for a group's plan
    group_size: int  # ranks per destination group: 1, or ranks per node for node dedup's hop 1
    used_TGQ: Tensor  # [T, G, Q] bool: slot q of destination group g serves token t
    probs_TGQ: Tensor | None  # [T, G, Q] its routing weight (differentiable), None: counts only
    max_entries: int  # M: (slot, weight) entries per row
    payload_row_bytes: int  # hidden x hidden dtype size
    meta_row_bytes: int  # metadata bytes travelling with each row
    control_bytes: int  # split-count bytes each rank sends each rank before this hop, per call
    packed: bool  # rows and metadata in one all-to-all (both float32)
    modality_column: bool = False  # node dedup hop 1: the token's modality travels as a column

    @property
    def num_ranks(self) -> int:
        return self.rows_TR.shape[1]

    @functools.cached_property
    def splits_R(self) -> Tensor:
        """[R] int64 rows sent to each rank (summed over sources: a rank's own send splits)."""
        return self.rows_TR.sum(0)

    @functools.cached_property
    def sends_TR(self) -> Tensor:
        """[T, R] bool: token t has a row for rank r."""
        return self.rows_TR > 0

    @functools.cached_property
    def rows_RR(self) -> Tensor:
        """[R, R] int64 rows per (src, dst)."""
        return _pairs(self.source_TR, self.rows_TR, self.num_ranks, self.single_source)

    @property
    def row_bytes(self) -> int:
        """Payload plus metadata bytes of one dispatch row."""
        return self.payload_row_bytes + self.meta_row_bytes

    @functools.cached_property
    def control_bytes_RR(self) -> Tensor:
        """[R, R] int64 split-count bytes per (src, dst) per call: every rank of a group's plan,
        the sending rank only in a rank's own plan."""
        r = self.num_ranks
        out = torch.zeros(r, r, dtype=torch.int64, device=self.rows_TR.device)
        if self.single_source is None:
            return out.fill_(self.control_bytes)
        out[self.single_source] = self.control_bytes
        return out

    def rows(self, num_rows: int | None = None) -> tuple[Tensor, Tensor]:
        """(token_N, dest_N) int64 [N] of every row: rank-major, tokens ascending in a rank.

        `num_rows` = N when the host knows it already (the sum of the host split counts): then no
        sync; without it, N is data-dependent (a host sync on GPUs).
        """
        if self.name == "tokens":
            raise ValueError("a per-expert hop has one row per (token, expert); megatron-core "
                             "orders those rows itself")
        mask_RT = self.sends_TR.t()
        if num_rows is None:
            dest_N, token_N = mask_RT.nonzero(as_tuple=True)
            return token_N, dest_N
        nz = torch.nonzero_static(mask_RT, size=num_rows)
        return nz[:, 1], nz[:, 0]

    def entries(self, token_N: Tensor, dest_N: Tensor, backend: str | None = None
                ) -> tuple[Tensor, Tensor]:
        """The (slot, weight) entries of rows (token_N, dest_N) [N]: slot_NM int64 [N, M],
        destination-group-local slots in ascending order (-1 = unused), prob_NM [N, M] their
        weights (0 where unused; differentiable). `backend`: the kernels backend that picks the
        slots (`epruntime.kernels.row_slots`; None: the device's default)."""
        if self.probs_TGQ is None:
            raise ValueError(f"hop {self.name!r} was planned without probs")
        g_N = dest_N if self.group_size == 1 else torch.div(dest_N, self.group_size,
                                                              rounding_mode="floor")
        _, groups, slots = self.used_TGQ.shape
        slot_NM = kernels.row_slots(self.used_TGQ, token_N, g_N, self.max_entries, backend)
        valid_NM = slot_NM >= 0
        # The weights by flat index into [T, G, Q]: [N, M] gathered, not [N, Q].
        flat_NM = (token_N * groups + g_N)[:, None] * slots + slot_NM.clamp(min=0)
        prob_NM = self.probs_TGQ.reshape(-1)[flat_NM] * valid_NM
        return slot_NM, prob_NM

    def modality_rows(self, modality_T: Tensor) -> Tensor:
        """[2, R, R] int64 rows per (modality, src, dst) by the modality of their token
        (modality_T [T]: 0 text, 1 vision; any other value = unknown, left out)."""
        r, dev = self.num_ranks, self.rows_TR.device
        m = modality_T.to(dev, torch.int64)
        if self.single_source is not None:  # one row of the matrix; fixed shapes, no sync
            out = torch.zeros(2, r, r, dtype=torch.int64, device=dev)
            out[:, self.single_source] = torch.stack(
                [(self.rows_TR * (m == v)[:, None]).sum(0) for v in (0, 1)])
            return out
        t_X, d_X = (self.rows_TR * ((m == 0) | (m == 1))[:, None]).nonzero(as_tuple=True)
        index = (m[t_X] * r + self.source_TR[t_X, d_X]) * r + d_X
        out = torch.zeros(2 * r * r, dtype=torch.int64, device=dev)
        return out.index_add_(0, index, self.rows_TR[t_X, d_X]).view(2, r, r)

    def messages(self) -> list[tuple[str, Tensor]]:
        """The dispatch all-to-alls of this hop: (name, bytes per (src, dst) [R, R])."""
        if self.packed:
            return [(self.name, self.rows_RR * self.row_bytes)]
        meta = "probs" if self.name == "tokens" else self.name + "-meta"
        return [(self.name, self.rows_RR * self.payload_row_bytes),
                (meta, self.rows_RR * self.meta_row_bytes)]


@dataclass(frozen=True, eq=False)
class RowPlan:
    """The rows of one MoE layer's dispatch for one routing, placement and kind."""

    kind: str  # "expert" | "rank" | "node"
    num_ranks: int
    ranks_per_node: int
    num_tokens: int
    hops: tuple[Hop, ...]  # the dispatch's all-to-alls in order; combine runs them backwards
    expert_rows_RR: Tensor  # [R, R] int64 (token, expert) pairs per (src, dst): per-expert rows
    floor_rows_RR: Tensor  # [R, R] int64 distinct (token, rank) pairs: the dedup floor
    # (off-diagonal cells are the remote ones; the ledger's summary keeps those)

    @functools.cached_property
    def token_nodes_T(self) -> Tensor:
        """[T] int64: the nodes each token's experts live on (its own node included), the
        figure node-limited routing bounds by moe_router_group_topk."""
        uses_TR = self.hops[-1].sends_TR  # the last hop reaches every rank of the token's experts
        nodes = self.num_ranks // self.ranks_per_node
        return uses_TR.view(self.num_tokens, nodes, self.ranks_per_node).any(2).sum(1)

    @functools.cached_property
    def control_bytes_RR(self) -> Tensor:
        """[R, R] int64 split-count bytes per (src, dst) per forward call, all hops."""
        return torch.stack([h.control_bytes_RR for h in self.hops]).sum(0)

    @functools.cached_property
    def dispatch_bytes_RR(self) -> Tensor:
        """[R, R] int64 payload + metadata bytes of the dispatch per (src, dst), all hops."""
        return torch.stack([h.rows_RR * h.row_bytes for h in self.hops]).sum(0)

    @functools.cached_property
    def combine_bytes_RR(self) -> Tensor:
        """[R, R] int64 payload bytes of the combine per (src, dst): the dispatch transposed."""
        return torch.stack([h.rows_RR.t() * h.payload_row_bytes for h in self.hops]).sum(0)


def routing_map_from_topk(topk_idx_TK: Tensor, num_experts: int) -> Tensor:
    """[T, K] logical expert ids (-1 = none) -> routing map [T, E] bool."""
    t = topk_idx_TK.shape[0]
    idx = topk_idx_TK.to(torch.int64)
    hit = torch.zeros(t, num_experts + 1, dtype=torch.bool, device=idx.device)
    hit.scatter_(1, torch.where(idx >= 0, idx, num_experts), True)  # column E collects the -1s
    return hit[:, :num_experts]


def to_physical(x_TE: Tensor, placement: Placement) -> Tensor:
    """Reorder expert columns from logical id to physical index rank * n_local + slot.

    x_TE [T, E] -> [T, E], column p holds the logical expert placed at p.
    """
    if placement.is_contiguous:  # the identity: no copy
        return x_TE
    # One copy per expert here (a replicated routing is resolved to physical columns first,
    # epruntime.dispatch.copies), so phy2log is the inverse of physical_E.
    placement.require_one_copy("to_physical")
    index_P = placement.phy2log_P.to(x_TE.device)
    if x_TE.dtype == torch.bool:  # a column gather of bool is ~6x slower than of float on CPU
        return x_TE.to(torch.float32).index_select(1, index_P).bool()
    return x_TE.index_select(1, index_P)


def row_plan(routing_map_TE: Tensor, probs_TE: Tensor | None, placement: Placement, kind: str,
             *, source_rank: int | Tensor, topk: int, hidden_size: int = 0,
             hidden_bytes: int = 4, prob_bytes: int = 4, modality_column: bool = False,
             debug_checks: bool = False) -> RowPlan:
    """The rows a `kind` dispatcher sends for this routing under `placement`.

    routing_map_TE [T, E] bool and probs_TE [T, E] (or None: counts only) in logical expert
    columns, as megatron-core's router returns them. source_rank: the EP rank the tokens start
    on, an int for one rank's tokens (a dispatcher) or [T] int64 for a group's (the simulator).
    topk bounds the entries per row; hidden_size x hidden_bytes is a row's payload, prob_bytes
    the size of megatron-core's routing prob; modality_column: node dedup's hop 1 carries the
    token's modality (the ledger is on). debug_checks: check that no row needs more than M
    entries (a host sync; off on the hot path).
    """
    t, r, n_local = routing_map_TE.shape[0], placement.num_ranks, placement.num_local
    used_TRL = to_physical(routing_map_TE, placement).view(t, r, n_local)
    probs_TRL = None if probs_TE is None else to_physical(probs_TE, placement).view(t, r, n_local)
    return physical_row_plan(used_TRL, probs_TRL, kind, ranks_per_node=placement.ranks_per_node,
                             source_rank=source_rank, topk=topk, hidden_size=hidden_size,
                             hidden_bytes=hidden_bytes, prob_bytes=prob_bytes,
                             modality_column=modality_column, debug_checks=debug_checks)


def physical_row_plan(used_TRL: Tensor, probs_TRL: Tensor | None, kind: str, *,
                      ranks_per_node: int, source_rank: int | Tensor, topk: int,
                      hidden_size: int = 0, hidden_bytes: int = 4, prob_bytes: int = 4,
                      modality_column: bool = False, debug_checks: bool = False) -> RowPlan:
    """`row_plan` on a routing already in physical order: used_TRL [T, R, L] bool (token t uses
    slot l of rank r), probs_TRL [T, R, L] or None. Node dedup's gateways plan their hop 2 with
    this (kind "rank") from the rows they received."""
    if kind not in KINDS:
        raise ValueError(f"row plan kind {kind!r}: expected one of {KINDS}")
    t, r, n_local = used_TRL.shape
    if r % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} does not divide {r} ranks")
    dev = used_TRL.device
    if isinstance(source_rank, Tensor):
        single, src_T = None, source_rank.to(dev, torch.int64)
    else:
        single, src_T = int(source_rank), torch.full((t,), int(source_rank), dtype=torch.int64,
                                                     device=dev)
    src_TR = src_T[:, None].expand(t, r)
    expert_TR = used_TRL.sum(2)
    floor_TR = (expert_TR > 0).to(torch.int64)  # from the sum: any(2) on bool is slower on CPU
    row = hidden_size * hidden_bytes
    packed = hidden_bytes == META_BYTES

    def dedup_hop(name, rows_TR, source_TR, group_size, used_TGQ, probs_TGQ, column=False):
        m = min(topk, used_TGQ.shape[2])
        if debug_checks and bool((used_TGQ.sum(2) > m).any()):
            raise ValueError(f"a token uses more than max_entries={m} slots of one destination "
                             f"(top-k {topk}): the routing map has more than top-k experts")
        return Hop(name, rows_TR, source_TR, single, group_size, used_TGQ, probs_TGQ, m, row,
                   (2 * m + int(column)) * META_BYTES, COUNT_BYTES, packed, column)

    if kind == "expert":
        control = used_TRL.shape[1] * n_local * COUNT_BYTES if r > 1 else 0
        hops = (Hop("tokens", expert_TR, src_TR, single, 1, used_TRL, probs_TRL, 1, row,
                    prob_bytes, control, False),)
    elif kind == "rank":
        hops = (dedup_hop("rows", floor_TR, src_TR, 1, used_TRL, probs_TRL),)
    else:
        per_node, nodes = ranks_per_node, r // ranks_per_node
        used_TNQ = used_TRL.reshape(t, nodes, per_node * n_local)
        probs_TNQ = None if probs_TRL is None else probs_TRL.reshape(t, nodes, per_node * n_local)
        # Node n's rows go to the rank with the sender's local index in node n.
        lane_T = torch.remainder(src_T, per_node)
        gateway_TN = torch.arange(nodes, device=dev)[None, :] * per_node + lane_T[:, None]
        to_gateway_TR = torch.zeros(t, r, dtype=torch.int64, device=dev).scatter_(
            1, gateway_TN, used_TNQ.any(2).to(torch.int64))
        # Hop 2: the gateway of (node of r, the token's lane) sends the token's row to rank r.
        node_first_R = torch.div(torch.arange(r, device=dev), per_node,
                                 rounding_mode="floor") * per_node
        gateway_TR = node_first_R[None, :] + lane_T[:, None]
        hops = (dedup_hop("rows1", to_gateway_TR, src_TR, per_node, used_TNQ, probs_TNQ,
                          modality_column),
                dedup_hop("rows2", floor_TR, gateway_TR, 1, used_TRL, probs_TRL))
    return RowPlan(kind, r, ranks_per_node, t, hops, _pairs(src_TR, expert_TR, r, single),
                   _pairs(src_TR, floor_TR, r, single))


def _pairs(source_TR: Tensor, count_TR: Tensor, r: int, single_source: int | None) -> Tensor:
    """[R, R] int64: sum of count_TR [T, R] per (source_TR[t, d], d)."""
    out = torch.zeros(r, r, dtype=torch.int64, device=count_TR.device)
    if single_source is not None:  # one row; fixed shapes, no sync
        out[single_source] = count_TR.sum(0)
        return out
    t_X, d_X = count_TR.nonzero(as_tuple=True)  # a group's plan: sparse is cheaper
    return out.view(-1).index_add_(0, source_TR[t_X, d_X] * r + d_X,
                                   count_TR[t_X, d_X].to(torch.int64)).view(r, r)
