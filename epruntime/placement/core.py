"""Where each logical expert lives: physical slot -> logical expert, per MoE layer.

The router always speaks logical expert ids (columns of its routing map). A `Placement` maps
physical slots to them (`phy2log`, EPLB's name): EP rank r holds the `num_local` slots
r * num_local ... (r + 1) * num_local - 1 (megatron-core's SequentialMLP `local_experts[slot]`),
on node r // ranks_per_node. Every rank holds the same number of slots, because megatron-core's
expert module has a fixed `num_local_experts`.

A placement may hold several copies of a logical expert (replicated hot experts, DeepSeek's
EPLB): then it has more physical slots than logical experts, and EP may exceed the number of
logical experts. `log2phy` [E, max copies] and `logcnt` [E] are the reverse maps. Each logical
expert has at least one copy and at most one per rank. The dedup dispatchers route copies
(`epruntime.dispatch.copies`: each (token, expert) pair to one copy), training sums the copies'
gradients (`epruntime.optim_copies`), checkpoints store each logical expert once and migration
adds and drops copies; the copy-free accessors (`rank_of_expert` and friends) refuse a
replicated placement with `ReplicatedPlacementError`.

Contiguous placement (expert e on rank e // num_local, slot e % num_local) is megatron-core's own
and the default. Placements are immutable and JSON-able; they go into checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch


class PlacementError(ValueError):
    """A placement that does not describe a valid expert layout."""


class ReplicatedPlacementError(PlacementError):
    """A replicated placement reached code that assumes one copy per logical expert."""


def one_copy_only(what: str) -> str:
    return (f"{what} is replicated (several physical copies of a logical expert): a copy-free "
            "accessor has no single answer; use log2phy_EC / logcnt_E, or "
            "epruntime.placement.replicas.resolve_copies to pick each token's copy")


@dataclass(frozen=True)
class Placement:
    phy2log: tuple[int, ...]  # [P]: logical expert in physical slot p (rank p // num_local)
    num_ranks: int
    ranks_per_node: int
    # Copy choice (replicated placements): None = the copy on the token's rank, else node, else
    # in turn; a number = each source rank keeps this share of its batch's (token, expert) pairs
    # on its own rank and spreads the rest evenly (`replicas.resolve_copies`).
    local_share: float | None = None

    def __post_init__(self):
        p, r = len(self.phy2log), self.num_ranks
        if not isinstance(r, int) or r < 1:
            raise PlacementError(f"num_ranks must be a positive int, got {r!r}")
        if p == 0 or p % r:
            raise PlacementError(f"phy2log has {p} physical slots, which do not split evenly "
                                 f"over num_ranks={r}")
        if not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1 \
                or r % self.ranks_per_node:
            raise PlacementError(f"ranks_per_node={self.ranks_per_node} does not divide "
                                 f"num_ranks={r}")
        bad = [x for x in self.phy2log if not isinstance(x, int) or isinstance(x, bool) or x < 0]
        if bad:
            raise PlacementError(f"phy2log holds {bad[0]!r}: logical expert ids must be ints >= 0")
        e = max(self.phy2log) + 1
        missing = sorted(set(range(e)) - set(self.phy2log))
        if missing:
            raise PlacementError(f"phy2log: logical expert {missing[0]} has no physical slot "
                                 f"(ids must cover 0..{e - 1}; {len(missing)} missing)")
        n = p // r
        for rank in range(r):
            on_rank = self.phy2log[rank * n:(rank + 1) * n]
            if len(set(on_rank)) != n:
                twice = next(x for x in on_rank if on_rank.count(x) > 1)
                raise PlacementError(f"phy2log: logical expert {twice} has two copies on rank "
                                     f"{rank} (copies must sit on different ranks)")
        a = self.local_share
        if a is not None and (not isinstance(a, (int, float)) or isinstance(a, bool)
                              or not 1.0 / r <= a <= 1.0):
            raise PlacementError(f"local_share must be None or a number in [1/num_ranks, 1] = "
                                 f"[{1.0 / r:.4g}, 1], got {a!r}")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int, ranks_per_node: int | None = None):
        """megatron-core's layout: expert e on rank e // n_local, slot e % n_local."""
        if not isinstance(num_ranks, int) or num_ranks < 1 or num_experts % num_ranks:
            raise PlacementError(f"{num_experts} experts do not split evenly over "
                                 f"num_ranks={num_ranks}")
        return cls(tuple(range(num_experts)), num_ranks, ranks_per_node or num_ranks)

    @classmethod
    def from_rank_lists(cls, experts_per_rank: list[list[int]], ranks_per_node: int | None = None):
        """experts_per_rank[r] = logical experts on rank r, in slot order (an expert may appear
        on several ranks: copies)."""
        if not isinstance(experts_per_rank, (list, tuple)) or not experts_per_rank or not all(
                isinstance(x, (list, tuple)) for x in experts_per_rank):
            raise PlacementError("experts_per_rank must be a non-empty list of per-rank lists")
        if len({len(x) for x in experts_per_rank}) != 1:
            raise PlacementError("every rank must hold the same number of experts, got "
                                 f"{[len(x) for x in experts_per_rank]}")
        r = len(experts_per_rank)
        return cls(tuple(e for experts in experts_per_rank for e in experts), r,
                   ranks_per_node or r)

    @classmethod
    def from_phy2log(cls, phy2log, num_ranks: int, ranks_per_node: int | None = None):
        """phy2log: [P] sequence or int tensor, logical expert of each physical slot."""
        if isinstance(phy2log, torch.Tensor):
            phy2log = phy2log.tolist()
        return cls(tuple(int(x) for x in phy2log), num_ranks, ranks_per_node or num_ranks)

    def with_local_share(self, local_share: float | None) -> "Placement":
        """The same slots with another copy-choice rule (see `local_share`)."""
        return replace(self, local_share=local_share)

    def to_dict(self) -> dict:
        d = {"experts_per_rank": self.experts_per_rank(), "ranks_per_node": self.ranks_per_node}
        if self.local_share is not None:
            d["local_share"] = self.local_share
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        return cls.from_rank_lists(d["experts_per_rank"], d["ranks_per_node"]).with_local_share(
            d.get("local_share"))

    # ---- queries ------------------------------------------------------------------------
    @cached_property
    def num_experts(self) -> int:
        """Logical experts."""
        return max(self.phy2log) + 1

    @property
    def num_physical(self) -> int:
        return len(self.phy2log)

    @property
    def num_redundant(self) -> int:
        """Physical slots beyond one per logical expert (EPLB's redundant experts)."""
        return self.num_physical - self.num_experts

    @property
    def is_replicated(self) -> bool:
        return self.num_physical > self.num_experts

    @property
    def num_local(self) -> int:
        """Physical slots (expert modules) per rank."""
        return self.num_physical // self.num_ranks

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    def node_of_rank(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def experts_per_rank(self) -> list[list[int]]:
        n = self.num_local
        return [list(self.phy2log[r * n:(r + 1) * n]) for r in range(self.num_ranks)]

    def expert_at(self, rank: int, slot: int) -> int:
        return self.phy2log[rank * self.num_local + slot]

    @cached_property
    def is_contiguous(self) -> bool:
        return self.phy2log == tuple(range(self.num_experts)) and not self.is_replicated

    @cached_property
    def phy2log_P(self) -> torch.Tensor:
        """[P] int64: logical expert of each physical slot."""
        return torch.tensor(self.phy2log, dtype=torch.long)

    @cached_property
    def logcnt_E(self) -> torch.Tensor:
        """[E] int64: copies of each logical expert (EPLB's logcnt)."""
        return torch.bincount(self.phy2log_P, minlength=self.num_experts)

    @cached_property
    def log2phy_EC(self) -> torch.Tensor:
        """[E, max copies] int64: physical slots of each logical expert in slot order, -1 padded
        (EPLB's log2phy)."""
        out = torch.full((self.num_experts, int(self.logcnt_E.max())), -1, dtype=torch.long)
        fill = [0] * self.num_experts
        for p, e in enumerate(self.phy2log):
            out[e, fill[e]] = p
            fill[e] += 1
        return out

    # ---- one copy per logical expert (copy-free accessors) ----------------------
    def require_one_copy(self, what: str) -> None:
        """ReplicatedPlacementError naming `what` unless every expert has one copy."""
        if self.is_replicated:
            raise ReplicatedPlacementError(one_copy_only(f"this placement ({what} asked)"))

    def _physical_of_expert(self, what: str) -> list[int]:
        """[E]: the one physical slot of each logical expert (non-replicated placements only)."""
        self.require_one_copy(what)
        physical = [0] * self.num_experts
        for p, e in enumerate(self.phy2log):
            physical[e] = p
        return physical

    @cached_property
    def rank_of_expert(self) -> tuple[int, ...]:
        """[E]: EP rank of each logical expert (non-replicated placements only)."""
        return tuple(p // self.num_local for p in self._physical_of_expert("rank_of_expert"))

    @cached_property
    def slot_of_expert(self) -> tuple[int, ...]:
        """[E]: local slot of each logical expert on its rank (non-replicated placements only)."""
        return tuple(p % self.num_local for p in self._physical_of_expert("slot_of_expert"))

    @cached_property
    def rank_E(self) -> torch.Tensor:
        """[E] int64: EP rank of each logical expert."""
        return torch.tensor(self.rank_of_expert, dtype=torch.long)

    @cached_property
    def slot_E(self) -> torch.Tensor:
        """[E] int64: local slot of each logical expert on its rank."""
        return torch.tensor(self.slot_of_expert, dtype=torch.long)

    @cached_property
    def physical_E(self) -> torch.Tensor:
        """[E] int64: physical index rank * num_local + slot of each logical expert."""
        return self.rank_E * self.num_local + self.slot_E
