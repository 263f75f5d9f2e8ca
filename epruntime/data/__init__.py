"""Datasets (easy-vqa, synthetic) and deterministic DP-sharded batch iteration."""

from .loader import BatchDataset, ShardedBatchIterator, epoch_permutation, shard_slice, split_sizes
from .synthetic import SyntheticVQA, synthetic_answer
from .vqa import (
    IMAGE_ID,
    PAD_ID,
    UNK_ID,
    VQABatch,
    VQADataset,
    Vocab,
    easy_vqa_max_question_len,
    easy_vqa_vocab,
    load_easy_vqa,
    tokenize,
)

__all__ = [
    "IMAGE_ID",
    "PAD_ID",
    "UNK_ID",
    "BatchDataset",
    "ShardedBatchIterator",
    "SyntheticVQA",
    "VQABatch",
    "VQADataset",
    "Vocab",
    "easy_vqa_max_question_len",
    "easy_vqa_vocab",
    "epoch_permutation",
    "load_easy_vqa",
    "shard_slice",
    "split_sizes",
    "synthetic_answer",
    "tokenize",
]
