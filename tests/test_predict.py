"""Batch predictions (`epruntime.infer --data`) and the in-process Predictor, on a checkpoint
trained on the user-data path: the same predictions at EP=1, 2 and 4, one line per input in
input order, a pruned run (FastMMoE) in the same format, and the Predictor agreeing with the
batch run. Real torchrun ranks over gloo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epruntime.predict import occlude
from tests import launch
from tests.launch import check, run, sets, summary, torchrun_cmd
from tests.test_user_data import write_colour_data

MODEL = dict(model__hidden_size=32, model__num_layers=2, model__num_attention_heads=2,
             model__num_experts=8, model__moe_topk=3, model__moe_ffn_hidden_size=16,
             model__image_size=16, model__patch_size=4, parallel__timeout_s=120)
KEYS = {"id", "answer", "probability", "reference"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained at EP=2 on coloured squares, and a prediction file whose lines have
    ids, some without answers, some with words the training split never had."""
    root = tmp_path_factory.mktemp("colours")
    train, test = write_colour_data(root, n_train=32, n_test=12)
    out = root / "run"
    args = ["--set", "data.dataset=jsonl", "--set", f"data.train_jsonl={train}",
            "--set", f"data.eval_jsonl={test}",
            *sets(**MODEL, parallel__ep_size=2, data__global_batch_size=8, train__max_steps=12,
                  train__checkpoint_interval=12, train__output_dir=out, train__progress="false",
                  data__eval_batch_size=8)]
    check(run(torchrun_cmd("epruntime.train", 2, *args)))
    lines = [json.loads(x) for x in test.read_text().splitlines()]
    ask = []
    for i, line in enumerate(lines + lines[:3]):  # 15 inputs: not a multiple of any batch
        line = {**line, "id": f"q{i}"}
        if i % 4 == 1:
            del line["answer"]
        if i == 2:
            line["question"] = "is the big square red?"  # "big" is unknown: <unk>
        ask.append(line)
    data = root / "ask.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in ask))
    return out, data, ask


def _predict(trained, tmp_path, nproc: int, *extra: str) -> tuple[list[dict], dict]:
    out_dir, data, _ = trained
    out = tmp_path / f"infer{nproc}"
    check(run(torchrun_cmd("epruntime.infer", nproc, "--checkpoint", str(out_dir),
                           "--data", str(data), *sets(infer__output_dir=out,
                                                      parallel__ep_size=nproc), *extra)))
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    return lines, summary(out)


def _check_format(lines: list[dict], ask: list[dict], answers: set[str]) -> None:
    assert [x["id"] for x in lines] == [a["id"] for a in ask]  # count and order of the inputs
    for line, a in zip(lines, ask):
        assert set(line) == (KEYS if "answer" in a else KEYS - {"reference"})
        assert line.get("reference") == a.get("answer")
        assert line["answer"] in answers and 0 < line["probability"] <= 1


def test_predictions_are_identical_at_ep_1_2_and_4(trained, tmp_path):
    _, _, ask = trained
    runs = {ep: _predict(trained, tmp_path, ep) for ep in (1, 2, 4)}
    answers = {"blue", "green", "no", "red", "yes"}
    lines1, s1 = runs[1]
    _check_format(lines1, ask, answers)
    for ep in (2, 4):
        lines, s = runs[ep]
        assert [(x["id"], x["answer"], x.get("reference")) for x in lines] == \
            [(x["id"], x["answer"], x.get("reference")) for x in lines1]
        for a, b in zip(lines, lines1):  # rounded to 6 places; float sums may differ by an ulp
            assert a["probability"] == pytest.approx(b["probability"], abs=2e-6)
        assert s["eval_accuracy"] == s1["eval_accuracy"] and s["ep_size"] == ep
    answered = [x for x in lines1 if "reference" in x]
    assert s1["answered_items"] == len(answered) == 11 and s1["items"] == len(ask) == 15
    assert s1["eval_accuracy"] == pytest.approx(
        sum(x["answer"] == x["reference"] for x in answered) / len(answered))
    assert Path(s1["predictions"]).name == "predictions.jsonl"
    # the vocabulary the predictions decoded with is the one saved with the checkpoint
    step = trained[0] / "checkpoints" / "step_000012"
    vocab = json.loads((step / "meta.json").read_text())["extra"]["data_vocab"]
    assert vocab["answers"] == sorted(answers) and vocab["words"][:3] == ["<pad>", "<unk>",
                                                                         "<image>"]
    assert "big" not in vocab["words"] and vocab["max_question_len"] == 6


def test_a_pruned_run_writes_the_same_format(trained, tmp_path):
    _, _, ask = trained
    lines, s = _predict(trained, tmp_path, 2, *sets(fastmmoe__enabled="true",
                                                    fastmmoe__policy="fastmmoe",
                                                    fastmmoe__retention=0.5,
                                                    fastmmoe__vision_topk=2))
    _check_format(lines, ask, {"blue", "green", "no", "red", "yes"})
    assert s["vision_tokens"] == 16 and s["vision_tokens_kept"] == 8
    assert s["flops_ratio"] < 1


def test_predictor_in_process_matches_the_batch_run(trained, tmp_path):
    out_dir, data, ask = trained
    lines, _ = _predict(trained, tmp_path, 1)
    # A fresh interpreter: the Predictor creates (and closes) a world of one there.
    script = f"""
import json
from PIL import Image
from epruntime.predict import Predictor
ask = [json.loads(x) for x in open({str(data)!r})]
root = {str(data.parent)!r}
images = [root + "/" + a["image"] for a in ask]
images[1] = Image.open(images[1])  # a PIL image works as well as a path
with Predictor({str(out_dir)!r}, batch_size=4) as p:
    out = p(images, [a["question"] for a in ask])
    print(json.dumps([[x.answer, x.probability] for x in out]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=launch.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [a for a, _ in got] == [x["answer"] for x in lines]
    for (_, p), x in zip(got, lines):
        assert p == pytest.approx(x["probability"], abs=2e-6)


def test_occlusion_depends_only_on_the_row():
    images = torch.rand(3, 3, 16, 16)
    a = occlude(images, torch.tensor([5, 6, 7]), 0.25, 4, seed=1)
    b = occlude(images[1:2], torch.tensor([6]), 0.25, 4, seed=1)
    assert torch.equal(a[1], b[0])  # same row, same patches, whatever the batch
    changed = (a != images).any(dim=1)  # [B, H, W]
    for i in range(3):
        patches = changed[i].reshape(4, 4, 4, 4).any(dim=(1, 3))
        assert int(patches.sum()) == 4  # 25% of 16 patches
        mean = images[i].mean(dim=(1, 2))
        y, x = patches.nonzero()[0].tolist()
        torch.testing.assert_close(a[i, :, y * 4, x * 4], mean)
    assert not torch.equal(a[0], occlude(images, torch.tensor([5, 6, 7]), 0.25, 4, seed=2)[0])
    assert torch.equal(occlude(images, torch.tensor([0, 1, 2]), 0.0, 4, seed=1), images)


def test_random_policy_keeps_a_seeded_sorted_subset():
    from epruntime.config import load_config
    from epruntime.fastmmoe.policies import Observation, RandomPolicy, build_policy

    obs = Observation(10, torch.ones(3, 14, dtype=torch.bool))
    keep = RandomPolicy(0).select(obs, 4).keep_BK
    assert keep.shape == (3, 4)
    for row in keep.tolist():
        assert row == sorted(set(row)) and all(0 <= t < 10 for t in row)
    assert torch.equal(keep, RandomPolicy(0).select(obs, 4).keep_BK)
    assert not torch.equal(keep, RandomPolicy(1).select(obs, 4).keep_BK)
    assert RandomPolicy(0).select(obs, 0).keep_BK.shape == (3, 0)
    assert isinstance(build_policy("random"), RandomPolicy)
    assert load_config(None, ["fastmmoe.policy=random"]).fastmmoe.policy == "random"
