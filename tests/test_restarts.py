"""Fault tolerance under torchrun's elastic agent: one rank of a 2-rank job is SIGKILLed after a
checkpoint exists, the agent (launch/train.sh with MAX_RESTARTS=2) restarts the worker group, and
training resumes from checkpoints/latest to the uninterrupted run's final loss."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.conftest import ROOT
from tests.launch import descendants, kill_tree, sets, summary, wait_gone
from tests.test_multinode import script_env

TINY = str(ROOT / "launch/configs/tiny-vqa.yaml")
STEPS, INTERVAL, BATCH = 40, 8, 32


def small(output_dir: Path) -> list[str]:
    return sets(train__output_dir=output_dir, train__max_steps=STEPS,
                train__checkpoint_interval=INTERVAL, train__progress="false",
                train__eval_at_end="false", data__max_train_items=4096,
                data__global_batch_size=BATCH, model__num_layers=1)


def start(output_dir: Path, max_restarts: int) -> tuple[subprocess.Popen, Path]:
    log = output_dir.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", str(ROOT / "launch/train.sh"), *small(output_dir)],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env=script_env(NNODES=1, NPROC_PER_NODE=2, CONFIG=TINY,
                                               MAX_RESTARTS=max_restarts))
    return proc, log


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=60)
    assert code == 0, f"exit {code}\n{log.read_text()[-6000:]}"


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def find_rank(agent: int, rank: int, restart: int = 0, timeout: float = 60) -> int:
    """The pid of global `rank` of the agent's `restart`-th worker group (from its environment:
    torchrun's ranks are separate sessions under the agent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(agent):
            e = _environ(pid)
            if e.get("RANK") == str(rank) and e.get("TORCHELASTIC_RESTART_COUNT") == str(restart):
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} (restart {restart}) under agent {agent}")


def test_killed_rank_is_restarted_and_resumes_to_the_same_loss(tmp_path):
    straight = tmp_path / "straight"
    finish(*start(straight, max_restarts=0))

    resumed = tmp_path / "resumed"
    proc, log = start(resumed, max_restarts=2)  # train.sh execs torchrun: proc.pid is the agent
    victim = find_rank(proc.pid, rank=1)
    latest = resumed / "checkpoints/latest"
    deadline = time.monotonic() + 180
    while not latest.exists():
        assert proc.poll() is None, f"training ended before a checkpoint\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    kill_tree(victim)  # rank 1 only (and anything under it); the agent and rank 0 live on
    wait_gone([victim])
    assert proc.poll() is None, "the agent died with its rank"
    find_rank(proc.pid, rank=1, restart=1, timeout=120)  # the agent restarted the group
    finish(proc, log)

    r, s = summary(resumed), summary(straight)
    assert r["resumed_from_step"] is not None and INTERVAL <= r["resumed_from_step"] < STEPS
    assert r["resumed_from_step"] % INTERVAL == 0
    assert r["steps"] == STEPS and s["resumed_from_step"] is None
    assert r["final_loss"] == s["final_loss"]  # bit-identical continuation

    # The checkpoint it resumed from records the expert placement and the data position.
    meta = json.loads((resumed / f"checkpoints/step_{r['resumed_from_step']:06d}/meta.json")
                      .read_text())
    assert meta["step"] == r["resumed_from_step"] and meta["world_size"] == 2
    assert meta["data"] == {"epoch": 0, "batch_in_epoch": meta["step"], "seed": 1234,
                            "global_batch_size": BATCH}  # 4096 items: 128 batches an epoch
    assert len(meta["placements"]) == 1  # one MoE layer
    per_rank = meta["placements"][0]["experts_per_rank"]
    assert len(per_rank) == 2 and sorted(e for rank in per_rank for e in rank) == list(range(32))
    assert meta["placements"] == r["placements"]
