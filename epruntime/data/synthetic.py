"""Synthetic image+question batches with a learnable answer rule; same interface as VQADataset.

Item i is generated on demand from a hash of (seed, i), so num_items can be huge at no memory cost.
Each image is uniform noise in [0, 0.5) plus 0.5 on one "dominant" channel c in {0, 1, 2};
the answer is `(ANSWER_COLOUR_STRIDE * c + first_token) % num_answers`, see `synthetic_answer`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .vqa import PAD_ID, VQABatch, Vocab

ANSWER_COLOUR_STRIDE = 5
_FIRST_WORD_ID = 3  # ids 0..2 are <pad>, <unk>, <image>
_MASK63 = (1 << 63) - 1


def _mix(seed: int, indices: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, index): well-spread uint64 per index, vectorised."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = indices.astype(np.uint64) + z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def synthetic_answer(images: torch.Tensor, question_ids: torch.Tensor, num_answers: int) -> torch.Tensor:
    """The answer rule, computed from the inputs alone.

    images [B, 3, H, W], question_ids [B, L] -> answers [B] int64.
    """
    colour = images.mean(dim=(2, 3)).argmax(dim=1)
    return (ANSWER_COLOUR_STRIDE * colour + question_ids[:, 0]) % num_answers


class SyntheticVQA:
    """Deterministic synthetic VQA data: random images/questions, answers a function of both."""

    def __init__(
        self,
        num_items: int,
        image_size: int = 64,
        question_len: int = 8,
        vocab_size: int = 64,
        num_answers: int = 13,
        seed: int = 0,
    ) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if question_len < 2:
            raise ValueError(f"question_len must be >= 2, got {question_len}")
        if vocab_size <= _FIRST_WORD_ID:
            raise ValueError(f"vocab_size must be > {_FIRST_WORD_ID}, got {vocab_size}")
        if num_answers < 1 or image_size < 1:
            raise ValueError("num_answers and image_size must be >= 1")
        self.num_items = num_items
        self.image_size = image_size
        self.max_question_len = question_len
        self.num_answers = num_answers
        self.seed = seed
        width = len(str(vocab_size))
        # Zero-padded names sort alphabetically in id order, so Vocab assigns word "wNN" id NN.
        self.vocab = Vocab(f"w{i:0{width}d}" for i in range(_FIRST_WORD_ID, vocab_size))
        self.answers_vocab = [f"a{i}" for i in range(num_answers)]

    def __len__(self) -> int:
        return self.num_items

    def _header(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-index (generator seed, dominant colour, first token), all cheap and vectorised."""
        h = _mix(self.seed, indices)
        colour = (h % np.uint64(3)).astype(np.int64)
        n_words = np.uint64(len(self.vocab) - _FIRST_WORD_ID)
        first = ((h >> np.uint64(8)) % n_words).astype(np.int64) + _FIRST_WORD_ID
        return (h & np.uint64(_MASK63)).astype(np.int64), colour, first

    def batch(self, indices: torch.Tensor | Sequence[int]) -> VQABatch:
        """Generate items `indices` ([B] ints in [0, num_items)) as a VQABatch."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_items):
            raise IndexError(f"indices must lie in [0, {self.num_items})")
        seeds, colour, first = self._header(idx.numpy())
        B, S, L = idx.numel(), self.image_size, self.max_question_len
        images = torch.empty(B, 3, S, S)
        ids = torch.full((B, L), PAD_ID, dtype=torch.long)
        lens = torch.empty(B, dtype=torch.long)
        g = torch.Generator()
        for b in range(B):
            g.manual_seed(int(seeds[b]))
            torch.rand(3, S, S, generator=g, out=images[b]).mul_(0.5)
            images[b, int(colour[b])] += 0.5
            n = int(torch.randint(2, L + 1, (), generator=g))
            ids[b, :n] = torch.randint(_FIRST_WORD_ID, len(self.vocab), (n,), generator=g)
            ids[b, 0] = int(first[b])
            lens[b] = n
        answers = (ANSWER_COLOUR_STRIDE * torch.from_numpy(colour) + torch.from_numpy(first)) % self.num_answers
        return VQABatch(images=images, question_ids=ids, question_lens=lens, answers=answers)

    def majority_baseline(self) -> float:
        """Exact share of the most common answer over all items (only the cheap header is computed)."""
        counts = np.zeros(self.num_answers, dtype=np.int64)
        chunk = 1 << 20
        for start in range(0, self.num_items, chunk):
            _, colour, first = self._header(np.arange(start, min(start + chunk, self.num_items)))
            ans = (ANSWER_COLOUR_STRIDE * colour + first) % self.num_answers
            counts += np.bincount(ans, minlength=self.num_answers)
        return float(counts.max()) / self.num_items
