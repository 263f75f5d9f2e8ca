"""The user's own VQA data: a folder of images plus a JSONL file of questions.

    {"image": "scenes/000123.png", "question": "what is in row 1, column 2?", "answer": "bag"}

One example per line (blank lines are skipped but keep the numbering); `image` is a path
relative to the image root (by default the JSONL file's folder); `answer` is optional where the
data is only predicted on; an optional `id` (string or number) names the example in
predictions.jsonl (default: its line number). Other fields are ignored.

The answer vocabulary and the question tokenizer's vocabulary come from the training split
(`DataVocab`) and travel with the checkpoint (meta.json's `extra.data_vocab`), so a checkpoint
predicts on new files with the ids it was trained with. Every problem with a file is a
`DataError` naming the file and the line, e.g. `train.jsonl line 7: empty question`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .vqa import PAD_ID, VQADataset, Vocab, tokenize

MISSING = -1  # answer label of an example without a reference answer


class DataError(ValueError):
    """A data file the run cannot use; the message names the file (and line) and the problem."""


@dataclass(frozen=True)
class Record:
    """One example as read from a JSONL line."""

    line: int  # 1-based line number in the file
    id: Any  # the line's "id", else its line number
    image: str  # path relative to the image root
    question: str
    answer: str | None


def _where(path: Path, line: int) -> str:
    return f"{path} line {line}"


def _parse_line(path: Path, line: int, text: str) -> Record:
    where = _where(path, line)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with \"image\" and \"question\", got "
                        f"{type(obj).__name__}")
    image = obj.get("image")
    if image is None:
        raise DataError(f"{where}: missing \"image\" (a path relative to the image root)")
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: \"image\" must be a non-empty path string, got {image!r}")
    if Path(image).is_absolute():
        raise DataError(f"{where}: \"image\" must be relative to the image root, got {image!r}")
    question = obj.get("question")
    if question is None:
        raise DataError(f"{where}: missing \"question\"")
    if not isinstance(question, str):
        raise DataError(f"{where}: \"question\" must be a string, got {question!r}")
    if not tokenize(question):
        raise DataError(f"{where}: empty question ({question!r} has no words)")
    answer = obj.get("answer")
    if answer is not None:
        # Numbers are fine as answers ("how many ...?": 3); they are compared as text.
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: \"answer\" must be a string or a number, got {answer!r}")
        if isinstance(answer, float) and not math.isfinite(answer):
            raise DataError(f"{where}: \"answer\" must be finite, got {answer!r}")
        answer = answer.strip() if isinstance(answer, str) else str(answer)
        if not answer:
            raise DataError(f"{where}: empty answer")
    example_id = obj.get("id", line)
    if not isinstance(example_id, (str, int)) or isinstance(example_id, bool):
        raise DataError(f"{where}: \"id\" must be a string or an integer, got {example_id!r}")
    return Record(line, example_id, image, question, answer)


def read_records(path: str | Path, *, need_answers: bool, max_items: int | None = None,
                 field: str = "data") -> list[Record]:
    """The examples of a JSONL file, in file order (the first `max_items` of them); DataError
    for a missing file, a bad line, a line without an answer when `need_answers`, or no
    examples. `field` names the setting the path came from in the messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{field}={path}: no such file")
    records: list[Record] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if max_items is not None and len(records) >= max_items:
                    break
                if not text.strip():
                    continue
                record = _parse_line(path, line, text)
                if need_answers and record.answer is None:
                    raise DataError(f"{_where(path, line)}: missing \"answer\" (every line of "
                                    "the training split needs one)")
                records.append(record)
    except UnicodeDecodeError as err:
        raise DataError(f"{field}={path}: not UTF-8 text ({err.reason} at byte "
                        f"{err.start})") from None
    if not records:
        raise DataError(f"{field}={path}: no examples (the file is empty or blank)")
    seen: dict[Any, int] = {}
    for r in records:
        if r.id in seen:
            raise DataError(f"{_where(path, r.line)}: id {r.id!r} repeats the id of line "
                            f"{seen[r.id]}")
        seen[r.id] = r.line
    return records


@dataclass(frozen=True)
class DataVocab:
    """What a checkpoint needs to encode questions and decode answers: the question words (the
    tokenizer's vocabulary, ids as `Vocab` gives them), the answers (label = index), and the
    question length the model's positions were built for."""

    words: tuple[str, ...]
    answers: tuple[str, ...]
    max_question_len: int

    @classmethod
    def from_records(cls, train: list[Record], others: list[list[Record]] = (),
                     max_question_len: int | None = None) -> DataVocab:
        """Words and answers of the training split; the question length covers every split
        given (or is `max_question_len`, which must cover the training split)."""
        vocab = Vocab.from_texts(r.question for r in train)
        answers = tuple(sorted({r.answer for r in train}))
        longest = max(len(tokenize(r.question)) for split in [train, *others] for r in split)
        if max_question_len is not None:
            if max_question_len < longest:
                raise DataError(f"data.max_question_len={max_question_len} is shorter than the "
                                f"longest question of the data ({longest} tokens)")
            longest = max_question_len
        return cls(tuple(vocab.words), answers, longest)

    @classmethod
    def of_dataset(cls, dataset) -> DataVocab:
        """The vocabulary of any built dataset (easy-vqa, synthetic, JSONL)."""
        return cls(tuple(dataset.vocab.words), tuple(dataset.answers_vocab),
                   int(dataset.max_question_len))

    @property
    def vocab(self) -> Vocab:
        return Vocab(self.words)

    def to_dict(self) -> dict:
        return {"words": list(self.words), "answers": list(self.answers),
                "max_question_len": self.max_question_len}

    @classmethod
    def from_dict(cls, d: dict) -> DataVocab:
        try:
            return cls(tuple(d["words"]), tuple(d["answers"]), int(d["max_question_len"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"data_vocab: malformed ({err!r})") from None


def load_image(full: Path, size: int) -> np.ndarray:
    """[size, size, 3] uint8 RGB of the image file (resized with bilinear filtering when its
    size differs); OSError or PIL's errors when it cannot be read."""
    from PIL import Image

    with Image.open(full) as im:
        im.load()
        rgb = im.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def decode_images(path: Path, records: list[Record], image_root: Path,
                  size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every distinct image once: ([N_images, 3, size, size] uint8, image_index [N_q])."""
    row_of: dict[str, int] = {}
    arrays: list[np.ndarray] = []
    index = []
    for r in records:
        if r.image not in row_of:
            full = image_root / r.image
            if not full.is_file():
                raise DataError(f"{_where(path, r.line)}: image {r.image!r} not found ({full})")
            try:
                arrays.append(load_image(full, size))
            except Exception as err:  # noqa: BLE001 - PIL raises many kinds for a bad file
                raise DataError(f"{_where(path, r.line)}: unreadable image {r.image!r} ({full}: "
                                f"{type(err).__name__}: {err})") from None
            row_of[r.image] = len(arrays) - 1
        index.append(row_of[r.image])
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(index, dtype=torch.long)


class JsonlDataset(VQADataset):
    """A JSONL split in memory; `answers` holds MISSING (-1) where a line has no answer.

    example_ids: the id of every example, in file order (predictions.jsonl's `id`)
    references:  the answer text of every example (None where absent)
    """

    def __init__(self, path: Path, records: list[Record], images: torch.Tensor,
                 image_index: torch.Tensor, vocab: DataVocab):
        self.path = path
        self.records = records
        self.example_ids = [r.id for r in records]
        self.references = [r.answer for r in records]
        words = vocab.vocab
        L = vocab.max_question_len
        encoded = [words.encode(r.question) for r in records]
        for r, tokens in zip(records, encoded):
            if len(tokens) > L:
                raise DataError(f"{_where(path, r.line)}: question has {len(tokens)} tokens, more "
                                f"than the model takes (max_question_len={L}, from the training "
                                "data)")
        ids = torch.tensor([t + [PAD_ID] * (L - len(t)) for t in encoded], dtype=torch.long)
        lens = torch.tensor([len(t) for t in encoded], dtype=torch.long)
        label = {a: i for i, a in enumerate(vocab.answers)}
        answers = []
        for r in records:
            if r.answer is None:
                answers.append(MISSING)
            elif r.answer not in label:
                shown = ", ".join(repr(a) for a in vocab.answers[:8])
                more = ", ..." if len(vocab.answers) > 8 else ""
                raise DataError(f"{_where(path, r.line)}: unknown answer {r.answer!r}: not one "
                                f"of the {len(vocab.answers)} answers of the training split "
                                f"({shown}{more})")
            else:
                answers.append(label[r.answer])
        super().__init__(images, ids, lens, torch.tensor(answers, dtype=torch.long),
                         image_index, words, vocab.answers)

    @property
    def has_answers(self) -> bool:
        return bool((self.answers != MISSING).any())

    def majority_baseline(self) -> float | None:
        """Share of the most common answer among the answered examples (None: no answers)."""
        known = self.answers[self.answers != MISSING]
        if known.numel() == 0:
            return None
        return float(torch.bincount(known).max()) / known.numel()


def load_jsonl(path: str | Path, vocab: DataVocab, image_size: int, *,
               image_root: str | Path | None = None, need_answers: bool = True,
               max_items: int | None = None, field: str = "data") -> JsonlDataset:
    """One JSONL split, images decoded and resized to `image_size`, questions and answers
    encoded with `vocab` (the training split's)."""
    path = Path(path)
    records = read_records(path, need_answers=need_answers, max_items=max_items, field=field)
    root = Path(image_root) if image_root is not None else path.parent
    images, index = decode_images(path, records, root, image_size)
    return JsonlDataset(path, records, images, index, vocab)


def load_jsonl_splits(train_path: str | Path, eval_path: str | Path | None, image_size: int, *,
                      image_root: str | Path | None = None, max_train_items: int | None = None,
                      max_eval_items: int | None = None,
                      max_question_len: int | None = None) -> tuple[JsonlDataset,
                                                                    JsonlDataset | None]:
    """(train, eval) for training: the vocabulary is built from the training split (the
    question length covers both); an eval answer the training split lacks is a DataError."""
    train_records = read_records(train_path, need_answers=True, max_items=max_train_items,
                                 field="data.train_jsonl")
    eval_records = (read_records(eval_path, need_answers=True, max_items=max_eval_items,
                                 field="data.eval_jsonl") if eval_path is not None else None)
    vocab = DataVocab.from_records(train_records, [eval_records] if eval_records else [],
                                   max_question_len)

    def build(path, records):
        path = Path(path)
        root = Path(image_root) if image_root is not None else path.parent
        images, index = decode_images(path, records, root, image_size)
        return JsonlDataset(path, records, images, index, vocab)

    return (build(train_path, train_records),
            build(eval_path, eval_records) if eval_records is not None else None)
