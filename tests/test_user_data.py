"""The user's own data (epruntime.data.jsonl): reading, vocabulary from the training split, the
config fields, and every bad-input case with its exact message (in Python and from the CLI)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from epruntime.config import ConfigError, load_config
from epruntime.data.jsonl import (MISSING, DataError, DataVocab, load_jsonl, load_jsonl_splits,
                                  read_records)
from tests.launch import run

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 60, 220)}


def write_colour_data(root: Path, n_train: int = 24, n_test: int = 12, size: int = 20,
                      seed: int = 0) -> tuple[Path, Path]:
    """A tiny VQA set of coloured squares on noise: (train.jsonl, test.jsonl) under `root`,
    images under root/img. Questions ask the colour or whether the square is a given colour."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for i in range(n):
            colour = names[i % 3]
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            x, y = rng.integers(0, size // 2, 2)
            pixels[y:y + size // 2, x:x + size // 2] = COLOURS[colour]
            image = f"img/{split}{i:03d}.png"
            Image.fromarray(pixels).save(root / image)
            if i % 2:
                q, a = "What colour is the square?", colour
            else:
                asked = names[(i // 2) % 3]
                q, a = f"Is the square {asked}?", "yes" if asked == colour else "no"
            lines.append({"image": image, "question": q, "answer": a})
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture
def data(tmp_path):
    return write_colour_data(tmp_path)


def _vocab(train: Path) -> DataVocab:
    return DataVocab.from_records(read_records(train, need_answers=True))


# ---- reading and vocabulary -----------------------------------------------------------------
def test_splits_share_the_training_vocabulary_and_resize_images(data):
    train_path, test_path = data
    train, test = load_jsonl_splits(train_path, test_path, image_size=16)
    assert train.vocab == test.vocab and train.answers_vocab == test.answers_vocab
    assert train.answers_vocab == ["blue", "green", "no", "red", "yes"]  # sorted, from train
    assert train.images.shape == (24, 3, 16, 16) and train.images.dtype == torch.uint8
    b = test.batch([1])
    assert test.vocab.decode(b.question_ids[0]) == "what colour is the square ?"
    assert test.answers_vocab[int(b.answers[0])] == "green"
    assert test.example_ids == list(range(1, 13))  # no "id": the line number
    # majority baseline over the answers actually present
    answers = [json.loads(x)["answer"] for x in test_path.read_text().splitlines()]
    top = max(answers.count(a) for a in set(answers))
    assert test.majority_baseline() == pytest.approx(top / len(answers))


def test_vocab_round_trips_through_a_dict(data):
    vocab = _vocab(data[0])
    again = DataVocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again == vocab and again.vocab.words == list(vocab.words)


def test_prediction_data_may_lack_answers_and_ids_are_kept(tmp_path, data):
    vocab = _vocab(data[0])
    f = tmp_path / "ask.jsonl"
    f.write_text('{"image": "img/test000.png", "question": "is the square red?", "id": "a"}\n'
                 "\n"
                 '{"image": "img/test001.png", "question": "what is the purple square?",'
                 ' "answer": "red", "id": 7}\n')
    ds = load_jsonl(f, vocab, 16, need_answers=False)
    assert ds.example_ids == ["a", 7] and ds.references == [None, "red"]
    assert ds.answers.tolist() == [MISSING, vocab.answers.index("red")]
    assert ds.has_answers and ds.majority_baseline() == 1.0
    assert 1 in ds.batch([1]).question_ids[0].tolist()  # "purple" is <unk>, not an error


# ---- every bad input, its exact message ------------------------------------------------------
def _one_bad_line(tmp_path, data, text: str, line_no: int = 2) -> Path:
    """test.jsonl with `text` as line `line_no` (the others fine)."""
    good = data[1].read_text().splitlines()
    good[line_no - 1] = text
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(good) + "\n")
    return f


def _error(path: Path, data, need_answers=False) -> str:
    with pytest.raises(DataError) as info:
        load_jsonl(path, _vocab(data[0]), 16, image_root=data[0].parent,
                   need_answers=need_answers)
    return str(info.value)


def test_missing_image(tmp_path, data):
    f = _one_bad_line(tmp_path, data, '{"image": "img/nope.png", "question": "is it red?"}')
    root = data[0].parent
    assert _error(f, data) == (f"{f} line 2: image 'img/nope.png' not found "
                               f"({root / 'img/nope.png'})")


def test_unreadable_image(tmp_path, data):
    root = data[0].parent
    (root / "img" / "broken.png").write_bytes(b"this is not a PNG")
    f = _one_bad_line(tmp_path, data, '{"image": "img/broken.png", "question": "is it red?"}', 3)
    full = root / "img/broken.png"
    assert _error(f, data) == (f"{f} line 3: unreadable image 'img/broken.png' ({full}: "
                               f"UnidentifiedImageError: cannot identify image file "
                               f"{str(full)!r})")


def test_empty_question(tmp_path, data):
    f = _one_bad_line(tmp_path, data, '{"image": "img/test000.png", "question": "  ?? "}', 4)
    # "?" is a token of its own: "??" is not empty. A question of punctuation only is.
    f.write_text(f.read_text().replace('"  ?? "', '"  ... "'))
    assert _error(f, data) == f"{f} line 4: empty question ('  ... ' has no words)"


def test_unknown_answer_at_evaluation(tmp_path, data):
    f = _one_bad_line(tmp_path, data, '{"image": "img/test000.png", "question": "what colour '
                                      'is the square?", "answer": "purple"}', 5)
    assert _error(f, data) == (f"{f} line 5: unknown answer 'purple': not one of the 5 answers "
                               "of the training split ('blue', 'green', 'no', 'red', 'yes')")
    train, _ = data
    with pytest.raises(DataError) as info:  # the same check when training names an eval split
        load_jsonl_splits(train, f, 16)
    assert str(info.value).startswith(f"{f} line 5: unknown answer 'purple'")


def test_malformed_json_line(tmp_path, data):
    f = _one_bad_line(tmp_path, data, '{"image": "img/test000.png" "question": "red?"}', 6)
    assert _error(f, data) == f"{f} line 6: malformed JSON (Expecting ',' delimiter at column 29)"


def test_other_bad_lines_name_their_line(tmp_path, data):
    cases = [('["img/test000.png", "red?"]', "expected a JSON object"),
             ('{"question": "red?"}', 'missing "image"'),
             ('{"image": "/etc/passwd", "question": "red?"}', "must be relative"),
             ('{"image": "img/test000.png"}', 'missing "question"'),
             ('{"image": "img/test000.png", "question": "red?", "answer": ""}', "empty answer"),
             ('{"image": "img/test000.png", "question": "red?", "id": 3}', "repeats the id of "
                                                                             "line 3")]
    for text, needle in cases:
        f = _one_bad_line(tmp_path, data, text, 7)
        message = _error(f, data)
        assert message.startswith(f"{f} line 7: ") and needle in message, message
    f = _one_bad_line(tmp_path, data, '{"image": "img/test000.png", "question": "red?"}', 2)
    assert _error(f, data, need_answers=True) == (
        f"{f} line 2: missing \"answer\" (every line of the training split needs one)")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"data\.train_jsonl=.*empty.jsonl: no examples"):
        load_jsonl_splits(empty, None, 16)
    with pytest.raises(DataError, match=r"data\.train_jsonl=.*none.jsonl: no such file"):
        load_jsonl_splits(tmp_path / "none.jsonl", None, 16)


def test_question_longer_than_the_model_takes(tmp_path, data):
    vocab = _vocab(data[0])
    long_q = "is the square red " + "really " * vocab.max_question_len + "?"
    f = _one_bad_line(tmp_path, data, json.dumps({"image": "img/test000.png",
                                                  "question": long_q}), 2)
    message = _error(f, data)
    assert message == (f"{f} line 2: question has {vocab.max_question_len + 5} tokens, more than "
                       f"the model takes (max_question_len={vocab.max_question_len}, from the "
                       "training data)")


# ---- config ---------------------------------------------------------------------------------
def test_config_fields_are_validated_with_their_names(data):
    train, test = data
    cfg = load_config(None, ["data.dataset=jsonl", f"data.train_jsonl={train}",
                             f"data.eval_jsonl={test}"])
    assert cfg.data.train_jsonl == train
    bad = [(["data.dataset=jsonl"], "data.dataset=jsonl needs data.train_jsonl"),
           ([f"data.train_jsonl={train}"], "data.train_jsonl is set but data.dataset=easy-vqa"),
           (["data.dataset=jsonl", f"data.train_jsonl={train}"], "needs data.eval_jsonl"),
           (["data.dataset=jsonl", f"data.train_jsonl={train}", "train.eval_at_end=false",
             "data.max_question_len=0"], "data.max_question_len: Input should be greater"),
           (["data.dataset=csv"], "data.dataset")]
    for overrides, needle in bad:
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            load_config(None, overrides)
    load_config(None, ["data.dataset=jsonl", f"data.train_jsonl={train}",
                       "train.eval_at_end=false"])  # no eval split needed then


def test_train_with_a_bad_file_exits_2_with_one_named_line(tmp_path, data):
    train, _ = data
    bad = _one_bad_line(tmp_path, data, '{"image": "img/none.png", "question": "red?", '
                                        '"answer": "red"}', 3)
    proc = run([sys.executable, "-m", "epruntime.train", "--set", "data.dataset=jsonl",
                "--set", f"data.train_jsonl={train}", "--set", f"data.eval_jsonl={bad}",
                "--set", f"train.output_dir={tmp_path / 'run'}", "--set", "model.image_size=16",
                "--set", "model.patch_size=4"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    expected = (f"epruntime.train: error: {bad} line 3: image 'img/none.png' not found "
                f"({bad.parent / 'img/none.png'})")
    assert expected in proc.stderr.splitlines(), proc.stderr[-3000:]
