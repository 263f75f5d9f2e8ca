"""Unit tests for epruntime.data (easy-vqa loading, synthetic data, sharded iteration)."""

from __future__ import annotations

import collections

import pytest
import torch

from epruntime.data import (
    IMAGE_ID,
    PAD_ID,
    UNK_ID,
    ShardedBatchIterator,
    SyntheticVQA,
    VQABatch,
    Vocab,
    load_easy_vqa,
    synthetic_answer,
)


@pytest.fixture(scope="module")
def train():
    return load_easy_vqa("train")


@pytest.fixture(scope="module")
def test_split():
    return load_easy_vqa("test")


def _batches_equal(a: VQABatch, b: VQABatch) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(
            (a.images, a.question_ids, a.question_lens, a.answers),
            (b.images, b.question_ids, b.question_lens, b.answers),
        )
    )


# ---------------------------------------------------------------- vocab


def test_vocab_is_deterministic_and_sorted():
    texts = ["What is the RED shape?", "does the image contain a circle?"]
    v1, v2 = Vocab.from_texts(texts), Vocab.from_texts(list(reversed(texts)))
    assert v1.words == v2.words
    assert v1.words[:3] == ["<pad>", "<unk>", "<image>"]
    assert (PAD_ID, UNK_ID, IMAGE_ID) == (0, 1, 2) == (Vocab.PAD_ID, Vocab.UNK_ID, Vocab.IMAGE_ID)
    assert v1.words[3:] == sorted(v1.words[3:])
    assert len(v1) == len(v1.words)


def test_vocab_encode_question_mark_and_unknown():
    v = Vocab.from_texts(["what is the red shape?"])
    ids = v.encode("What is the RED shape?")
    assert len(ids) == 6
    assert v.words[ids[-1]] == "?"
    assert v.decode(ids) == "what is the red shape ?"
    assert v.encode("what is the purple shape ?") == v.encode("what is the blorp shape?")
    assert v.encode("purple")[0] == UNK_ID


def test_train_and_test_share_vocab(train, test_split):
    assert train.vocab == test_split.vocab
    assert train.max_question_len == test_split.max_question_len
    assert train.answers_vocab == test_split.answers_vocab
    assert not (test_split.question_ids == UNK_ID).any()
    assert "?" in train.vocab.words and len(train.vocab) > 10


# ---------------------------------------------------------------- easy-vqa


def test_easy_vqa_sizes_and_batch_shapes(train):
    assert len(train) == 38575 and train.images.shape == (4000, 3, 64, 64)
    assert train.image_size == 64 and train.num_answers == 13
    b = train.batch(torch.tensor([0, 5, 38574]))
    L = train.max_question_len
    assert len(b) == 3
    assert b.images.shape == (3, 3, 64, 64) and b.images.dtype == torch.float32
    assert 0.0 <= float(b.images.min()) and float(b.images.max()) <= 1.0 and float(b.images.max()) > 0.5
    assert b.question_ids.shape == (3, L) and b.question_ids.dtype == torch.int64
    assert b.question_lens.dtype == torch.int64 and b.answers.dtype == torch.int64
    assert (b.question_lens >= 1).all()
    for ids, n in zip(b.question_ids, b.question_lens):
        assert (ids[:n] != PAD_ID).all() and (ids[n:] == PAD_ID).all()
        assert train.vocab.words[int(ids[n - 1])] == "?"
    assert int(train.question_lens.max()) == L
    assert ((train.answers >= 0) & (train.answers < 13)).all()
    assert len(train.batch([])) == 0


def test_easy_vqa_matches_package_text(train):
    import easy_vqa

    texts, answers, image_ids = easy_vqa.get_train_questions()
    for i in (0, 1234, len(texts) - 1):
        b = train.batch([i])
        assert train.vocab.decode(b.question_ids[0]) == texts[i].replace("?", " ?")
        assert train.answers_vocab[int(b.answers[0])] == answers[i]
        assert int(train.image_index[i]) == image_ids[i]  # ids are 0..N-1, so rows coincide


def test_every_question_is_encoded_as_vocab_encode_does(test_split):
    import easy_vqa

    texts = easy_vqa.get_test_questions()[0]
    for i, text in enumerate(texts):
        n = int(test_split.question_lens[i])
        assert test_split.question_ids[i, :n].tolist() == test_split.vocab.encode(text), i


def test_image_cache_holds_the_decoded_pixels_and_survives_bad_files(tmp_path, monkeypatch):
    import easy_vqa

    from epruntime.data import vqa

    paths = easy_vqa.get_test_image_paths()
    fresh = vqa._decode_pngs([paths[i] for i in sorted(paths)])
    decode = vqa._decode_images.__wrapped__  # past the per-process lru_cache
    monkeypatch.setenv("EPRUNTIME_CACHE", str(tmp_path / "cache"))
    first, rows = decode("test")  # decodes and writes the cache
    cache = next((tmp_path / "cache").glob("easy-vqa-*-test.pt"))
    second, _ = decode("test")  # reads it
    assert torch.equal(first, fresh) and torch.equal(second, fresh)
    assert rows == {image_id: r for r, image_id in enumerate(sorted(paths))}
    # a truncated file, and a file of other images under another key: decoded again, replaced
    cache.write_bytes(cache.read_bytes()[:1000])
    assert torch.equal(decode("test")[0], fresh)
    torch.save({"key": "another key", "images": torch.zeros_like(fresh)}, cache)
    assert torch.equal(decode("test")[0], fresh)
    assert torch.equal(torch.load(cache, weights_only=True)["images"], fresh)
    assert not list((tmp_path / "cache").glob("*.tmp"))
    # a cache directory that can't be made only costs the decoding
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("EPRUNTIME_CACHE", str(tmp_path / "a-file" / "cache"))
    assert torch.equal(decode("test")[0], fresh)


def test_majority_baseline_of_test_split(test_split):
    import easy_vqa

    _, answers, _ = easy_vqa.get_test_questions()
    true_share = collections.Counter(answers).most_common(1)[0][1] / len(answers)
    assert test_split.majority_baseline() == pytest.approx(true_share, abs=1e-12)
    assert 0.35 < test_split.majority_baseline() < 0.40


def test_max_items_keeps_prefix(train):
    small = load_easy_vqa("train", max_items=10)
    assert len(small) == 10 and small.max_question_len == train.max_question_len
    assert _batches_equal(small.batch(range(10)), train.batch(range(10)))


# ---------------------------------------------------------------- iterator


def _global_batches(ds, gb, seed, n, dp_size=1, **kw):
    """First n global batches, reassembled from all ranks' local batches in rank order."""
    its = [ShardedBatchIterator(ds, gb, r, dp_size, seed, **kw) for r in range(dp_size)]
    out = []
    for _ in range(n):
        parts = [next(it) for it in its]
        out.append(torch.cat([p.question_ids for p in parts]))
    return out


@pytest.mark.parametrize("dp_size", [2, 4])
def test_union_of_ranks_equals_global_batch(dp_size):
    ds = SyntheticVQA(100, image_size=4, seed=1)
    ref = _global_batches(ds, 8, seed=7, n=15)  # crosses the epoch boundary (12 steps/epoch)
    got = _global_batches(ds, 8, seed=7, n=15, dp_size=dp_size)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    it = ShardedBatchIterator(ds, 8, 1, dp_size, 7)
    assert len(next(it)) == 8 // dp_size


def test_global_batch_follows_documented_permutation():
    ds = SyntheticVQA(50, image_size=4)
    it = ShardedBatchIterator(ds, 10, 0, 1, seed=3)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3 + 1))
    for _ in range(5):
        next(it)
    assert _batches_equal(next(it), ds.batch(perm[:10]))  # first batch of epoch 1
    unshuffled = ShardedBatchIterator(ds, 10, 0, 1, seed=3, shuffle=False)
    assert _batches_equal(next(unshuffled), ds.batch(range(10)))


def test_epoch_boundary():
    ds = SyntheticVQA(23, image_size=4)
    it = ShardedBatchIterator(ds, 5, 0, 1, seed=0)
    assert it.steps_per_epoch == 4
    seen = [next(it) for _ in range(4)]
    assert it.state_dict()["epoch"] == 0 and it.state_dict()["batch_in_epoch"] == 4
    ids = torch.cat([b.question_ids for b in seen])
    assert len({tuple(r.tolist()) for r in ids}) == 20  # no repeats within an epoch
    nxt = next(it)
    assert it.state_dict()["epoch"] == 1 and it.state_dict()["batch_in_epoch"] == 1
    assert not torch.equal(nxt.question_ids, seen[0].question_ids)  # reshuffled


def test_resume_yields_same_batches():
    ds = SyntheticVQA(40, image_size=4)
    it = ShardedBatchIterator(ds, 8, 1, 2, seed=11)
    for _ in range(7):  # into the second epoch (5 steps/epoch)
        next(it)
    state = it.state_dict()
    assert state == {"epoch": 1, "batch_in_epoch": 2, "seed": 11, "global_batch_size": 8}
    expected = [next(it) for _ in range(6)]
    resumed = ShardedBatchIterator(ds, 8, 1, 2, seed=11)
    resumed.load_state_dict(state)
    assert all(_batches_equal(a, next(resumed)) for a in expected)


def test_resume_at_epoch_end():
    ds = SyntheticVQA(40, image_size=4)
    it = ShardedBatchIterator(ds, 8, 0, 1, seed=2)
    for _ in range(5):
        next(it)
    resumed = ShardedBatchIterator(ds, 8, 0, 1, seed=2)
    resumed.load_state_dict(it.state_dict())
    assert _batches_equal(next(it), next(resumed))


def test_different_seeds_differ():
    ds = SyntheticVQA(64, image_size=4)
    a = next(ShardedBatchIterator(ds, 16, 0, 1, seed=0)).question_ids
    b = next(ShardedBatchIterator(ds, 16, 0, 1, seed=1)).question_ids
    assert not torch.equal(a, b)


def test_validation_errors_name_the_field():
    ds = SyntheticVQA(40, image_size=4)
    with pytest.raises(ValueError, match=r"data\.global_batch_size.*dp_size"):
        ShardedBatchIterator(ds, 10, 0, 4, seed=0)
    with pytest.raises(ValueError, match="global batch"):
        ShardedBatchIterator(ds, 64, 0, 1, seed=0)
    it = ShardedBatchIterator(ds, 8, 0, 1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        it.load_state_dict({**it.state_dict(), "seed": 5})
    with pytest.raises(ValueError, match="global_batch_size"):
        it.load_state_dict({**it.state_dict(), "global_batch_size": 16})


def test_eval_iterator_covers_dataset_once_with_empty_ranks():
    ds = SyntheticVQA(19, image_size=4)
    dp = 4
    its = [ShardedBatchIterator(ds, 8, r, dp, seed=0, shuffle=False, drop_last=False) for r in range(dp)]
    assert its[0].steps_per_epoch == 3
    per_rank = [list(it) for it in its]
    assert [len(b) for b in per_rank[0]] == [2, 2, 1]
    assert [len(b) for b in per_rank[3]] == [2, 2, 0]
    assert per_rank[3][-1].images.shape == (0, 3, 4, 4)
    assert its[0].local_batch_sizes == [1, 1, 1, 0]  # last global batch has 3 items
    got = torch.cat([b.question_ids for step in zip(*per_rank) for b in step])
    assert torch.equal(got, ds.batch(range(19)).question_ids)
    small = ShardedBatchIterator(SyntheticVQA(3, image_size=4), 8, 3, 4, 0, drop_last=False)
    assert [len(b) for b in small] == [0]
    assert len(list(its[0])) == 3  # the next `for` loop is a fresh pass


# ---------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_determinism():
    a = SyntheticVQA(10**12, image_size=16, question_len=6, vocab_size=20, num_answers=7, seed=5)
    b = SyntheticVQA(10**12, image_size=16, question_len=6, vocab_size=20, num_answers=7, seed=5)
    idx = [0, 3, 10**12 - 1]
    x, y = a.batch(idx), b.batch(list(reversed(idx)))
    assert x.images.shape == (3, 3, 16, 16) and x.question_ids.shape == (3, 6)
    assert _batches_equal(x, VQABatch(*(t.flip(0) for t in (y.images, y.question_ids, y.question_lens, y.answers))))
    assert x.images.dtype == torch.float32 and 0 <= float(x.images.min()) and float(x.images.max()) <= 1
    assert a.max_question_len == 6 and a.image_size == 16 and a.num_answers == len(a.answers_vocab) == 7
    assert len(a.vocab) == 20 and a.vocab.words[5] == "w05"
    other = SyntheticVQA(10**12, image_size=16, question_len=6, vocab_size=20, num_answers=7, seed=6)
    assert not torch.equal(other.batch(idx).images, x.images)


def test_synthetic_answers_are_function_of_inputs():
    ds = SyntheticVQA(2000, image_size=8, question_len=8, vocab_size=16, num_answers=13)
    b = ds.batch(range(len(ds)))
    ids, lens = b.question_ids, b.question_lens
    assert ((lens >= 2) & (lens <= 8)).all() and int(lens.min()) == 2 and int(lens.max()) == 8
    mask = torch.arange(8)[None] < lens[:, None]
    assert ((ids >= 3) & (ids < 16))[mask].all() and (ids[~mask] == PAD_ID).all()
    assert torch.equal(synthetic_answer(b.images, ids, 13), b.answers)
    # The answer depends on inputs only through (dominant colour, first token): same key -> same answer.
    key = b.images.mean(dim=(2, 3)).argmax(1) * 100 + ids[:, 0]
    answer_of = {}
    for k, a in zip(key.tolist(), b.answers.tolist()):
        assert answer_of.setdefault(k, a) == a
    assert len(set(b.answers.tolist())) == 13
    counts = torch.bincount(b.answers, minlength=13)
    assert ds.majority_baseline() == pytest.approx(float(counts.max()) / len(ds))
