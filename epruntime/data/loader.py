"""Deterministic, seeded, resumable batch iteration sharded across data-parallel ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .vqa import VQABatch


class BatchDataset(Protocol):
    """What the iterator needs: VQADataset and SyntheticVQA both satisfy it."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor | Sequence[int]) -> VQABatch: ...


def epoch_permutation(num_items: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """[num_items] int64 order of epoch `epoch` (identity if not shuffling)."""
    if not shuffle:
        return torch.arange(num_items)
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))


def split_sizes(n: int, dp_size: int) -> list[int]:
    """Split n items over dp_size ranks as evenly as possible; lower ranks get the remainder."""
    base, rem = divmod(n, dp_size)
    return [base + (1 if r < rem else 0) for r in range(dp_size)]


def shard_slice(n: int, dp_rank: int, dp_size: int) -> slice:
    """Contiguous slice of a global batch of n items that rank dp_rank owns."""
    sizes = split_sizes(n, dp_size)
    start = sum(sizes[:dp_rank])
    return slice(start, start + sizes[dp_rank])


class ShardedBatchIterator:
    """Deterministic epoch-shuffled batches, sharded across data-parallel ranks, resumable.

    Global batch g of epoch e is perm_e[g*GB:(g+1)*GB]; rank r takes a contiguous slice of it, so
    concatenating all ranks' batches in rank order gives exactly the dp_size=1 global batch.
    Position is kept in global-batch units, so a state_dict can be resumed under another dp_size.

    drop_last=True (training): full global batches only, iterating forever across epochs.
    drop_last=False (eval): one pass per `for` loop including the partial last global batch, which
    is split evenly (a rank may get an empty batch); after StopIteration the next loop starts the
    next epoch. `local_batch_sizes` gives every rank's share of the last batch, for weighting means.
    """

    def __init__(
        self,
        dataset: BatchDataset,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need dp_size >= 1 and 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if global_batch_size < 1:
            raise ValueError(f"data.global_batch_size must be >= 1, got {global_batch_size}")
        if global_batch_size % dp_size != 0:
            raise ValueError(
                f"data.global_batch_size ({global_batch_size}) must be divisible by dp_size ({dp_size})"
            )
        n = len(dataset)
        # With drop_last an epoch would contain no batch at all; without it a short dataset is fine.
        if n < 1 or (drop_last and n < global_batch_size):
            raise ValueError(
                f"dataset has {n} items, fewer than one global batch (data.global_batch_size={global_batch_size})"
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.batch_in_epoch = 0  # index of the next global batch within the epoch
        self.local_batch_sizes: list[int] = []  # per-rank sizes of the most recently returned batch
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    @property
    def local_batch_size(self) -> int:
        """Size of this rank's share of a full global batch."""
        return self.global_batch_size // self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        n, gb = len(self.dataset), self.global_batch_size
        return n // gb if self.drop_last else -(-n // gb)

    def global_batch_indices(self, epoch: int, batch_in_epoch: int) -> torch.Tensor:
        """[<= GB] dataset indices of one global batch (all ranks together)."""
        if self._perm_epoch != epoch:
            self._perm = epoch_permutation(len(self.dataset), self.seed, epoch, self.shuffle)
            self._perm_epoch = epoch
        gb = self.global_batch_size
        return self._perm[batch_in_epoch * gb : (batch_in_epoch + 1) * gb]

    def __iter__(self) -> ShardedBatchIterator:
        return self

    def __next__(self) -> VQABatch:
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            if not self.drop_last:
                raise StopIteration
        global_idx = self.global_batch_indices(self.epoch, self.batch_in_epoch)
        self.batch_in_epoch += 1
        self.local_batch_sizes = split_sizes(len(global_idx), self.dp_size)
        return self.dataset.batch(global_idx[shard_slice(len(global_idx), self.dp_rank, self.dp_size)])

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in ("seed", "global_batch_size"):
            if int(state[field]) != getattr(self, field):
                raise ValueError(
                    f"cannot resume data iterator: state_dict {field}={state[field]} "
                    f"but this iterator has {field}={getattr(self, field)}"
                )
        epoch, batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch_in_epoch <= self.steps_per_epoch:
            raise ValueError(
                f"invalid data iterator position epoch={epoch}, batch_in_epoch={batch_in_epoch} "
                f"(steps_per_epoch={self.steps_per_epoch})"
            )
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self.local_batch_sizes = []
