"""Where each logical expert lives: logical expert -> (node, rank, local slot), per MoE layer.

The router always speaks logical expert ids (columns of its routing map). A `Placement` maps them
to physical positions: EP rank `rank_of_expert[e]`, slot `slot_of_expert[e]` among that rank's
`num_local` expert modules (megatron-core's SequentialMLP `local_experts[slot]`), and node
`rank // ranks_per_node`. Every rank holds the same number of experts, because megatron-core's
expert module has a fixed `num_local_experts`.

Contiguous placement (expert e on rank e // num_local, slot e % num_local) is megatron-core's own
and the default. Placements are immutable and JSON-able; they go into checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


class PlacementError(ValueError):
    """A placement that does not describe a valid expert layout."""


@dataclass(frozen=True)
class Placement:
    rank_of_expert: tuple[int, ...]  # [E]
    slot_of_expert: tuple[int, ...]  # [E]
    num_ranks: int
    ranks_per_node: int

    def __post_init__(self):
        e, r = len(self.rank_of_expert), self.num_ranks
        if len(self.slot_of_expert) != e:
            raise PlacementError(f"slot_of_expert has {len(self.slot_of_expert)} entries, "
                                 f"rank_of_expert {e}")
        if r < 1 or e % r:
            raise PlacementError(f"{e} experts do not split evenly over num_ranks={r}")
        if self.ranks_per_node < 1 or r % self.ranks_per_node:
            raise PlacementError(f"ranks_per_node={self.ranks_per_node} does not divide "
                                 f"num_ranks={r}")
        seen = set()
        for expert, (rank, slot) in enumerate(zip(self.rank_of_expert, self.slot_of_expert)):
            if not (0 <= rank < r and 0 <= slot < e // r):
                raise PlacementError(f"expert {expert} at (rank {rank}, slot {slot}) is outside "
                                     f"{r} ranks x {e // r} slots")
            if (rank, slot) in seen:
                raise PlacementError(f"two experts share (rank {rank}, slot {slot})")
            seen.add((rank, slot))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int, ranks_per_node: int | None = None):
        """megatron-core's layout: expert e on rank e // n_local, slot e % n_local."""
        if num_ranks < 1 or num_experts % num_ranks:
            raise PlacementError(f"{num_experts} experts do not split evenly over "
                                 f"num_ranks={num_ranks}")
        n_local = num_experts // num_ranks
        return cls(tuple(e // n_local for e in range(num_experts)),
                   tuple(e % n_local for e in range(num_experts)),
                   num_ranks, ranks_per_node or num_ranks)

    @classmethod
    def from_rank_lists(cls, experts_per_rank: list[list[int]], ranks_per_node: int | None = None):
        """experts_per_rank[r] = logical experts on rank r, in slot order."""
        num_experts = sum(len(x) for x in experts_per_rank)
        rank_of, slot_of = [-1] * num_experts, [-1] * num_experts
        for rank, experts in enumerate(experts_per_rank):
            for slot, e in enumerate(experts):
                if not 0 <= e < num_experts or rank_of[e] != -1:
                    raise PlacementError(f"expert {e} on rank {rank} is out of range or placed twice")
                rank_of[e], slot_of[e] = rank, slot
        r = len(experts_per_rank)
        if len({len(x) for x in experts_per_rank}) != 1:
            raise PlacementError("every rank must hold the same number of experts, got "
                                 f"{[len(x) for x in experts_per_rank]}")
        return cls(tuple(rank_of), tuple(slot_of), r, ranks_per_node or r)

    def to_dict(self) -> dict:
        return {"experts_per_rank": self.experts_per_rank(), "ranks_per_node": self.ranks_per_node}

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        return cls.from_rank_lists(d["experts_per_rank"], d["ranks_per_node"])

    # ---- queries ------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.rank_of_expert)

    @property
    def num_local(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    def node_of_rank(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def experts_per_rank(self) -> list[list[int]]:
        out = [[-1] * self.num_local for _ in range(self.num_ranks)]
        for e, (r, s) in enumerate(zip(self.rank_of_expert, self.slot_of_expert)):
            out[r][s] = e
        return out

    def expert_at(self, rank: int, slot: int) -> int:
        return self.experts_per_rank()[rank][slot]

    @property
    def is_contiguous(self) -> bool:
        return self == Placement.contiguous(self.num_experts, self.num_ranks, self.ranks_per_node)

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
