"""Placement files in real training runs (torchrun, gloo): dispatch.placement=file:PATH moves the
experts to the file's placements; a replicated file (copies of experts) trains; traces in
megatron-core's router-trace schema (trace.format=megatron-jsonl) feed the planner."""

from __future__ import annotations

import sys

from epruntime import plan
from epruntime.placement import Placement
from epruntime.placement.file import save_placements
from tests.conftest import ROOT
from tests.launch import check, run, sets, summary, torchrun_cmd

TINY = str(ROOT / "launch/configs/tiny-vqa.yaml")
SMALL = dict(train__max_steps=2, train__checkpoint_interval=2, train__progress="false",
             data__max_train_items=256, data__max_eval_items=64, data__global_batch_size=8,
             model__num_layers=1, dispatch__kind="dedup")


def test_placement_file_in_training_and_megatron_schema_trace(tmp_path):
    # 32 experts over 2 ranks, interleaved: not contiguous, so the experts must migrate
    placement = Placement.from_rank_lists([list(range(0, 32, 2)), list(range(1, 32, 2))], 2)
    path = save_placements(tmp_path / "p.json", [placement], None, "test")
    out = tmp_path / "run"
    check(run(torchrun_cmd("epruntime.train", 2, "--config", TINY, *sets(
        **SMALL, train__output_dir=out, dispatch__placement=f"file:{path}",
        trace__enabled="true", trace__format="megatron-jsonl"))))
    s = summary(out)
    assert Placement.from_dict(s["placements"][0]) == placement
    assert s["migrations"]["count"] == 0  # moved at start, not by re-binning
    assert s["comm"]["rows_sent"] == s["comm"]["floor_rows"] > 0
    traces = sorted((out / "traces").glob("rank*.jsonl"))
    assert len(traces) == 2
    routing = plan.load_routing(out / "traces")
    assert routing.num_experts == 32 and routing.recorded_ep == 2
    assert routing.experts_LTK.shape[2] == 4  # tiny-vqa: top-4
    assert int((routing.experts_LTK >= 0).sum()) == 4 * routing.experts_LTK.shape[1]


def test_replicated_placement_file_trains(tmp_path):
    """A placement file with copies (expert 0 and 16 on both ranks) trains under torchrun with
    the dedup dispatcher; one that does not fit the run, or megatron-core's dispatcher, is
    refused by name with exit 2."""
    replicated = Placement.from_rank_lists([list(range(16)) + [16], list(range(16, 32)) + [0]], 2)
    path = save_placements(tmp_path / "r.json", [replicated], None, "test")
    proc = run([sys.executable, "-m", "epruntime.train", "--config", TINY, *sets(
        **SMALL, parallel__ep_size=1, train__output_dir=tmp_path / "run",
        dispatch__placement=f"file:{path}")])
    # ep_size=1 on one process: the file's 2 ranks do not fit, named
    assert proc.returncode == 2 and "num_ranks=2" in proc.stderr, proc.stderr[-2000:]
    proc = run([sys.executable, "-m", "epruntime.train", "--config", TINY, *sets(
        **{**SMALL, "dispatch__kind": "alltoall"}, train__output_dir=tmp_path / "run1",
        dispatch__placement=f"file:{path}")])
    assert proc.returncode == 2 and "dispatch.kind=dedup or dedup-hier" in proc.stderr, \
        proc.stderr[-2000:]
    out = tmp_path / "run2"
    check(run(torchrun_cmd("epruntime.train", 2, "--config", TINY, *sets(
        **SMALL, train__output_dir=out, dispatch__placement=f"file:{path}"))))
    s = summary(out)
    assert Placement.from_dict(s["placements"][0]) == replicated
    assert s["migrations"]["count"] == 0 and s["comm"]["rows_sent"] > 0
