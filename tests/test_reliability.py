"""Nothing lost, nothing silent: every numbered case of the reliability issue, run through the
real entry points, asserting the exact line printed, the exit code, and that every checkpoint
that existed before the run is byte-identical afterwards (a failed run also leaves summary.json
alone and adds no step directory).

Each case starts from a copy of one trained run (1 rank, checkpoints at steps 5 and 10).
Exit codes: 0 done, 2 user error, 3 lost rank or timeout, 4 non-finite loss (README).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import ROOT
from tests.launch import check, descendants, env, kill_tree, run, sets, torchrun_cmd, wait_gone

TINY = str(ROOT / "launch/configs/tiny-vqa.yaml")
BASE = ["--config", TINY, *sets(parallel__ep_size=1, model__num_layers=1, train__progress="false",
                                data__max_train_items=64, data__max_eval_items=32,
                                data__global_batch_size=8, train__checkpoint_interval=5)]
TIMEOUT = 180


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def checkpoint_hashes(out: Path) -> dict[str, str]:
    """Every file of every complete step directory (the `latest` marker may be repaired, `.tmp`
    leftovers removed)."""
    return {k: v for k, v in file_hashes(out / "checkpoints").items()
            if k.startswith("step_") and ".tmp/" not in k}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    check(run([sys.executable, "-m", "epruntime.train", *BASE,
               *sets(train__output_dir=out, train__max_steps=10)], timeout=TIMEOUT))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["latest", "step_000005", "step_000010"]
    return out


def lr_at(step: int) -> float:
    from epruntime.config import load_config
    from epruntime.optim import lr_at as schedule

    return schedule(step, load_config(TINY, ["train.max_steps=14"]).train)


def nonfinite_line(step: int) -> str:
    from epruntime.config import load_config

    lr = load_config(TINY).train.lr  # the config's, as the message quotes it
    return (f"epruntime.train: error: step {step}: the loss is nan and the gradient norm is nan "
            f"(train.lr={lr:g}, lr at this step {lr_at(step):.3g}); stopped before the optimizer "
            "step, nothing was updated or saved; lower train.lr, check the data, or set "
            "train.skip_nonfinite_steps=N to skip up to N such steps")


@dataclass
class Case:
    """One run: `prepare(out, tmp)` edits the copied run and returns extra CLI arguments."""

    id: str
    args: list[str]
    code: int
    lines: list[str]  # exact lines of stderr; {out}, {ckpt}, {tmp} are filled in
    prepare: Callable[[Path, Path], list[str]] = lambda out, tmp: []
    env: dict[str, str] = field(default_factory=dict)
    after: Callable[[Path, Path], None] = lambda out, tmp: None
    launcher: str = "python"  # python: `python -m epruntime.train`; script: launch/train.sh


def _rm_latest(out, tmp):
    (out / "checkpoints/latest").unlink()
    return []


def _dangling_latest(out, tmp):
    (out / "checkpoints/latest").write_text("step_000099")
    return []


def _resumed_from_10(out, tmp):
    s = json.loads((out / "summary.json").read_text())
    assert s["resumed_from_step"] == 10 and s["steps"] == 12
    assert (out / "checkpoints/latest").read_text() == "step_000012"


def _yaml(text: str):
    def prepare(out, tmp):
        path = tmp / "cfg.yaml"
        path.write_text(text)
        return ["--config", str(path)]
    return prepare


def _skipped_one(out, tmp):
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped_steps"] == 1 and s["steps"] == 14
    assert s["final_loss"] == s["final_loss"] and s["final_loss"] < 10  # finite


def _empty_trace_refused(out, tmp):
    traces = sorted((out / "traces").glob("*"))
    assert traces, "no trace written"
    proc = run([sys.executable, "-m", "epruntime.simulate", "--trace", str(out / "traces")],
               timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the trace holds no tokens (recorded with trace.sample_rate=1e-09" in proc.stderr, \
        proc.stderr


def _summary_untouched(out, tmp):
    assert (out / "summary.json").read_bytes() == (tmp / "summary.before").read_bytes()


def _output_file(out, tmp):
    (tmp / "afile").write_text("not a directory")
    return sets(train__output_dir=tmp / "afile")


def _drop_world_size(out, tmp):
    meta_path = out / "checkpoints/step_000010/meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["world_size"]
    meta_path.write_text(json.dumps(meta))
    return []


def _leftover_tmp(out, tmp):
    junk = out / "checkpoints/step_000011.tmp"
    junk.mkdir()
    (junk / "__0_0.distcp").write_bytes(b"half")
    return []


def _no_leftover(out, tmp):
    assert not (out / "checkpoints/step_000011.tmp").exists()
    _resumed_from_10(out, tmp)


def _fresh_dir(out, tmp):
    return sets(train__output_dir=tmp / "fresh")


MISSING_META = ("{ckpt}/step_000010 is damaged ({ckpt}/step_000010/meta.json: missing field "
                "'world_size' (damaged or written by another tool); restore it or resume from "
                "another checkpoint) and newer than any complete checkpoint; resuming would train "
                "over it: move it away to resume from step_000005, or choose another "
                "train.output_dir")

CASES = [
    # 1. a lost or dangling `latest` never restarts from step 0
    Case("1-latest-deleted", sets(train__max_steps=12), 0,
         ["epruntime: warning: {ckpt}/latest was missing; it now names step_000010, the newest "
          "complete checkpoint (to go back to an older one, move the newer step directories "
          "away)"], prepare=_rm_latest, after=_resumed_from_10),
    Case("1-latest-dangling", sets(train__max_steps=12), 0,
         ["epruntime: warning: {ckpt}/latest pointed at 'step_000099', which is not the newest "
          "complete checkpoint; it now names step_000010, the newest complete checkpoint (to go "
          "back to an older one, move the newer step directories away)"],
         prepare=_dangling_latest, after=_resumed_from_10),
    # 2. absurd or non-finite learning rates, non-finite losses
    Case("2-lr-huge", sets(train__lr=1e6, train__warmup_steps=0), 2,
         ["epruntime.train: error: invalid config: train.lr=1000000.0: learning rates above 10 "
          "diverge; expected a value like 3e-3"]),
    Case("2-lr-inf", sets(train__lr=".inf"), 2,
         ["epruntime.train: error: invalid config: train.lr: Input should be a finite number "
          "(got inf)"]),
    Case("2-nonfinite-loss", sets(train__max_steps=14), 4, [nonfinite_line(11)],
         env={"EPRUNTIME_FAULT": "overflow:rank=0:step=11"}),
    Case("2-nonfinite-skipped", sets(train__max_steps=14, train__skip_nonfinite_steps=1), 0,
         ["epruntime: warning: step 11: non-finite loss (nan) or gradient norm (nan); skipped (1 "
          "of train.skip_nonfinite_steps=1)"],
         env={"EPRUNTIME_FAULT": "overflow:rank=0:step=11"}, after=_skipped_one),
    # 4. duplicated YAML keys
    Case("4-duplicate-section", [], 2,
         ["epruntime.train: error: --config {tmp}/cfg.yaml: line 3: duplicate key 'model' (at "
          "the top level; first at line 1); remove one of them"],
         prepare=_yaml("model:\n  num_layers: 1\nmodel:\n  hidden_size: 64\n")),
    Case("4-duplicate-key", [], 2,
         ["epruntime.train: error: --config {tmp}/cfg.yaml: line 3: duplicate key 'lr' (in "
          "train; first at line 2); remove one of them"],
         prepare=_yaml("train:\n  lr: 0.001\n  lr: 0.1\n")),
    # 5. nothing left to train
    Case("5-max-steps-below-checkpoint", sets(train__max_steps=5), 2,
         ["epruntime.train: error: train.max_steps=5 is below step 10 of the newest checkpoint "
          "({ckpt}/step_000010): nothing to train; raise train.max_steps, choose another "
          "train.output_dir, or start over with train.resume=false train.overwrite=true"]),
    Case("5-run-already-complete", sets(train__max_steps=10), 0,
         ["epruntime.train: nothing to train: {ckpt}/step_000010 is at train.max_steps=10; "
          "{out}/summary.json is left as it is (raise train.max_steps to train further)"],
         after=_summary_untouched),
    # 6. empty config file, empty output_dir
    Case("6-empty-config", [], 2,
         ["epruntime.train: error: --config {tmp}/cfg.yaml: the file is empty (expected sections "
          "such as model:, parallel:, train:)"], prepare=_yaml("# nothing\n")),
    Case("6-empty-output-dir", ["--set", "train.output_dir="], 2,
         ["epruntime.train: error: invalid config: train.output_dir: must be a non-empty path "
          "(got None); set it to a directory, e.g. --set train.output_dir=runs/train"]),
    # 7. a trace that sampled nothing is named, and the simulator refuses it
    Case("7-empty-trace", sets(train__max_steps=12, trace__enabled="true",
                               trace__sample_rate=1e-9), 0, [],
         after=_empty_trace_refused),
    # 8. output_dir is a file: refused before any step
    Case("8-output-dir-is-a-file", [], 2,
         ["epruntime.train: error: train.output_dir={tmp}/afile: {tmp}/afile is a file, not a "
          "directory; choose another train.output_dir"], prepare=_output_file),
    # 10. the last local rank's metrics port must exist
    Case("10-metrics-port-range", sets(metrics__enabled="true", metrics__port=65535), 2,
         ["epruntime.train: error: metrics.port=65535: rank on local index 1 would bind 65536; "
          "metrics.port + LOCAL_WORLD_SIZE - 1 must be <= 65535 (LOCAL_WORLD_SIZE=2: lower "
          "metrics.port to at most 65534)"],
         env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}),
    # 13. NCCL on a host without GPUs
    Case("13-nccl-without-gpu", sets(parallel__backend="nccl"), 2,
         ["epruntime.train: error: parallel.backend=nccl needs CUDA GPUs, and torch sees none "
          "(torch.cuda.is_available() is False); use parallel.backend=gloo or auto"]),
    # 14. resuming with another global batch names the checkpoint and the way out
    Case("14-batch-size-changed", sets(train__max_steps=12, data__global_batch_size=16), 2,
         ["epruntime.train: error: {ckpt}/step_000010: its data position does not fit this run "
          "(cannot resume data iterator: state_dict global_batch_size=8 but this iterator has "
          "global_batch_size=16); resume with the checkpoint's data settings (meta.json "
          "config.data), or start over with train.resume=false train.overwrite=true, or choose "
          "another train.output_dir"]),
    # 15. too little data, a damaged meta.json, a timeout too short to connect
    Case("15-too-little-data", sets(data__max_train_items=4), 2,
         ["epruntime.train: error: data.global_batch_size=8 exceeds the 4 training items "
          "(data.max_train_items=4); lower the batch or use more items"], prepare=_fresh_dir),
    Case("15-meta-missing-world-size", sets(train__max_steps=12), 2,
         ["epruntime.train: error: " + MISSING_META], prepare=_drop_world_size),
    Case("15-timeout-too-short", sets(parallel__timeout_s=0.001), 2,
         ["epruntime.train: error: invalid config: parallel.timeout_s: Input should be greater "
          "than or equal to 1 (got 0.001)"]),
    # never over a complete checkpoint; leftovers of an interrupted save are cleaned
    Case("resume-false-refuses", sets(train__resume="false"), 2,
         ["epruntime.train: error: train.output_dir={out} holds checkpoints (step_000010 the "
          "newest) and train.resume=false would start over on top of them; resume "
          "(train.resume=true), choose another train.output_dir, or set train.overwrite=true to "
          "delete them"]),
    Case("leftover-tmp-cleaned", sets(train__max_steps=12), 0,
         ["epruntime: warning: removed {ckpt}/step_000011.tmp, an interrupted checkpoint save"],
         prepare=_leftover_tmp, after=_no_leftover),
    # 16. the launch script exits with the project's code and repeats the first rank's line
    Case("16-launcher-exit-code", sets(train__max_steps=14), 4,
         [nonfinite_line(11), "launch/train.sh: rank failure: " + nonfinite_line(11)],
         env={"EPRUNTIME_FAULT": "overflow:rank=0:step=11", "NPROC_PER_NODE": "1"},
         launcher="script"),
]


def _command(case: Case, out: Path, extra: list[str]) -> list[str]:
    args = [*BASE, *sets(train__output_dir=out), *case.args, *extra]
    if case.launcher == "script":
        return ["bash", str(ROOT / "launch/train.sh"), *args[2:]]  # CONFIG is the script's
    return [sys.executable, "-m", "epruntime.train", *args]


def _run_case(case: Case, trained: Path, tmp_path: Path, out: Path | None = None):
    out = out or tmp_path / "run"
    if not out.exists():
        shutil.copytree(trained, out)
    extra = case.prepare(out, tmp_path)
    before, summary = checkpoint_hashes(out), (out / "summary.json").read_bytes()
    (tmp_path / "summary.before").write_bytes(summary)
    steps_before = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    launch_env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **case.env}
    proc = run(_command(case, out, extra), timeout=TIMEOUT, extra_env=launch_env)
    fill = {"out": out, "ckpt": out / "checkpoints", "tmp": tmp_path}
    assert proc.returncode == case.code, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    lines = proc.stderr.splitlines()
    if case.launcher == "script":  # torchrun prints its own failure report; ours comes last
        assert lines[-1].startswith("launch/train.sh: rank failure: "), proc.stderr[-4000:]
    else:
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for expected in case.lines:
        assert expected.format(**fill) in lines, f"missing line:\n{expected.format(**fill)}\n" \
                                                 f"stderr:\n{proc.stderr[-4000:]}"
    after = checkpoint_hashes(out)
    assert {k: after.get(k) for k in before} == before, "an earlier checkpoint changed"
    if case.code != 0:
        assert (out / "summary.json").read_bytes() == summary, "a failed run rewrote summary.json"
        assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == steps_before
    case.after(out, tmp_path)
    return proc


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case, trained, tmp_path):
    if case.id == "13-nccl-without-gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this host has a CUDA GPU: NCCL is available here")
    _run_case(case, trained, tmp_path)


# ----------------------------------------------------------------------------- file systems

def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def tmpfs(tmp_path, trained):
    """A tmpfs (root only) sized from the trained run: room for it, two more checkpoints and
    slack for block rounding; unmounted afterwards."""
    step = _tree_bytes(trained / "checkpoints/step_000010")
    mib = -(-(_tree_bytes(trained) + 2 * step) // 2**20) + 2
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"needs permission to mount a tmpfs ({proc.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_11_disk_full_keeps_the_previous_checkpoint(trained, tmp_path, tmpfs):
    """Steps 5 and 10 fit on the disk, step 15 does not: one line saying so, no `.tmp` left."""
    out = tmpfs / "run"
    shutil.copytree(trained, out)
    step = _tree_bytes(out / "checkpoints/step_000010")
    filler = shutil.disk_usage(tmpfs).free - step // 2  # leave half a checkpoint of room
    assert filler > 0, "the trained run does not fit the tmpfs"
    (tmpfs / "filler").write_bytes(b"\0" * filler)
    rank_file = out / "checkpoints/step_000015.tmp/__0_0.distcp"  # rank 0's DCP shard
    case = Case("11-disk-full", sets(train__max_steps=15), 2,
                [f"epruntime.train: error: cannot write checkpoint step 15 ({rank_file}): no space "
                 "left on device (ENOSPC); the previous checkpoint is intact; free space or fix "
                 "train.output_dir, then restart to resume from it"])
    _run_case(case, trained, tmp_path, out=out)
    assert not (out / "checkpoints/step_000015.tmp").exists()
    assert (out / "checkpoints/latest").read_text() == "step_000010"


def test_12_read_only_output_dir_is_refused_before_training(trained, tmp_path, tmpfs):
    out = tmpfs / "run"
    shutil.copytree(trained, out)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    probe = out / "checkpoints/.probe.rank00000"
    case = Case("12-read-only", sets(train__max_steps=12), 2,
                [f"epruntime.train: error: train.output_dir={out}: cannot write checkpoints there "
                 f"(read-only file system (EROFS) at {probe}); make it writable or choose another "
                 "train.output_dir"])
    _run_case(case, trained, tmp_path, out=out)


# ----------------------------------------------------------------------------- two ranks

def _rank_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "epruntime.train", *BASE,
            *sets(train__output_dir=out, parallel__ep_size=2, parallel__timeout_s=60), *extra]


def test_9_shm_overflow_is_a_named_user_error_under_the_launcher(trained, tmp_path):
    """The rank that overflows names the sizes and the field; the launch script exits 2 with it."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    proc = run(["bash", str(ROOT / "launch/train.sh"), *BASE[2:],
                *sets(train__output_dir=out, parallel__ep_size=2, train__max_steps=12,
                      dispatch__kind="dedup", dispatch__transport="shm", dispatch__shm_mib=1)],
               timeout=TIMEOUT, extra_env={"NPROC_PER_NODE": "2",
                                           "PATH": f"{Path(sys.executable).parent}:"
                                                   f"{os.environ['PATH']}"})
    assert proc.returncode == 2, proc.stderr[-4000:]
    last = [ln for ln in proc.stderr.splitlines() if ln.startswith("launch/train.sh:")]
    assert len(last) == 1, proc.stderr[-4000:]
    assert last[0].startswith("launch/train.sh: rank failure: epruntime.train: error: shm "
                              "all-to-all call ")
    assert last[0].endswith("(dispatch.shm_mib=1 over 1 local peers, double-buffered); raise "
                            "dispatch.shm_mib"), last[0]
    assert "lost its connection" not in proc.stderr


def test_10_busy_metrics_port_is_named_on_both_ranks(trained, tmp_path):
    """Rank 1's port is taken: rank 1 says so (exit 2); rank 0, which only sees its peer go,
    names rank 1 and its line (exit 3) instead of 'lost its connection'. Plain processes with
    torchrun's environment, so no launcher kills rank 0 before it can tell."""
    from epruntime.distributed import free_port

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        busy = held.getsockname()[1]
        held.listen()
        port, master = busy - 1, free_port()
        procs = [subprocess.Popen(_rank_cmd(out, *sets(metrics__enabled="true",
                                                        metrics__port=port,
                                                        train__max_steps=12)),
                                  cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE,
                                  env={**env(), "RANK": str(r), "LOCAL_RANK": str(r),
                                       "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master)})
                 for r in range(2)]
        try:
            results = [p.communicate(timeout=TIMEOUT) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    rank1 = (f"epruntime.train: error: metrics.port: cannot serve /metrics on 127.0.0.1:{busy} "
             "(metrics.host, metrics.port + local rank): the port is in use; choose another "
             "metrics.port or stop what holds it")
    assert procs[1].returncode == 2, results[1][1][-3000:]
    assert rank1 in results[1][1].splitlines()
    assert procs[0].returncode == 3, results[0][1][-3000:]
    assert f"epruntime.train: error: rank 0 stopped because rank 1 failed first: {rank1}" in \
        results[0][1].splitlines(), results[0][1][-3000:]


def test_3_ranks_die_with_a_killed_launcher(tmp_path):
    """SIGKILL of the torchrun agent mid-run: no rank survives 30 s, nothing is written after."""
    out = tmp_path / "run"
    proc = subprocess.Popen(torchrun_cmd("epruntime.train", 2, *BASE,
                                         *sets(train__output_dir=out, parallel__ep_size=2,
                                               train__max_steps=100000,
                                               train__checkpoint_interval=2)),
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints/step_000004").exists():  # well into training
            assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.2)
        ranks = descendants(proc.pid)
        assert len(ranks) >= 2
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        wait_gone(ranks, timeout=30)
        time.sleep(1.0)  # anything still writing would show up now
        late = [str(p) for p in out.rglob("*") if p.stat().st_mtime > killed_at + 0.05]
        assert not late, f"written after the launcher died: {late}"
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        for pid in ranks:  # never leave an orphan behind, whatever failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
