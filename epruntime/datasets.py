"""The train and eval datasets a config asks for."""

from __future__ import annotations

from epruntime.config import Config
from epruntime.data import SyntheticVQA, load_easy_vqa
from epruntime.data.jsonl import load_jsonl_splits


def build_datasets(cfg: Config):
    """(train, eval) datasets with the same vocabulary, answers and question length (eval is
    None for a jsonl source without data.eval_jsonl)."""
    d = cfg.data
    if d.dataset == "easy-vqa":
        return load_easy_vqa("train", d.max_train_items), load_easy_vqa("test", d.max_eval_items)
    if d.dataset == "jsonl":  # images resized to the size the model takes
        return load_jsonl_splits(d.train_jsonl, d.eval_jsonl, cfg.model.image_size,
                                 image_root=d.image_root, max_train_items=d.max_train_items,
                                 max_eval_items=d.max_eval_items,
                                 max_question_len=d.max_question_len)

    def synthetic(n: int, seed: int) -> SyntheticVQA:
        return SyntheticVQA(n, image_size=cfg.model.image_size, question_len=d.synthetic_question_len,
                            seed=seed)

    return (synthetic(d.synthetic_items, cfg.train.seed),
            synthetic(d.max_eval_items or max(256, d.synthetic_items // 8), cfg.train.seed + 1))
