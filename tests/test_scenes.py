"""The scene generator (epruntime.data.scenes): byte-identical files for a seed, answers that
follow from each scene's own metadata (rebuilt here independently), items that are the
Fashion-MNIST photos they claim, and output that loads through the user-data path."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from epruntime.data.jsonl import DataVocab, load_jsonl, load_jsonl_splits, read_records
from epruntime.data.scenes import CATEGORIES, FASHION_MNIST_DIR, PLURALS, fashion_mnist, main
from tests.launch import run

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="needs Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist, "
           "or bash scripts/setup.sh as root)")


def _generate(out: Path, seed: int, layout: str = "jitter", grid: str | None = None) -> None:
    assert main(["--out", str(out), "--seed", str(seed), "--train", "12", "--test", "4",
                 "--questions", "4", "--layout", layout]
                + (["--grid", grid] if grid else [])) == 0


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("needs Debian's dataset-fashion-mnist package (apt-get install "
                    "dataset-fashion-mnist, or bash scripts/setup.sh as root)")
    out = tmp_path_factory.mktemp("scenes")
    _generate(out, seed=3)
    return out


@needs_fashion_mnist
def test_same_seed_gives_identical_files(scenes, tmp_path):
    _generate(tmp_path / "again", seed=3)
    first = _digest(scenes)
    assert len(first) == 12 + 4 + 4  # images, then {train,test}.jsonl and *_scenes.jsonl
    assert _digest(tmp_path / "again") == first
    _generate(tmp_path / "other", seed=4)
    other = _digest(tmp_path / "other")
    assert other.keys() == first.keys() and other != first


def _rebuild(items: list[dict], question: str) -> str:
    """The answer from the metadata alone, by a reading of the question independent of the
    generator's code."""
    def count(cat):
        return sum(it["category"] == cat for it in items)

    if m := re.fullmatch(r"what is in row (\d), column (\d)\?", question):
        r, c = int(m[1]) - 1, int(m[2]) - 1
        hit = [it["category"] for it in items if it["row"] == r and it["col"] == c]
        return hit[0] if hit else "nothing"
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(count(CATEGORIES[PLURALS.index(m[1])]))
    if m := re.fullmatch(r"is there a (\w+)\?", question):
        return "yes" if count(m[1]) else "no"
    m = re.fullmatch(r"is the (\w+) (left of|above) the (\w+)\?", question)
    assert m, question
    assert count(m[1]) == 1 and count(m[3]) == 1  # the question is unambiguous
    a = next(it for it in items if it["category"] == m[1])
    b = next(it for it in items if it["category"] == m[3])
    # the centres of the pixel boxes decide, not the cell indices the generator used
    axis = 0 if m[2] == "left of" else 1
    ca, cb = (a["box"][axis] + a["box"][axis + 2]) / 2, (b["box"][axis] + b["box"][axis + 2]) / 2
    assert ca != cb
    return "yes" if ca < cb else "no"


@needs_fashion_mnist
def test_default_grid_is_2_to_4_unchanged(scenes, tmp_path):
    """--grid's default draws the grid as the generator always did: the same files as an
    explicit --grid 2-4, and all three sizes occur."""
    _generate(tmp_path / "explicit", seed=3, grid="2-4")
    assert _digest(tmp_path / "explicit") == _digest(scenes)
    lines = (scenes / "train_scenes.jsonl").read_text().splitlines()
    assert {json.loads(x)["grid"] for x in lines} == {2, 3, 4}


@needs_fashion_mnist
def test_grid_4_gives_4x4_scenes_with_correct_answers(tmp_path):
    _generate(tmp_path, seed=5, grid="4")
    _check_answers(tmp_path)
    for split in ("train", "test"):
        for line in (tmp_path / f"{split}_scenes.jsonl").read_text().splitlines():
            d = json.loads(line)
            assert d["grid"] == 4
            for it in d["items"]:  # each item inside its own 16-pixel cell, i.e. one token
                x0, y0, x1, y1 = it["box"]
                assert it["col"] * 16 <= x0 < x1 <= (it["col"] + 1) * 16
                assert it["row"] * 16 <= y0 < y1 <= (it["row"] + 1) * 16


def test_bad_grid_is_a_usage_error(tmp_path):
    for bad in ("0", "4-2", "x"):
        with pytest.raises(SystemExit) as err:
            main(["--out", str(tmp_path), "--train", "1", "--test", "1", "--grid", bad])
        assert err.value.code == 2


@needs_fashion_mnist
def test_answers_follow_from_each_scenes_metadata(scenes):
    _check_answers(scenes)


def _check_answers(scenes: Path) -> None:
    for split in ("train", "test"):
        meta = {}
        for line in (scenes / f"{split}_scenes.jsonl").read_text().splitlines():
            d = json.loads(line)
            meta[d["image"]] = d
        questions = [json.loads(x) for x in (scenes / f"{split}.jsonl").read_text().splitlines()]
        assert len(questions) == 4 * len(meta)
        kinds = {q["kind"] for q in questions}
        assert kinds == {"position", "count", "presence", "relative"}
        for q in questions:
            assert _rebuild(meta[q["image"]]["items"], q["question"]) == q["answer"], q


@needs_fashion_mnist
def test_items_are_the_photos_they_claim(scenes):
    from PIL import Image

    photos, labels = fashion_mnist("train")
    for line in (scenes / "train_scenes.jsonl").read_text().splitlines()[:4]:
        d = json.loads(line)
        pixels = np.asarray(Image.open(scenes / d["image"])).astype(np.float32)
        assert 2 <= d["grid"] <= 4
        for it in d["items"]:
            assert CATEGORIES[labels[it["source"]]] == it["category"]
            x0, y0, x1, y1 = it["box"]
            cell = 64 // d["grid"]
            assert it["col"] * cell <= x0 < x1 <= (it["col"] + 1) * cell
            assert it["row"] * cell <= y0 < y1 <= (it["row"] + 1) * cell
            # where the photo is bright the scene differs from where the photo is black
            photo = np.asarray(Image.fromarray(photos[it["source"]]).resize((x1 - x0, y1 - y0),
                                                                           Image.BILINEAR))
            patch = pixels[y0:y1, x0:x1]
            bright, black = photo >= 0.8 * photo.max(), photo <= 8
            if photo.max() > 96 and black.any():
                gap = np.abs(patch[bright].mean(0) - patch[black].mean(0)).max()
                assert gap > 20, (d["image"], it)


@needs_fashion_mnist
def test_output_loads_through_the_user_data_path(scenes):
    train, _ = load_jsonl_splits(scenes / "train.jsonl", None, 32)
    assert train.images.shape == (12, 3, 32, 32) and len(train) == 48
    # 12 scenes need not hold every answer; the vocabulary of both splits does
    records = [read_records(scenes / f"{s}.jsonl", need_answers=True) for s in ("train", "test")]
    test = load_jsonl(scenes / "test.jsonl", DataVocab.from_records(records[0] + records[1]), 32)
    assert len(test) == 16 and test.images.shape == (4, 3, 32, 32)
    assert set(test.answers_vocab) <= set(CATEGORIES) | {"nothing", "yes", "no", "0", "1", "2",
                                                         "3", "4"}


def test_missing_package_is_a_named_error(tmp_path):
    proc = run([sys.executable, "-m", "epruntime.data.scenes", "--out", str(tmp_path / "o"),
                "--train", "1", "--test", "1", "--fashion-mnist", str(tmp_path / "none")],
               timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"epruntime.data.scenes: error: Fashion-MNIST not found ({tmp_path / 'none'}/train-"
        f"images-idx3-ubyte.gz, {tmp_path / 'none'}/train-labels-idx1-ubyte.gz): install "
        "Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist, or bash "
        "scripts/setup.sh as root)")
