"""Bad configs, bad inputs and misbehaving ranks: each is one named error and a non-zero exit,
never a hang, a traceback or a damaged checkpoint.

- config cases run the real entry points (`python -m epruntime.train/infer`; they fail before any
  process group exists, so in about a second) against an output_dir holding a valid checkpoint,
  whose files must be byte-identical afterwards and still load;
- input cases call a small model built in this process at world size 1;
- a hung rank (EPRUNTIME_FAULT) under torchrun must end the job with the timeout message.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.launch import descendants, env, kill_tree, run, sets, torchrun_cmd, wait_gone

TINY = str(ROOT / "launch/configs/tiny-vqa.yaml")
VOCAB, ANSWERS, QLEN = 30, 13, 10  # the in-process model's text vocabulary, answers, question len
CLI_TIMEOUT = 120


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def good_batch(b: int = 2):
    from epruntime.data import VQABatch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (b, QLEN), generator=g)
    return VQABatch(images=torch.rand(b, 3, 64, 64, generator=g), question_ids=ids,
                    question_lens=torch.full((b,), QLEN // 2), answers=torch.arange(b) % ANSWERS)


@pytest.fixture(scope="module")
def world1(tmp_path_factory):
    """A world-size-1 process group in this process, an Engine of the tiny model (one layer) and a
    valid checkpoint of it (one training step) under `output_dir`."""
    from epruntime import checkpoint, distributed
    from epruntime.config import load_config
    from epruntime.engine import Engine

    out = tmp_path_factory.mktemp("ckpt")
    mp = pytest.MonkeyPatch()
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(distributed.free_port())).items():
        mp.setenv(key, value)
    mp.setattr(distributed, "_failure_context", None)  # restored on teardown
    cfg = load_config(TINY, ["parallel.ep_size=1", "model.num_layers=1", "parallel.timeout_s=60",
                             f"train.output_dir={out}", "data.global_batch_size=2"])
    env_ = distributed.init_distributed(cfg)
    try:
        engine = Engine(cfg, env_, VOCAB, ANSWERS, QLEN)
        engine.train_step(good_batch(), 0)
        checkpoint.save_checkpoint(engine, 1, {"note": "test"})
        yield engine, out, tree_hashes(out)
    finally:
        distributed.shutdown()
        mp.undo()


def _assert_unharmed(world1) -> None:
    _, out, hashes = world1
    assert tree_hashes(out) == hashes, "the checkpoint directory changed"
    assert (out / "checkpoints/latest").read_text() == "step_000001"


# ----------------------------------------------------------------------------- config and CLI

BASE = ["--config", TINY, "--set", "parallel.ep_size=1", "--set", "model.num_layers=1",
        "--set", "train.progress=false", "--set", "data.max_train_items=64",
        "--set", "data.max_eval_items=32", "--set", "data.global_batch_size=8"]

# (id, entry point, arguments after BASE / the checkpoint, extra environment, expected text)
CONFIG_CASES = [
    ("unknown-key", "train", ["--set", "model.hidden_sise=64"], {},
     "model.hidden_sise: unknown key"),
    ("unknown-section", "train", ["--set", "bogus.x=1"], {}, "bogus: unknown key"),
    ("wrong-type", "train", ["--set", "train.max_steps=abc"], {},
     "train.max_steps: Input should be a valid integer"),
    ("negative-lr", "train", ["--set", "train.lr=-0.1"], {},
     "train.lr: Input should be greater than 0"),
    ("ep-not-dividing-experts", "train", ["--set", "parallel.ep_size=3"], {},
     "parallel.ep_size=3 does not divide model.num_experts=32"),
    ("ep-not-dividing-world", "train", ["--set", "parallel.ep_size=2"], {},
     "parallel.ep_size=2 does not divide the world size 1"),
    ("batch-not-dividing-dp", "train", ["--set", "data.global_batch_size=6"],
     {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"},
     "data.global_batch_size=6 is not divisible by the data-parallel size 4"),
    ("bins-without-smoes", "train",
     ["--set", "dispatch.kind=dedup", "--set", "dispatch.placement=bins"], {},
     "dispatch.placement=bins needs smoes.enabled=true"),
    ("alltoall-with-bins", "train",
     ["--set", "smoes.enabled=true", "--set", "dispatch.placement=bins"], {},
     "dispatch.placement=bins needs dispatch.kind=dedup or dedup-hier"),
    ("ranks-per-node-not-dividing-ep", "train",
     ["--set", "parallel.ep_size=4", "--set", "dispatch.ranks_per_node=3"],
     {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"},
     "3 ranks per node (dispatch.ranks_per_node or torchrun's LOCAL_WORLD_SIZE) does not divide "
     "parallel.ep_size=4"),
    ("bad-set-syntax", "train", ["--set", "oops"], {},
     "--set expects KEY=VALUE with a dotted key, got 'oops'"),
    ("missing-config-file", "train", ["--config", "/nonexistent/cfg.yaml"], {},
     "--config /nonexistent/cfg.yaml: no such file"),
    ("metrics-port-out-of-range", "train", ["--set", "metrics.port=70000"], {},
     "metrics.port: Input should be less than 65536"),
    ("trace-sample-rate-zero", "train", ["--set", "trace.sample_rate=0"], {},
     "trace.sample_rate: Input should be greater than 0"),
    ("bad-fault-spec", "train", [], {"EPRUNTIME_FAULT": "hang:rank=one:step=3"},
     "EPRUNTIME_FAULT='hang:rank=one:step=3': rank='one' is not a number"),
    ("infer-missing-checkpoint", "infer", ["--checkpoint", "/nonexistent/run"], {},
     "--checkpoint /nonexistent/run: no checkpoint there"),
    ("infer-checkpoint-of-another-model", "infer", ["--set", "model.hidden_size=32"], {},
     "model.hidden_size: checkpoint 64 vs config 32"),
]


@pytest.mark.parametrize("entry, args, extra_env, expected",
                         [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_one_named_line(world1, tmp_path, entry, args, extra_env, expected):
    _, out, _ = world1
    if entry == "train":
        cmd = [sys.executable, "-m", "epruntime.train", *BASE, *sets(train__output_dir=out), *args]
    else:
        ckpt = [] if "--checkpoint" in args else ["--checkpoint", str(out)]
        cmd = [sys.executable, "-m", "epruntime.infer", *ckpt, *args,
               *sets(infer__output_dir=tmp_path / "infer")]
    proc = run(cmd, timeout=CLI_TIMEOUT, extra_env=extra_env)
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"epruntime.{entry}: error:" in proc.stderr and expected in proc.stderr, proc.stderr
    _assert_unharmed(world1)
    assert not (out / "summary.json").exists() and not (tmp_path / "infer").exists()


def test_resume_from_checkpoint_of_another_model(world1):
    """Needs a process group: a one-rank torchrun resuming from `output_dir` with another model."""
    _, out, _ = world1
    proc = run(torchrun_cmd("epruntime.train", 1, *BASE, *sets(train__output_dir=out,
                                                              model__hidden_size=32)),
               timeout=CLI_TIMEOUT)
    assert proc.returncode != 0
    assert "epruntime.train: error:" in proc.stderr and "was written for another model" in proc.stderr
    assert "model.hidden_size: checkpoint 64 vs config 32" in proc.stderr
    _assert_unharmed(world1)


# ----------------------------------------------------------------------------- model inputs

def _nan(b):
    b.images[1, 2, 3, 4] = float("nan")


def _inf(b):
    b.images[0, 0, 0, 0] = float("inf")


def _set(field, value):
    def edit(b):
        setattr(b, field, value(b))
    return edit


def _poke(field, index, value):
    def edit(b):
        getattr(b, field)[index] = value
    return edit


# (id, edit of a good batch of 2, expected text or texts)
INPUT_CASES = [
    ("image-size", _set("images", lambda b: torch.rand(2, 3, 32, 32)),
     "images has shape (2, 3, 32, 32) dtype torch.float32; expected [B, 3, 64, 64]"),
    ("image-channels", _set("images", lambda b: torch.rand(2, 1, 64, 64)),
     "images has shape (2, 1, 64, 64) dtype torch.float32; expected [B, 3, 64, 64]"),
    ("image-rank", _set("images", lambda b: torch.rand(3, 64, 64)),
     "images has shape (3, 64, 64) dtype torch.float32; expected [B, 3, 64, 64]"),
    ("image-dtype", _set("images", lambda b: b.images.double()),
     "images has shape (2, 3, 64, 64) dtype torch.float64; expected dtype torch.float32"),
    ("image-uint8", _set("images", lambda b: (b.images * 255).to(torch.uint8)),
     "dtype torch.uint8; expected dtype torch.float32"),
    ("image-nan", _nan, "images hold non-finite values (NaN or inf), first at index (1, 2, 3, 4)"),
    ("image-inf", _inf, "images hold non-finite values (NaN or inf), first at index (0, 0, 0, 0)"),
    ("question-ids-float", _set("question_ids", lambda b: b.question_ids.float()),
     "question_ids has shape (2, 10) dtype torch.float32; expected [B, 10] integer token ids"),
    ("question-too-wide", _set("question_ids", lambda b: torch.full((2, 12), 3)),
     "question_ids has shape (2, 12) dtype torch.int64; expected [B, 10] (questions padded to "
     "max_question_len=10)"),
    ("empty-question", _poke("question_lens", 1, 0),
     "question_lens[1] = 0: empty question"),
    ("question-too-long", _poke("question_lens", 0, 11),
     "question_lens[0] = 11 exceeds max_question_len=10"),
    ("token-id-too-large", _poke("question_ids", (1, 4), VOCAB),
     (f"question_ids holds token ids (text vocabulary size {VOCAB}) outside [0, {VOCAB}): min ",
      f"max {VOCAB} (first at index (1, 4), value {VOCAB})")),
    ("token-id-negative", _poke("question_ids", (0, 0), -1),
     f"question_ids holds token ids (text vocabulary size {VOCAB}) outside [0, {VOCAB}): min -1"),
    ("batch-size-mismatch", _set("question_ids", lambda b: torch.full((3, QLEN), 3)),
     "batch size differs between tensors: images 2, question_ids 3, question_lens 2"),
    ("lens-batch-mismatch", _set("question_lens", lambda b: torch.full((1,), 4)),
     "batch size differs between tensors: images 2, question_ids 2, question_lens 1"),
    ("answer-too-large", _poke("answers", 1, ANSWERS),
     f"answers holds labels ({ANSWERS} answers) outside [0, {ANSWERS}): min 0, max {ANSWERS}"),
    ("answer-negative", _poke("answers", 0, -3),
     f"answers holds labels ({ANSWERS} answers) outside [0, {ANSWERS}): min -3"),
    ("answers-batch-mismatch", _set("answers", lambda b: torch.zeros(5, dtype=torch.long)),
     "batch size differs between tensors: images 2, question_ids 2, question_lens 2, answers 5"),
]


@pytest.mark.parametrize("edit, expected", [c[1:] for c in INPUT_CASES],
                         ids=[c[0] for c in INPUT_CASES])
def test_bad_input_is_a_named_input_error(world1, edit, expected):
    from epruntime.model.vlm import InputError

    engine = world1[0]
    batch = good_batch()
    edit(batch)
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    with pytest.raises(InputError) as err:
        engine.local_loss(batch, 2)  # the training path: labels too, then the forward
    for needle in expected if isinstance(expected, tuple) else (expected,):
        assert needle in str(err.value), str(err.value)
    assert isinstance(err.value, ValueError)
    assert all(torch.equal(before[n], p) for n, p in engine.model.named_parameters())
    if "answers" not in expected:  # the forward alone (inference) rejects it as well
        with pytest.raises(InputError):
            engine.model(batch.images, batch.question_ids, batch.question_lens)


def test_good_batch_passes_and_checkpoint_still_loads(world1):
    from epruntime import checkpoint

    engine, out, _ = world1
    assert engine.local_loss(good_batch(), 2)[1].shape == (2, ANSWERS)
    path = checkpoint.latest_checkpoint(out)
    assert path is not None and path.name == "step_000001"
    assert checkpoint.load_checkpoint(engine, path)["step"] == 1
    _assert_unharmed(world1)


# ----------------------------------------------------------------------------- ranks

def test_ranks_with_different_code_are_a_named_error(tmp_path):
    from epruntime.distributed import source_hash
    from tests.dist import spawn
    from tests.test_distributed import _mismatch_worker

    spawn(_mismatch_worker, 2, str(tmp_path), "code")
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "ranks disagree on the config, epruntime version or code" in message
        assert "rank 0: config" in message and f"code {source_hash()[:12]}" in message
        assert "rank 1: config" in message and "code ffffffffffff" in message


def test_hung_rank_ends_the_job_with_the_timeout_message(tmp_path):
    """Rank 1 hangs before step 3: rank 0's collective times out after parallel.timeout_s=10 and
    the job ends non-zero with one line naming the timeout, instead of waiting forever."""
    args = ["--config", TINY, *sets(train__output_dir=tmp_path, parallel__timeout_s=10,
                                    train__progress="false", data__max_train_items=256,
                                    data__max_eval_items=32, data__global_batch_size=8,
                                    model__num_layers=1, train__max_steps=6,
                                    train__checkpoint_interval=100)]
    proc = subprocess.Popen(torchrun_cmd("epruntime.train", 2, *args), cwd=ROOT,
                            env={**env(), "EPRUNTIME_FAULT": "hang:rank=1:step=3"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    t0 = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:  # never leave a hung rank behind
            ranks = descendants(proc.pid)
            kill_tree(proc.pid)
            proc.wait(timeout=30)
            wait_gone(ranks)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "EPRUNTIME_FAULT: injecting hang on rank 1 at step 3" in stderr
    assert ("epruntime.train: error: a collective timed out after 10 s (parallel.timeout_s): "
            "rank 0") in stderr, stderr[-3000:]
    assert "exitcode: 3" in stderr  # torchrun reports rank 0's collective-failure exit code
    assert elapsed < 90, f"took {elapsed:.0f} s"
    assert not (tmp_path / "summary.json").exists()


def test_debug_checks_switch_removes_the_input_syncs(world1):
    """debug_checks=false skips the batch validation and its host syncs; the output is the same."""
    engine = world1[0]
    model = engine.model.eval()
    batch = good_batch()
    syncs = {"n": 0}
    original = torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.item

    def counting(fn):
        def wrapped(self, *a, **k):
            syncs["n"] += 1
            return fn(self, *a, **k)
        return wrapped

    counts = {}
    try:
        for check in (True, False):
            syncs["n"] = 0
            torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.item = map(counting, original)
            with torch.no_grad():
                out = model(batch.images, batch.question_ids, batch.question_lens, check=check)
            torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.item = original
            counts[check] = (syncs["n"], out)
    finally:
        torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.item = original
        model.train()
    assert counts[True][0] >= counts[False][0] + 4, counts  # min/max/isfinite of the inputs
    assert torch.equal(counts[True][1], counts[False][1])
