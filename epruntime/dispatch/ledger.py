"""CommLedger: exact bytes of every dispatch and combine all-to-all, as the collective saw them.

Dispatchers call `record_exchange` with the very tensors and split lists they hand to
`all_to_all_single`, so the ledger's bytes are the bytes that moved. Each rank records the row of
the (src, dst) matrix it sends; `summary()` sums the matrices over all ranks.

Counted per layer, phase (dispatch / combine), (src, dst) EP rank, and modality: payload bytes
(hidden rows), metadata bytes (routing weights and slots that travel with them), rows. Alongside,
for the routing each layer saw under its placement: `expert_rows`, the rows a per-expert
dispatcher (megatron-core's alltoall) sends, and `floor_rows`, the (token, remote rank) pairs a
rank-deduplicating dispatcher cannot go below (DESIGN.md, "Communication").

Forward passes only: the backward all-to-alls mirror them (gradients of the combine rows travel
the dispatch path and vice versa), so training moves twice these bytes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

PHASES = ("dispatch", "combine")
MODALITIES = ("text", "vision")


class CommLedger:
    def __init__(self, num_layers: int, ep_size: int, ep_rank: int, ranks_per_node: int):
        if ep_size % ranks_per_node:
            raise ValueError(f"ranks_per_node={ranks_per_node} does not divide ep_size={ep_size}")
        self.num_layers, self.ep_size, self.ep_rank = num_layers, ep_size, ep_rank
        self.ranks_per_node = ranks_per_node
        self.enabled = True
        self.reset()

    def reset(self) -> None:
        L, P, R, M = self.num_layers, len(PHASES), self.ep_size, len(MODALITIES)
        # [layer, phase, src, dst]; this rank fills the cells it can see.
        self.payload_bytes = torch.zeros(L, P, R, R, dtype=torch.int64)
        self.meta_bytes = torch.zeros(L, P, R, R, dtype=torch.int64)
        self.rows = torch.zeros(L, P, R, R, dtype=torch.int64)
        self.modality_rows = torch.zeros(L, P, M, R, R, dtype=torch.int64)
        # [layer, src, dst] for the routing this rank's tokens had.
        self.expert_rows = torch.zeros(L, R, R, dtype=torch.int64)
        self.floor_rows = torch.zeros(L, R, R, dtype=torch.int64)
        self.tokens = torch.zeros(L, M, dtype=torch.int64)
        # [layer, src, dst]: split counts exchanged before the rows (not rows themselves).
        self.control_bytes = torch.zeros(L, R, R, dtype=torch.int64)
        self.calls = 0

    # ---- recording (called by dispatchers) ------------------------------------------------
    def record_exchange(self, layer: int, phase: str, send_splits: list[int],
                        payload: torch.Tensor, meta: torch.Tensor | None = None,
                        src_modality_N: torch.Tensor | None = None) -> None:
        """This rank sends `payload` [N, ...] (and `meta` [N, ...]) split by `send_splits` [R].

        `src_modality_N` [N] is the modality of each sent row when this rank knows it (the token
        owner on dispatch). Modality of the combine rows is recorded by the token owner with
        `record_return_modality`.
        """
        if not self.enabled:
            return
        if sum(send_splits) != payload.shape[0]:
            raise ValueError(f"send splits sum to {sum(send_splits)}, payload has "
                             f"{payload.shape[0]} rows")
        p, me = PHASES.index(phase), self.ep_rank
        rows = torch.tensor(send_splits, dtype=torch.int64)
        self.rows[layer, p, me] += rows
        self.payload_bytes[layer, p, me] += rows * _row_bytes(payload)
        if meta is not None:
            self.meta_bytes[layer, p, me] += rows * _row_bytes(meta)
        if src_modality_N is not None:
            self.modality_rows[layer, p, :, me] += _count_by_modality(src_modality_N, send_splits)
        if p == 0:
            self.calls += 1

    def record_return_modality(self, layer: int, recv_splits: list[int],
                               modality_N: torch.Tensor) -> None:
        """The token owner receives combine rows `recv_splits` [R] with modality `modality_N`."""
        if self.enabled:
            counts_MR = _count_by_modality(modality_N, recv_splits)
            self.modality_rows[layer, 1, :, :, self.ep_rank] += counts_MR

    def record_control(self, layer: int, bytes_per_dst: list[int] | torch.Tensor) -> None:
        """Bytes of split-count metadata this rank sends to each rank before a dispatch."""
        if self.enabled:
            self.control_bytes[layer, self.ep_rank] += torch.as_tensor(bytes_per_dst, dtype=torch.int64)

    def record_routing(self, layer: int, expert_rows_R: torch.Tensor, floor_rows_R: torch.Tensor,
                       modality_T: torch.Tensor | None, num_tokens: int) -> None:
        """Per destination rank: (token, expert) pairs and distinct (token, rank) pairs."""
        if not self.enabled:
            return
        self.expert_rows[layer, self.ep_rank] += expert_rows_R.to(torch.int64).cpu()
        self.floor_rows[layer, self.ep_rank] += floor_rows_R.to(torch.int64).cpu()
        if modality_T is None:
            self.tokens[layer, 0] += num_tokens
        else:
            self.tokens[layer] += torch.bincount(modality_T.cpu(), minlength=2)[:2]

    # ---- reporting ---------------------------------------------------------------------------
    def totals(self, group=None) -> "CommLedger":
        """A copy with every rank's cells summed over `group` (None: this rank only)."""
        out = CommLedger(self.num_layers, self.ep_size, self.ep_rank, self.ranks_per_node)
        for name in ("payload_bytes", "meta_bytes", "rows", "modality_rows", "expert_rows",
                     "floor_rows", "tokens", "control_bytes"):
            t = getattr(self, name).clone()
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(t, group=group)
            setattr(out, name, t)
        out.calls = self.calls
        return out

    def masks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[R, R] bool: cross-rank (src != dst), intra-node cross-rank, inter-node."""
        r = torch.arange(self.ep_size)
        node = r // self.ranks_per_node
        cross = r[:, None] != r[None, :]
        inter = node[:, None] != node[None, :]
        return cross, cross & ~inter, inter

    def summary(self, group=None) -> dict:
        """Totals and per-layer figures summed over `group` (JSON-able)."""
        t = self.totals(group)
        cross, intra, inter = t.masks()
        bytes_LPRR = t.payload_bytes + t.meta_bytes

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
                # (token, expert) pairs each rank's experts computed, and mean/max over ranks
                # (vLLM's balancedness), averaged over layers.
                "load_per_rank": t.expert_rows[layers].sum(dim=(0, 1)).tolist(),
                "balancedness": _balancedness(t.expert_rows[layers].sum(dim=1)),
                # [src][dst] bytes (payload + metadata, dispatch + combine, diagonal = local)
                "bytes_matrix": b.sum(dim=(0, 1)).tolist(),
            }
            for p, phase in enumerate(PHASES):
                out[f"{phase}_cross_rank_bytes"] = int(b[:, p][..., cross].sum())
                for m, mod in enumerate(MODALITIES):
                    out[f"{phase}_{mod}_cross_rank_rows"] = int(
                        t.modality_rows[layers, p, m][:, cross].sum())
            return out

        return {
            "ep_size": self.ep_size,
            "ranks_per_node": self.ranks_per_node,
            "forward_calls": t.calls,
            "tokens": {mod: int(t.tokens[:, m].sum()) for m, mod in enumerate(MODALITIES)},
            **figures(slice(None)),
            "per_layer": [figures(slice(layer, layer + 1)) for layer in range(self.num_layers)],
        }


def _row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def _count_by_modality(modality_N: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """[2, R] rows per (modality, rank) for rows laid out in rank order by `splits`."""
    rank_N = torch.repeat_interleave(torch.arange(len(splits)), torch.tensor(splits))
    flat = modality_N.cpu().to(torch.int64) * len(splits) + rank_N
    return torch.bincount(flat, minlength=2 * len(splits))[: 2 * len(splits)].view(2, len(splits))


def _balancedness(load_LR: torch.Tensor) -> float:
    """Mean over layers of mean/max load per rank; 1.0 for a layer with no load."""
    load = load_LR.double()
    peak = load.max(dim=1).values
    per_layer = torch.where(peak > 0, load.mean(dim=1) / peak.clamp(min=1), torch.ones_like(peak))
    return float(per_layer.mean()) if per_layer.numel() else 1.0
