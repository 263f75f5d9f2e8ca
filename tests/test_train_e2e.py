"""The train and infer entry points as a user runs them: torchrun, real ranks, files on disk."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.launch import (check, descendants, env, kill_tree, run, sets, summary, torchrun_cmd,
                          wait_gone)

TINY = str(ROOT / "launch/configs/tiny-vqa.yaml")
SUMMARY_KEYS = {"eval_accuracy", "majority_baseline", "final_loss", "steps", "tokens_per_s",
                "world_size", "ep_size", "seconds"}


def small(output_dir, **extra) -> list[str]:
    """The tiny model on a slice of easy-vqa, a few steps."""
    fields = dict(train__output_dir=output_dir, train__max_steps=24, train__checkpoint_interval=8,
                  train__progress="false", data__max_train_items=4096, data__max_eval_items=512,
                  data__global_batch_size=32, model__num_layers=1)
    fields.update(extra)
    return ["--config", TINY, *sets(**fields)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    check(run(torchrun_cmd("epruntime.train", 2, *small(out))))
    return out


def test_train_writes_summary_and_checkpoints(trained):
    s = summary(trained)
    assert SUMMARY_KEYS <= s.keys()
    assert s["steps"] == 24 and s["world_size"] == 2 and s["ep_size"] == 2
    assert s["tokens_per_s"] > 0 and s["final_loss"] > 0
    assert 0 <= s["eval_accuracy"] <= 1 and 0.3 < s["majority_baseline"] < 0.45
    ckpts = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_000008", "step_000016", "step_000024"]
    assert (trained / "checkpoints/latest").read_text() == "step_000024"


@pytest.mark.parametrize("nproc, ep", [(1, 1), (2, 2)])
def test_infer_reproduces_train_eval_at_any_ep(trained, tmp_path, nproc, ep):
    """A checkpoint written at EP=2 loads at EP=1 and EP=2 and gives the training run's eval."""
    out = tmp_path / "infer"
    args = ["--checkpoint", str(trained), *sets(infer__output_dir=out, parallel__ep_size=ep)]
    check(run(torchrun_cmd("epruntime.infer", nproc, *args)))
    s, t = summary(out), summary(trained)
    assert {"eval_accuracy", "majority_baseline", "steps", "tokens_per_s", "world_size",
            "ep_size", "seconds"} <= s.keys()
    assert s["ep_size"] == ep and s["steps"] == 24
    assert s["eval_accuracy"] == t["eval_accuracy"]
    assert s["eval_loss"] == pytest.approx(t["eval_loss"], rel=1e-5)


def test_killed_run_resumes_to_the_same_final_loss(tmp_path):
    straight = tmp_path / "straight"
    check(run(torchrun_cmd("epruntime.train", 2, *small(straight, train__max_steps=40))))

    resumed = tmp_path / "resumed"
    cmd = torchrun_cmd("epruntime.train", 2, *small(resumed, train__max_steps=40))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = resumed / "checkpoints/latest"
    deadline = time.monotonic() + 300
    while not (latest.exists() and latest.read_text() >= "step_000008"):
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    ranks = descendants(proc.pid)
    kill_tree(proc.pid)  # the launcher and both ranks, mid-training
    proc.wait(timeout=60)
    assert ranks, "torchrun had started no ranks"
    wait_gone(ranks)
    assert not (resumed / "summary.json").exists()

    check(run(cmd))
    r, s = summary(resumed), summary(straight)
    assert r["resumed_from_step"] is not None and 8 <= r["resumed_from_step"] < 40
    assert r["steps"] == 40
    assert r["final_loss"] == s["final_loss"]  # bit-identical continuation


def _user_error(proc, *needles):
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("args, needles", [
    (["--set", "model.hidden_sise=64"], ["model.hidden_sise: unknown key"]),
    (["--set", "train.max_steps=abc"], ["train.max_steps", "integer"]),
    (["--set", "parallel.ep_size=3"], ["parallel.ep_size=3 does not divide model.num_experts=32"]),
    (["--set", "oops"], ["KEY=VALUE"]),
])
def test_bad_config_exits_with_named_error(tmp_path, args, needles):
    proc = run([sys.executable, "-m", "epruntime.train", "--config", TINY, *args,
                "--set", f"train.output_dir={tmp_path}"], timeout=120)
    _user_error(proc, *needles)
    assert not any(tmp_path.iterdir())  # nothing written


def test_ep_size_that_does_not_fit_the_world(tmp_path):
    """Two ranks, EP=4: every rank stops before creating a process group."""
    proc = run([sys.executable, "-m", "epruntime.train", "--config", TINY,
                "--set", "parallel.ep_size=4", "--set", f"train.output_dir={tmp_path}"],
               timeout=120, extra_env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    _user_error(proc, "parallel.ep_size=4 does not divide the world size 2")


def test_missing_checkpoint(tmp_path):
    proc = run([sys.executable, "-m", "epruntime.infer", "--checkpoint", str(tmp_path / "none")], timeout=120)
    _user_error(proc, "no checkpoint there")


def test_checkpoint_of_another_model(trained, tmp_path):
    proc = run([sys.executable, "-m", "epruntime.infer", "--checkpoint", str(trained),
                "--set", "model.hidden_size=32", "--set", f"infer.output_dir={tmp_path}"], timeout=120)
    _user_error(proc, "model.hidden_size: checkpoint 64 vs config 32")
