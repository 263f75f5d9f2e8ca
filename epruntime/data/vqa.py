"""The easy-vqa dataset (64x64 shape images + templated questions), held in memory as tensors."""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
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
        return self.encode_tokens(tokenize(text))

    def encode_tokens(self, tokens: Iterable[str]) -> list[int]:
        return [self._ids.get(w, UNK_ID) for w in tokens]

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
def _distinct_questions(split: Split) -> tuple[list[list[str]], torch.Tensor]:
    """A split's questions are templated (some hundreds of distinct texts for tens of thousands of
    questions), so each distinct text is tokenised once: (tokens of each distinct text, [N_q]
    int64 index of each question's text)."""
    position: dict[str, int] = {}
    index = [position.setdefault(t, len(position)) for t in _questions(split)[0]]
    return [tokenize(t) for t in position], torch.tensor(index, dtype=torch.long)


@functools.lru_cache(maxsize=None)
def easy_vqa_vocab() -> Vocab:
    """Vocabulary of the TRAIN questions (used for both splits so that ids agree)."""
    return Vocab(w for tokens in _distinct_questions("train")[0] for w in tokens)


@functools.lru_cache(maxsize=None)
def easy_vqa_max_question_len() -> int:
    """Longest tokenised question over both splits, so train and test batches share L."""
    return max(len(tokens) for s in ("train", "test") for tokens in _distinct_questions(s)[0])


@functools.lru_cache(maxsize=None)
def _decode_images(split: Split) -> tuple[torch.Tensor, dict[int, int]]:
    """Every PNG of a split: ([N_images, 3, H, W] uint8, image_id -> row).

    Decoding 5,000 PNGs costs every rank of every launch seconds, so the pixels are kept in
    the project's cache directory (`epruntime.kernels.cpu.cache_dir()`, where the CPU kernels'
    library is built too), keyed by the package's version and its image files (names, sizes and
    modification times); a cache that does not match is decoded again and replaced."""
    from importlib.metadata import version

    from epruntime.kernels.cpu import cache_dir

    e = _easy_vqa()
    paths = e.get_train_image_paths() if split == "train" else e.get_test_image_paths()
    ids = sorted(paths)
    stats = [os.stat(paths[i]) for i in ids]
    key = (version("easy-vqa"), split, ids, [(st.st_size, st.st_mtime_ns) for st in stats])
    cache = cache_dir() / f"easy-vqa-{key[0]}-{split}.pt"
    images = _load_cached_images(cache, key)
    if images is None:
        images = _decode_pngs([paths[i] for i in ids])
        _store_cached_images(cache, key, images)
    return images, {image_id: row for row, image_id in enumerate(ids)}


def _decode_pngs(paths: list[str]) -> torch.Tensor:
    """PNG files -> [N, 3, H, W] uint8."""
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _load_cached_images(cache: Path, key: tuple) -> torch.Tensor | None:
    """The cached pixels if `cache` holds them for exactly `key`, else None (missing, stale,
    unreadable: the caller decodes)."""
    try:
        stored = torch.load(cache, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != repr(key):
        return None
    images = stored.get("images")
    return images if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 else None


def _store_cached_images(cache: Path, key: tuple, images: torch.Tensor) -> None:
    """Write the cache atomically (ranks of one launch may race: the last rename wins, every
    reader sees a whole file). A cache that can't be written is skipped: it only saves time."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.name, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"key": repr(key), "images": images}, f)
        os.replace(tmp, cache)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


@functools.lru_cache(maxsize=None)
def _encoded_split(split: Split) -> tuple[torch.Tensor, ...]:
    """All questions of a split as tensors: (ids [N_q, L], lens, answers, image_index)."""
    _, answer_words, image_ids = _questions(split)
    vocab = easy_vqa_vocab()
    answer_to_id = {a: i for i, a in enumerate(_easy_vqa().get_answers())}
    _, row_of_image = _decode_images(split)
    L = easy_vqa_max_question_len()
    distinct, question_text = _distinct_questions(split)
    encoded = [vocab.encode_tokens(tokens) for tokens in distinct]
    lens = torch.tensor([len(tok) for tok in encoded], dtype=torch.long)[question_text]
    ids = torch.tensor([tok + [PAD_ID] * (L - len(tok)) for tok in encoded],
                       dtype=torch.long)[question_text]
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
