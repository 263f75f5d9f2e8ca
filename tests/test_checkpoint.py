"""Checkpoints on torch.distributed.checkpoint, with real gloo ranks and the real entry points:

- trained at EP=4 and saved, the checkpoint loads at EP=2 and EP=1 (four ranks), at EP=1 on one
  rank, and under a shuffled placement at EP=4, with the same eval accuracy and next-step loss;
- each rank reads its own experts and the dense tensors, never another rank's experts;
- a flipped byte, a truncated shard and a deleted shard are each a named error (exit 2) naming the
  file, and the previous checkpoint still resumes;
- a rank SIGKILLed during an asynchronous save is restarted by torchrun, training resumes from
  the previous checkpoint and ends at the uninterrupted run's loss, bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import configs
from tests.conftest import ROOT
from tests.dist import spawn
from tests.launch import check, kill_tree, run, sets, summary
from tests.test_multinode import script_env

GB = configs.GLOBAL_BATCH
TRAIN_STEPS = 3  # checkpoints at steps 2 and 3
SHUFFLE = [[5, 2], [7, 0], [1, 6], [3, 4]]  # EP=4, 8 experts: every expert leaves its rank
_EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.")
# SMoES state travels (EMA counts, bins, Gaussian statistics); its bin losses are off because
# their value depends on the number of bins, i.e. on the EP size the checkpoint is loaded at.
OVERRIDES = ["dispatch.kind=dedup", "smoes.enabled=true", "smoes.score=gaussian",
             "smoes.mi_coeff=0", "smoes.bal_coeff=0",
             "train.warmup_steps=1", "data.synthetic_items=256", "data.max_eval_items=64"]


def config_args(ep: int, out: Path) -> list[str]:
    return [*configs.SMALL, *OVERRIDES, f"parallel.ep_size={ep}", f"train.output_dir={out}"]


def _cfg(ep: int, out: str):
    return configs.small_config(*config_args(ep, Path(out))[len(configs.SMALL):])


def _build(cfg, env):
    from epruntime.data import ShardedBatchIterator
    from epruntime.datasets import build_datasets
    from epruntime.engine import Engine

    train_ds, eval_ds = build_datasets(cfg)
    engine = Engine(cfg, env, len(train_ds.vocab), train_ds.num_answers, train_ds.max_question_len)
    batches = ShardedBatchIterator(train_ds, GB, env.dp_rank, env.dp_size, seed=cfg.train.seed)
    return engine, batches, eval_ds


def _probe(engine, batches, eval_ds, step: int) -> dict:
    """Eval accuracy, then the next two training steps' losses (the second after an update that
    uses the restored AdamW state)."""
    figures = engine.evaluate(eval_ds, per_item=True)
    acc, hits = figures["eval_accuracy"], figures["hits"]
    # per item: every item once, over all DP ranks (the padding repeats not counted)
    assert len(hits) == len(eval_ds) and set(hits) <= {0, 1}
    assert sum(hits) == round(acc * len(eval_ds))
    losses = []
    for s in (step, step + 1):
        losses.append(engine.train_step(next(batches), s).loss)
    return {"acc": acc, "losses": losses}


def _stats(path: Path, stats, engine) -> dict:
    """What a rank read (bytes counted at the shard files, per key) against what it holds."""
    from epruntime.checkpoint.storage import read_dcp_metadata

    length = {idx.fqn: info.length for idx, info in read_dcp_metadata(path).storage_data.items()}
    read = stats.bytes_by_key
    own = sorted((layer, e) for layer, p in enumerate(engine.model.placements)
                 for e in range(p.num_experts) if p.rank_of_expert[e] == engine.env.ep_rank)
    return {"bytes_read": stats.bytes_read, "keys": list(stats.keys), "keys_read": sorted(read),
            "experts_read": sorted({(int(m[1]), int(m[2])) for k in read
                                    if (m := _EXPERT.search(k))}),
            "own": own, "stored_bytes_asked": sum(length[k] for k in stats.keys),
            "expert_bytes_read": sum(n for k, n in read.items() if _EXPERT.search(k)),
            "dense_bytes_read": sum(n for k, n in read.items()
                                    if k.startswith("model/") and not _EXPERT.search(k))}


def _ep4_worker(rank: int, out: str) -> None:
    from epruntime import checkpoint, distributed
    from epruntime.placement import Placement

    cfg = _cfg(4, f"{out}/run")
    env = distributed.init_distributed(cfg)
    engine, batches, eval_ds = _build(cfg, env)
    for step in range(TRAIN_STEPS):
        engine.train_step(next(batches), step)
        if step + 1 >= 2:
            path = checkpoint.save_checkpoint(engine, step + 1, batches.state_dict())
    buffers = {n: b.clone() for n, b in engine.model.global_named_buffers(env.ep_rank)}
    results = {"ref": _probe(engine, batches, eval_ds, TRAIN_STEPS)}

    # the same layout: RNG comes back too
    fresh, fresh_batches, _ = _build(cfg, env)
    meta, stats = checkpoint.load_checkpoint_with_stats(fresh, path)
    fresh_batches.load_state_dict(meta["data"])
    restored = dict(fresh.model.global_named_buffers(env.ep_rank))
    results["buffers_equal"] = all(torch.equal(restored[n], b) for n, b in buffers.items())
    results["same_stats"] = _stats(path, stats, fresh)
    results["same"] = _probe(fresh, fresh_batches, eval_ds, TRAIN_STEPS)

    # a shuffled placement: every expert on another rank than where it was saved
    moved, moved_batches, _ = _build(cfg, env)
    shuffled = Placement.from_rank_lists(SHUFFLE)
    moved.model.set_placements([shuffled] * cfg.model.num_layers)
    meta, stats = checkpoint.load_checkpoint_with_stats(moved, path, apply_saved_placements=False)
    moved_batches.load_state_dict(meta["data"])
    results["shuffled_placement"] = [p.to_dict() for p in moved.model.placements]
    results["shuffled_stats"] = _stats(path, stats, moved)
    results["shuffled"] = _probe(moved, moved_batches, eval_ds, TRAIN_STEPS)

    # EP=2 and EP=1 on the same four ranks (megatron-core's groups rebuilt)
    from megatron.core import parallel_state as ps

    for ep in (2, 1):
        ps.destroy_model_parallel()
        cfg_ep = _cfg(ep, f"{out}/run")
        env_ep = distributed.init_distributed(cfg_ep)
        other, other_batches, _ = _build(cfg_ep, env_ep)
        meta, stats = checkpoint.load_checkpoint_with_stats(other, path)
        other_batches.load_state_dict(meta["data"])
        results[f"ep{ep}_stats"] = _stats(path, stats, other)
        results[f"ep{ep}"] = _probe(other, other_batches, eval_ds, TRAIN_STEPS)
    torch.save(results, f"{out}/rank{rank}.pt")


def _world1_worker(rank: int, out: str, path: str) -> None:
    from epruntime import checkpoint, distributed

    cfg = _cfg(1, f"{out}/run1")
    env = distributed.init_distributed(cfg)
    engine, batches, eval_ds = _build(cfg, env)
    meta = checkpoint.load_checkpoint(engine, Path(path))
    batches.load_state_dict(meta["data"])
    torch.save(_probe(engine, batches, eval_ds, TRAIN_STEPS), f"{out}/world1.pt")


@pytest.fixture(scope="module")
def ep4(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep4")
    spawn(_ep4_worker, 4, str(out))
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(4)]


def test_same_layout_resumes_bit_for_bit(ep4):
    _, ranks = ep4
    for r in ranks:
        assert r["buffers_equal"]  # SMoES counts and Gaussian statistics travel
        assert r["same"] == r["ref"]


@pytest.mark.parametrize("variant", ["shuffled", "ep2", "ep1"])
def test_other_ep_sizes_and_placements_give_the_same_accuracy_and_loss(ep4, variant):
    _, ranks = ep4
    for r in ranks:
        assert r[variant]["acc"] == r["ref"]["acc"]
        # the same math summed in another order: equal to float32 rounding
        assert r[variant]["losses"] == pytest.approx(r["ref"]["losses"], rel=1e-5)
    if variant == "shuffled":
        assert ranks[0]["shuffled_placement"][0]["experts_per_rank"] == SHUFFLE


def test_one_rank_loads_the_ep4_checkpoint(ep4):
    out, ranks = ep4
    path = out / f"run/checkpoints/step_{TRAIN_STEPS:06d}"
    spawn(_world1_worker, 1, str(out), str(path))
    r = torch.load(out / "world1.pt", weights_only=True)
    assert r["acc"] == ranks[0]["ref"]["acc"]
    # the next step's loss; the step after differs by design (aux losses are per micro-batch)
    assert r["losses"][0] == pytest.approx(ranks[0]["ref"]["losses"][0], rel=1e-5)


@pytest.mark.parametrize("variant", ["same", "shuffled"])
def test_each_rank_reads_its_own_experts_and_the_dense_tensors(ep4, variant):
    """Bytes are counted where the shard files are read, per key."""
    _, ranks = ep4
    for r in ranks:
        s = r[f"{variant}_stats"]
        assert s["experts_read"] == s["own"] and len(s["own"]) == 2 * 2  # 2 layers x 2 experts
        assert s["keys_read"] == s["keys"]  # exactly the keys it holds, nothing else
        assert s["bytes_read"] >= s["stored_bytes_asked"] > 0
        assert s["dense_bytes_read"] == ranks[0][f"{variant}_stats"]["dense_bytes_read"] > 0
    # EP=1 (four ranks): every rank reads every expert; at EP=4 the four ranks' reads add up to
    # that once, at EP=2 (each expert on two ranks) twice
    every_expert = ranks[0]["ep1_stats"]["expert_bytes_read"]
    assert all(r["ep1_stats"]["expert_bytes_read"] == every_expert for r in ranks)
    assert sum(r[f"{variant}_stats"]["expert_bytes_read"] for r in ranks) == every_expert
    assert sum(r["ep2_stats"]["expert_bytes_read"] for r in ranks) == 2 * every_expert
    for r in ranks:
        assert r["ep2_stats"]["experts_read"] == r["ep2_stats"]["own"]
        assert r[f"{variant}_stats"]["bytes_read"] < r["ep1_stats"]["bytes_read"]


# ----------------------------------------------------------------------------- corruption drill

def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "epruntime.train",
            *[a for o in config_args(1, out) for a in ("--set", o)],
            *sets(train__max_steps=TRAIN_STEPS + 1, train__progress="false",
                  train__eval_at_end="false"), *extra]


def _largest_expert_tensor(step_dir: Path) -> tuple[str, Path, int, int]:
    from epruntime.checkpoint.storage import read_dcp_metadata

    md = read_dcp_metadata(step_dir)
    idx, info = max(((i, s) for i, s in md.storage_data.items()
                     if i.fqn.startswith("model/") and _EXPERT.search(i.fqn)),
                    key=lambda x: x[1].length)
    return idx.fqn, step_dir / info.relative_path, info.offset, info.length


def test_corruption_drill(ep4, tmp_path):
    src, _ = ep4
    step = f"step_{TRAIN_STEPS:06d}"
    cases = {}
    for what in ("flip", "truncate", "delete"):
        out = tmp_path / what
        shutil.copytree(src / "run", out)
        cases[what] = out
    shards = sorted(p.name for p in (src / f"run/checkpoints/{step}").glob("*.distcp"))
    assert len(shards) == 4  # one per rank

    key, shard, offset, length = _largest_expert_tensor(cases["flip"] / f"checkpoints/{step}")
    data = bytearray(shard.read_bytes())
    data[offset + length // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    truncated = cases["truncate"] / f"checkpoints/{step}" / shards[1]
    size = truncated.stat().st_size
    with open(truncated, "r+b") as f:
        f.truncate(size - 100)
    deleted = cases["delete"] / f"checkpoints/{step}" / shards[2]
    deleted.unlink()

    expected = {
        "flip": f"epruntime.train: error: {shard}: tensor {key} fails its checksum (crc32 ",
        "truncate": f"epruntime.train: error: {cases['truncate']}/checkpoints/{step} is damaged "
                    f"({truncated}: shard file truncated: {size - 100} bytes, meta.json records "
                    f"{size}; restore it or resume from another checkpoint) and newer than any "
                    "complete checkpoint; resuming would train over it: move it away to resume "
                    "from step_000002, or choose another train.output_dir",
        "delete": f"epruntime.train: error: {cases['delete']}/checkpoints/{step} is damaged "
                  f"({deleted}: shard file missing (meta.json lists it with ",
    }
    for what, out in cases.items():
        before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
        proc = run(_train_cmd(out), timeout=300)
        assert proc.returncode == 2, f"{what}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("epruntime.train: error")]
        assert len(lines) == 1 and lines[0].startswith(expected[what]), (what, proc.stderr[-3000:])
        assert not (out / "summary.json").exists()  # stopped before any training step
        after = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
        assert after == before, f"{what}: the run changed a checkpoint"

    # the previous checkpoint is intact: with the damaged one moved away, training resumes from it
    out = cases["flip"]
    (out / f"checkpoints/{step}").rename(out / f"damaged-{step}")
    check(run(_train_cmd(out, *sets(train__max_steps=TRAIN_STEPS)), timeout=300))
    assert summary(out)["resumed_from_step"] == 2


def test_foreign_metadata_and_format_version_are_named(ep4, tmp_path):
    from epruntime import checkpoint

    src, _ = ep4
    out = tmp_path / "run"
    shutil.copytree(src / "run", out)
    new, old = out / f"checkpoints/step_{TRAIN_STEPS:06d}", out / "checkpoints/step_000002"
    shutil.copy(old / ".metadata", new / ".metadata")  # DCP metadata of another checkpoint
    assert checkpoint.damage(new) == (f"{new}/.metadata: does not match meta.json (sha256 "
                                      "differs: metadata of another checkpoint or damaged); "
                                      "restore it or resume from another checkpoint")
    meta = json.loads((old / "meta.json").read_text())
    meta["format_version"] = 3
    (old / "meta.json").write_text(json.dumps(meta))
    assert checkpoint.damage(old).startswith(f"{old}/meta.json: format_version 3, this "
                                             "epruntime reads version 2")


# ----------------------------------------------------------------------------- async + SIGKILL

STEPS, INTERVAL = 12, 4


def _async_run(out: Path, fault: str | None) -> subprocess.Popen:
    log = out.with_suffix(".log")
    extra = {"EPRUNTIME_FAULT": fault} if fault else {}
    with open(log, "w") as f:
        return subprocess.Popen(
            ["bash", str(ROOT / "launch/train.sh"),
             *[a for o in config_args(2, out) for a in ("--set", o)],
             *sets(train__max_steps=STEPS, train__checkpoint_interval=INTERVAL,
                   train__async_checkpoint="true", train__progress="false",
                   train__eval_at_end="false")],
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            env=script_env(NNODES=1, NPROC_PER_NODE=2, MAX_RESTARTS=1 if fault else 0,
                           **extra))


def _finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        code = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=60)
    assert code == 0, f"exit {code}\n{log.read_text()[-6000:]}"


def test_rank_killed_during_async_save_resumes_from_the_previous_checkpoint(tmp_path):
    straight = tmp_path / "straight"
    _finish(_async_run(straight, None), straight.with_suffix(".log"))
    killed = tmp_path / "killed"
    # rank 1 dies once its shard of step 8 is on disk, before the checkpoint is committed
    _finish(_async_run(killed, "kill_in_save:rank=1:step=8"), killed.with_suffix(".log"))
    log = killed.with_suffix(".log").read_text()
    assert "EPRUNTIME_FAULT: injecting kill_in_save on rank 1 at step 8" in log
    assert f"removed {killed}/checkpoints/step_000008.tmp, an interrupted checkpoint save" in log, \
        log[-4000:]
    k, s = summary(killed), summary(straight)
    assert k["resumed_from_step"] == 4 and s["resumed_from_step"] is None
    assert k["steps"] == s["steps"] == STEPS
    assert k["final_loss"] == s["final_loss"]  # bit-identical continuation
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == ["latest", "step_000004", "step_000008", "step_000012"]
    assert (killed / "checkpoints/latest").read_text() == "step_000012"
