"""The easy-vqa dataset (64x64 shape images + templated questions), held in memory as tensors."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

PAD_ID = 0
UNK_ID = 1
IMAGE_ID = 2
SPECIAL_TOKENS = ("<pad>", "<unk>", "<image>")

# Words are runs of letters/digits; "?" is its own token (it marks the end of a question);
# any other punctuation only separates words.
_TOKEN_RE = re.compile(r"[a-z0-9]+|\?")

Split = Literal["train", "test"]


@dataclass
class VQABatch:
    """One batch of B examples.

    images:        [B, 3, H, W] float32 in [0, 1]
    question_ids:  [B, L] int64, right-padded with PAD_ID; L is fixed per dataset
    question_lens: [B] int64, number of real tokens (>= 1)
    answers:       [B] int64 in [0, num_answers)
    """

    images: torch.Tensor
    question_ids: torch.Tensor
    question_lens: torch.Tensor
    answers: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> VQABatch:
        return VQABatch(
            images=self.images.to(device, non_blocking=non_blocking),
            question_ids=self.question_ids.to(device, non_blocking=non_blocking),
            question_lens=self.question_lens.to(device, non_blocking=non_blocking),
            answers=self.answers.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return int(self.answers.shape[0])


def tokenize(text: str) -> list[str]:
    """Lowercase and split into words, keeping "?" as a separate token."""
    return _TOKEN_RE.findall(text.lower())


class Vocab:
    """Word-level vocabulary: ids 0..2 are <pad>, <unk>, <image>; words follow, sorted alphabetically."""

    PAD_ID = PAD_ID
    UNK_ID = UNK_ID
    IMAGE_ID = IMAGE_ID

    def __init__(self, words: Iterable[str]) -> None:
        vocab_words = sorted(set(words) - set(SPECIAL_TOKENS))
        self.words: list[str] = list(SPECIAL_TOKENS) + vocab_words  # id -> word
        self._ids: dict[str, int] = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Vocab:
        return cls(w for t in texts for w in tokenize(t))

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, UNK_ID) for w in tokenize(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of encode up to spacing; PAD ids are skipped."""
        return " ".join(self.words[int(i)] for i in ids if int(i) != PAD_ID)

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.words == other.words

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)})"


class VQADataset:
    """Map-style dataset of one split; all questions and decoded images live in memory.

    images:       [N_images, 3, H, W] uint8 (shared with the process-wide cache: treat as read-only)
    question_ids: [N_q, L] int64, right-padded with PAD_ID
    question_lens, answers, image_index: [N_q] int64 (image_index is a row of `images`)
    """

    def __init__(
        self,
        images: torch.Tensor,
        question_ids: torch.Tensor,
        question_lens: torch.Tensor,
        answers: torch.Tensor,
        image_index: torch.Tensor,
        vocab: Vocab,
        answers_vocab: Sequence[str],
    ) -> None:
        n = question_ids.shape[0]
        if not (question_lens.shape == answers.shape == image_index.shape == (n,)):
            raise ValueError("question_lens, answers and image_index must all have shape [N_q]")
        self.images = images
        self.question_ids = question_ids
        self.question_lens = question_lens
        self.answers = answers
        self.image_index = image_index
        self.vocab = vocab
        self.answers_vocab = list(answers_vocab)
        self.num_answers = len(self.answers_vocab)
        self.max_question_len = int(question_ids.shape[1])
        self.image_size = int(images.shape[-1])

    def __len__(self) -> int:
        return int(self.question_ids.shape[0])

    def batch(self, indices: torch.Tensor | Sequence[int]) -> VQABatch:
        """Gather questions `indices` ([B] ints, B may be 0) into a VQABatch."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return VQABatch(
            images=self.images[self.image_index[idx]].to(torch.float32).div_(255.0),
            question_ids=self.question_ids[idx],
            question_lens=self.question_lens[idx],
            answers=self.answers[idx],
        )

    def majority_baseline(self) -> float:
        """Accuracy of always predicting this split's most common answer."""
        counts = torch.bincount(self.answers, minlength=self.num_answers)
        return float(counts.max()) / max(len(self), 1)


def _easy_vqa():  # imported lazily so that synthetic-only users need not have the package
    import easy_vqa

    return easy_vqa


@functools.lru_cache(maxsize=None)
def _questions(split: Split) -> tuple[list[str], list[str], list[int]]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    e = _easy_vqa()
    texts, answers, image_ids = e.get_train_questions() if split == "train" else e.get_test_questions()
    return list(texts), list(answers), [int(i) for i in image_ids]


def easy_vqa_records(split: Split) -> list[dict[str, str]]:
    """A split's questions as {"question", "answer"} records, in the order load_easy_vqa uses."""
    texts, answers, _ = _questions(split)
    return [{"question": t, "answer": a} for t, a in zip(texts, answers)]


@functools.lru_cache(maxsize=None)
def easy_vqa_vocab() -> Vocab:
    """Vocabulary of the TRAIN questions (used for both splits so that ids agree)."""
    return Vocab.from_texts(_questions("train")[0])


@functools.lru_cache(maxsize=None)
def easy_vqa_max_question_len() -> int:
    """Longest tokenised question over both splits, so train and test batches share L."""
    return max(len(tokenize(t)) for s in ("train", "test") for t in _questions(s)[0])


@functools.lru_cache(maxsize=None)
def _decode_images(split: Split) -> tuple[torch.Tensor, dict[int, int]]:
    """Decode every PNG of a split once: ([N_images, 3, H, W] uint8, image_id -> row)."""
    from PIL import Image

    e = _easy_vqa()
    paths = e.get_train_image_paths() if split == "train" else e.get_test_image_paths()
    ids = sorted(paths)
    arrays = []
    for image_id in ids:
        with Image.open(paths[image_id]) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, {image_id: row for row, image_id in enumerate(ids)}


@functools.lru_cache(maxsize=None)
def _encoded_split(split: Split) -> tuple[torch.Tensor, ...]:
    """All questions of a split as tensors: (ids [N_q, L], lens, answers, image_index)."""
    texts, answer_words, image_ids = _questions(split)
    vocab = easy_vqa_vocab()
    answer_to_id = {a: i for i, a in enumerate(_easy_vqa().get_answers())}
    _, row_of_image = _decode_images(split)
    L = easy_vqa_max_question_len()
    encoded = [vocab.encode(t) for t in texts]
    lens = torch.tensor([len(tok) for tok in encoded], dtype=torch.long)
    ids = torch.tensor([tok + [PAD_ID] * (L - len(tok)) for tok in encoded], dtype=torch.long)
    if int(lens.min()) < 1:
        raise ValueError(f"easy-vqa {split}: found an empty question")
    answers = torch.tensor([answer_to_id[a] for a in answer_words], dtype=torch.long)
    image_index = torch.tensor([row_of_image[i] for i in image_ids], dtype=torch.long)
    return ids, lens, answers, image_index


def load_easy_vqa(split: Split, max_items: int | None = None) -> VQADataset:
    """Load one easy-vqa split (PNG decoding and tokenisation are cached per process).

    max_items keeps the first `max_items` questions (all images stay available).
    """
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be >= 1 or None, got {max_items}")
    images, _ = _decode_images(split)
    ids, lens, answers, image_index = _encoded_split(split)
    n = len(answers) if max_items is None else min(max_items, len(answers))
    return VQADataset(
        images=images,
        question_ids=ids[:n],
        question_lens=lens[:n],
        answers=answers[:n],
        image_index=image_index[:n],
        vocab=easy_vqa_vocab(),
        answers_vocab=_easy_vqa().get_answers(),
    )
