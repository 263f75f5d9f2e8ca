"""Experts re-placed during training: the loss curve continues as if they had always been there,
and `dispatch.placement=bins` moves SMoES bins onto their ranks as a real torchrun job."""

from __future__ import annotations

import sys

import pytest
import torch

from epruntime.placement import Placement
from tests.conftest import ROOT
from tests.launch import check, run, sets, summary, torchrun_cmd
from tests.test_dedup_dispatch import GLOBAL_BATCH, small_config

TINY = str(ROOT / "launch/configs/tiny-vqa.yaml")


def _curve_worker(rank: int, ep_size: int, out: str) -> None:
    from epruntime import distributed
    from epruntime.data import SyntheticVQA, shard_slice
    from epruntime.engine import Engine
    from epruntime.placement.controller import place

    cfg = small_config(ep_size, "dedup", "train.lr=3e-3", "train.warmup_steps=1")
    env = distributed.init_distributed(cfg)
    ds = SyntheticVQA(128, image_size=16, question_len=6, seed=3)
    shuffled = Placement.from_rank_lists(
        torch.randperm(8, generator=torch.Generator().manual_seed(5)).view(ep_size, -1).tolist())
    curves, reports = {}, []
    for migrate in (False, True):
        distributed.seed_all(0)
        engine = Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len)
        losses = []
        for step in range(6):
            if migrate and step == 3:
                reports.append(place(engine, [shuffled] * cfg.model.num_layers))
            idx = torch.arange(GLOBAL_BATCH)  # one batch: the loss must fall on it
            losses.append(engine.train_step(ds.batch(idx[shard_slice(GLOBAL_BATCH, env.dp_rank,
                                                                       env.dp_size)]), step).loss)
        curves[migrate] = losses
    torch.save({"curves": curves, "report": reports[0],
                "placements": [p.to_dict() for p in engine.model.placements]}, f"{out}/rank{rank}.pt")


def test_loss_curve_continues_through_a_migration(tmp_path):
    spawn_world = 2
    from tests.dist import spawn
    spawn(_curve_worker, spawn_world, spawn_world, str(tmp_path))
    r = torch.load(tmp_path / "rank0.pt", weights_only=False)
    still, moved = r["curves"][False], r["curves"][True]
    assert moved[:3] == still[:3]
    assert moved[3:] == pytest.approx(still[3:], rel=1e-5)
    assert still[5] < still[3] < still[0]  # it trains, and the moved experts keep training
    assert r["report"]["all_verified"] and r["report"]["experts_moved"] > 0
    assert r["report"]["bytes_sent"] > 0
    assert not Placement.from_dict(r["placements"][0]).is_contiguous


def test_bins_placement_moves_experts_during_training(tmp_path):
    out = tmp_path / "bins"
    fields = dict(train__output_dir=out, train__max_steps=6, train__checkpoint_interval=6,
                  train__progress="false", data__max_train_items=1024, data__max_eval_items=128,
                  data__global_batch_size=16, model__num_layers=1, smoes__enabled="true",
                  smoes__rebin_interval=2, dispatch__kind="dedup", dispatch__placement="bins")
    check(run(torchrun_cmd("epruntime.train", 2, "--config", TINY, *sets(**fields))))
    s = summary(out)
    assert s["migrations"]["count"] >= 1 and s["migrations"]["bytes_sent"] > 0
    placement = Placement.from_dict(s["placements"][0])
    assert not placement.is_contiguous
    assert s["comm"]["rows_sent"] == s["comm"]["floor_rows"] > 0
    assert s["eval_comm"]["rows_sent"] == s["eval_comm"]["floor_rows"] > 0
    # The checkpoint carries the placement; inference under it reproduces the training eval.
    infer_out = tmp_path / "infer"
    check(run(torchrun_cmd("epruntime.infer", 2, "--checkpoint", str(out),
                           *sets(infer__output_dir=infer_out, dispatch__kind="dedup"))))
    assert summary(infer_out)["eval_accuracy"] == s["eval_accuracy"]
    # A placement asked for explicitly wins over the saved one (experts are keyed by logical
    # id): megatron-core's dispatcher under the contiguous placement gives the same accuracy.
    contiguous_out = tmp_path / "infer-contiguous"
    check(run(torchrun_cmd("epruntime.infer", 2, "--checkpoint", str(out),
                           *sets(infer__output_dir=contiguous_out, dispatch__kind="alltoall",
                                 dispatch__placement="contiguous"))))
    assert summary(contiguous_out)["eval_accuracy"] == s["eval_accuracy"]
    # An impossible combination is one named line and exit 2, not a traceback.
    bad = run([sys.executable, "-m", "epruntime.infer", "--checkpoint", str(out),
               *sets(infer__output_dir=tmp_path / "bad", dispatch__kind="alltoall")])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert ("epruntime.infer: error: invalid config: dispatch.placement=bins needs "
            "dispatch.kind=dedup or dedup-hier") in bad.stderr, bad.stderr[-3000:]
