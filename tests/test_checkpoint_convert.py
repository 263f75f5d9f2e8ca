"""Checkpoints of format version 1 (one rank*.pt per rank): refused with the converter's name, and
converted by `python -m epruntime.checkpoint.convert` into exactly what a DCP save of the same
state writes: the same keys (logical experts, AdamW state, every rank's RNG) and tensors."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests import configs
from tests.conftest import ROOT
from tests.dist import spawn
from tests.launch import env

STEP = 2


def _worker(rank: int, out: str) -> None:
    from epruntime import checkpoint, distributed
    from epruntime.checkpoint.legacy import save_v1
    from epruntime.data import ShardedBatchIterator
    from epruntime.datasets import build_datasets
    from epruntime.engine import Engine

    cfg = configs.small_config("parallel.ep_size=2", "data.synthetic_items=64",
                               f"train.output_dir={out}/dcp")
    env_ = distributed.init_distributed(cfg)
    train_ds, _ = build_datasets(cfg)
    engine = Engine(cfg, env_, len(train_ds.vocab), train_ds.num_answers,
                    train_ds.max_question_len)
    batches = ShardedBatchIterator(train_ds, configs.GLOBAL_BATCH, env_.dp_rank, env_.dp_size,
                                   seed=cfg.train.seed)
    for step in range(STEP):
        engine.train_step(next(batches), step)
    checkpoint.save_checkpoint(engine, STEP, batches.state_dict())
    save_v1(engine, STEP, batches.state_dict(), Path(out) / f"v1/checkpoints/step_{STEP:06d}")


def read_all(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, verified, in this process (no process group)."""
    import torch.distributed.checkpoint as dcp

    from epruntime.checkpoint.layout import read_meta
    from epruntime.checkpoint.storage import (VerifyingLoadPlanner, VerifyingReader,
                                              read_dcp_metadata)

    md = read_dcp_metadata(step_dir)
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in md.state_dict_metadata.items()}
    with warnings.catch_warnings():  # one process without a process group, on purpose
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=VerifyingReader(step_dir, md),
                 planner=VerifyingLoadPlanner(step_dir,
                                              read_meta(step_dir)["integrity"]["tensors"]),
                 no_dist=True)
    return state


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert")
    spawn(_worker, 2, str(out))
    return out


def test_old_format_is_refused_with_the_converters_name(saved):
    from epruntime import checkpoint

    step_dir = saved / f"v1/checkpoints/step_{STEP:06d}"
    said = (f"{step_dir} is a checkpoint in the old per-rank format (rank*.pt, format version 1), "
            "which this epruntime no longer loads; convert it with `python -m "
            f"epruntime.checkpoint.convert {step_dir}` (or the run's output_dir for all of its "
            "checkpoints)")
    assert checkpoint.damage(step_dir) == said
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.resolve_checkpoint(saved / "v1")
    assert str(err.value) == said


def test_converter_writes_what_a_dcp_save_writes(saved, tmp_path):
    import shutil

    from epruntime import checkpoint

    run = tmp_path / "v1"
    shutil.copytree(saved / "v1", run)
    proc = subprocess.run([sys.executable, "-m", "epruntime.checkpoint.convert", str(run)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step_dir = run / f"checkpoints/step_{STEP:06d}"
    assert proc.stdout.strip() == f"converted {step_dir} (the original is kept as {step_dir}.v1)"
    assert checkpoint.damage(step_dir) is None
    assert checkpoint.latest_checkpoint(run) == step_dir
    converted, native = read_all(step_dir), read_all(saved / f"dcp/checkpoints/step_{STEP:06d}")
    assert converted.keys() == native.keys()
    assert any(k.startswith("rng/rank00001/") for k in native)
    for key, t in native.items():
        assert torch.equal(converted[key], t), key
    # converting again is refused, the run untouched
    again = subprocess.run([sys.executable, "-m", "epruntime.checkpoint.convert", str(step_dir)],
                           cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.strip() == (f"epruntime.checkpoint.convert: error: {step_dir}: not a "
                                    "version-1 checkpoint (no rank*.pt, or meta.json already "
                                    "names a format)")
