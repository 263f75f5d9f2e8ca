"""What a JSONL split's answers give away without the image: the majority answer, and the most
common training answer per question text ("question only"), overall and per question kind.

    python profiling/text_baselines.py --train data/scenes4/train.jsonl \\
        --test data/scenes4/test.jsonl --json profiling/results/text_baselines_scenes4.json

A question text never seen in training gets the majority answer. Ties go to the answer that
comes first in sorted order, so the figures are the same on every run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    """The records of a JSONL split, in file order."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _top(counts: Counter) -> str:
    return min(counts, key=lambda a: (-counts[a], a))


def baselines(train: list[dict], test: list[dict]) -> dict:
    """{"majority": {"answer", "accuracy"}, "question_only": {"accuracy", "acc_<kind>"...}}."""
    majority = _top(Counter(r["answer"] for r in train))
    by_question: dict[str, Counter] = defaultdict(Counter)
    for r in train:
        by_question[r["question"]][r["answer"]] += 1
    guess = {q: _top(c) for q, c in by_question.items()}
    hits: dict[str, list[bool]] = defaultdict(list)
    for r in test:
        ok = guess.get(r["question"], majority) == r["answer"]
        hits["all"].append(ok)
        if "kind" in r:
            hits[r["kind"]].append(ok)
    question_only = {"accuracy": round(sum(hits["all"]) / len(test), 4)}
    question_only |= {f"acc_{k}": round(sum(v) / len(v), 4)
                      for k, v in sorted(hits.items()) if k != "all"}
    return {"majority": {"answer": majority, "accuracy": round(
                sum(r["answer"] == majority for r in test) / len(test), 4)},
            "question_only": question_only, "train_items": len(train), "test_items": len(test)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, type=Path)
    p.add_argument("--test", required=True, type=Path)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    result = {"train": str(args.train), "test": str(args.test),
              **baselines(read_records(args.train), read_records(args.test))}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
