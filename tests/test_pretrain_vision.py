"""A pretrained, optionally frozen vision encoder (epruntime.model.pretrain_vision and
model.vision.pretrained / freeze): pretraining is deterministic for a seed and learns; loading
gives the saved weights; a frozen encoder keeps them through training at EP=2 while the rest
trains, and a checkpoint of such a run resumes bit for bit; each bad setting is a named error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from epruntime.config import ConfigError, load_config
from epruntime.data.scenes import FASHION_MNIST_DIR
from epruntime.model.vision import (PretrainedEncoderError, VisionTower, build_encoder,
                                    load_pretrained, save_pretrained)
from tests import configs
from tests.dist import spawn

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="needs Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist, "
           "or bash scripts/setup.sh as root)")

# 32-pixel images of 8-pixel patches: a 4x4 token grid whose cells (8 px) fit the generator's
# smallest photo; three stride-2 convs bring 32 to 4.
TINY = ["model.image_size=32", "model.patch_size=8", "model.vision.kind=conv",
        "model.vision.channels=[4,8,8]", "model.vision.pool=max"]
# the distributed tests' small model (16-pixel images, 4-pixel patches) with a conv stem
CONV = ["model.vision.kind=conv", "model.vision.channels=[8,16]"]


def _pretrain(steps: int, seed: int, tmp_path: Path) -> tuple[dict, dict]:
    from epruntime.model.pretrain_vision import main

    out = tmp_path / f"s{seed}_{steps}.pt"
    args = ["--out", str(out), "--steps", str(steps), "--seed", str(seed), "--batch-size", "4",
            "--train-scenes", "16", "--heldout-scenes", "8"]
    assert main(args + [a for o in TINY for a in ("--set", o)]) == 0
    saved = torch.load(out, weights_only=True)
    return saved, json.loads(out.with_suffix(".json").read_text())


@needs_fashion_mnist
def test_pretraining_is_deterministic_for_a_seed(tmp_path):
    first, figures = _pretrain(6, 0, tmp_path / "a")
    again, _ = _pretrain(6, 0, tmp_path / "b")
    other, _ = _pretrain(6, 1, tmp_path / "c")
    assert first["state_dict"].keys() == again["state_dict"].keys()
    assert all(torch.equal(v, again["state_dict"][k]) for k, v in first["state_dict"].items())
    assert any(not torch.equal(v, other["state_dict"][k])
               for k, v in first["state_dict"].items())
    assert first["encoder_config"] == {
        "model.image_size": 32, "model.patch_size": 8, "model.vision.kind": "conv",
        "model.vision.channels": [4, 8, 8], "model.vision.global_context": False,
        "model.vision.pool": "max"}
    assert figures["steps"] == 6 and figures["train_photos"] == 50000
    assert 0 <= figures["heldout_cell_accuracy"] <= 1


@needs_fashion_mnist
def test_pretraining_learns_more_than_the_empty_cell_rate(tmp_path):
    """A few hundred steps already name cells far better than always answering "nothing" (the
    commonest label; each category holds about 7% of the cells)."""
    from epruntime.data.scenes import fashion_mnist
    from epruntime.model.pretrain_vision import pretrain

    photos, labels = fashion_mnist("train")
    m = load_config(None, TINY).model
    _, figures = pretrain(m, photos, labels, steps=300, seed=0, train_photos=50000,
                          train_scenes=400, heldout_scenes=100, batch_size=16, lr=3e-3)
    nothing = figures["heldout_nothing_rate"]
    assert 0.2 < nothing < 0.4
    assert figures["heldout_cell_accuracy"] > nothing + 0.2, figures


def _file_for(m, path: Path, seed: int = 7) -> dict:
    """A pretrained-encoder file for `m` with weights unlike any initialisation."""
    torch.manual_seed(seed)
    encoder = build_encoder(m)
    save_pretrained(path, m, encoder, {})
    return {k: v.clone() for k, v in encoder.state_dict().items()}


def test_load_gives_the_saved_weights(tmp_path):
    m = load_config(None, TINY).model
    saved = _file_for(m, tmp_path / "stem.pt")
    tower = VisionTower(m)
    assert not all(torch.equal(v, saved[k]) for k, v in tower.encoder.state_dict().items())
    load_pretrained(tower.encoder, m, tmp_path / "stem.pt")
    assert all(torch.equal(v, saved[k]) for k, v in tower.encoder.state_dict().items())


def test_missing_file_is_a_named_error(tmp_path):
    m = load_config(None, TINY).model
    with pytest.raises(PretrainedEncoderError) as err:
        load_pretrained(build_encoder(m), m, tmp_path / "none.pt")
    assert str(err.value) == (
        f"model.vision.pretrained={tmp_path / 'none.pt'}: file not found (write it with python "
        "-m epruntime.model.pretrain_vision --config CONFIG --out PATH)")


@pytest.mark.parametrize("overrides, field, there, here", [
    (["model.vision.channels=[4,8,16]"], "model.vision.channels", "[4, 8, 8]", "[4, 8, 16]"),
    (["model.vision.pool=avg"], "model.vision.pool", "max", "avg"),
    (["model.image_size=64", "model.patch_size=16", "model.vision.channels=[4,8,8,8]"],
     "model.image_size", "32", "64"),
    (["model.vision.kind=vit", "model.vision.width=16", "model.vision.heads=2",
      "model.vision.layers=1"], "model.vision.kind", "conv", "vit"),
])
def test_file_for_another_encoder_names_the_field(tmp_path, overrides, field, there, here):
    _file_for(load_config(None, TINY).model, tmp_path / "stem.pt")
    m = load_config(None, [*TINY, *overrides]).model
    with pytest.raises(PretrainedEncoderError) as err:
        load_pretrained(build_encoder(m), m, tmp_path / "stem.pt")
    assert str(err.value) == (
        f"model.vision.pretrained={tmp_path / 'stem.pt'} was trained for another encoder: "
        f"{field}={there} there, {here} in this config")


@pytest.mark.parametrize("overrides, message", [
    (["model.vision.kind=conv", "model.vision.freeze=true"],
     "invalid config: model.vision.freeze=true needs model.vision.pretrained (a frozen encoder "
     "that was never trained stays at its random initialisation)"),
    (["model.vision.kind=patch", "model.vision.pretrained=stem.pt"],
     "invalid config: model.vision.pretrained needs model.vision.kind conv or vit (kind=patch "
     "has no encoder weights)"),
])
def test_bad_settings_are_named_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_pretraining_a_patch_encoder_is_a_usage_error(tmp_path, capsys):
    from epruntime.model.pretrain_vision import main

    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / "x.pt"), "--set", "model.vision.kind=patch"])
    assert err.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "error: model.vision.kind=patch: only conv and vit encoders have weights to pretrain")
    assert not (tmp_path / "x.pt").exists()


# ---- frozen at EP=2, through training and a checkpoint ---------------------------------------
STEPS = 4  # a checkpoint after step 2, then two more steps


def _frozen_worker(rank: int, out: str) -> None:
    from epruntime import checkpoint, distributed
    from epruntime.data import ShardedBatchIterator
    from epruntime.datasets import build_datasets
    from epruntime.engine import Engine

    cfg = configs.small_config(*CONV, "parallel.ep_size=2", f"train.output_dir={out}/run",
                               f"model.vision.pretrained={out}/stem.pt",
                               "model.vision.freeze=true", "data.synthetic_items=64",
                               "train.warmup_steps=1")
    env = distributed.init_distributed(cfg)

    def build():
        train_ds, _ = build_datasets(cfg)
        engine = Engine(cfg, env, len(train_ds.vocab), train_ds.num_answers,
                        train_ds.max_question_len)
        batches = ShardedBatchIterator(train_ds, configs.GLOBAL_BATCH, env.dp_rank, env.dp_size,
                                       seed=cfg.train.seed)
        return engine, batches

    saved = torch.load(f"{out}/stem.pt", weights_only=True)["state_dict"]
    engine, batches = build()
    encoder = engine.model.vision.encoder
    report = {"loaded": all(torch.equal(v, saved[k]) for k, v in encoder.state_dict().items()),
              "frozen": all(not p.requires_grad for p in encoder.parameters()),
              "others_train": all(p.requires_grad for n, p in engine.model.named_parameters()
                                  if not n.startswith("vision.encoder."))}
    fc1 = engine.model.vision.fc1.weight.detach().clone()
    losses = []
    for step in range(STEPS):
        losses.append(engine.train_step(next(batches), step).loss)
        if step + 1 == 2:
            path = checkpoint.save_checkpoint(engine, step + 1, batches.state_dict())
    report["unchanged"] = all(torch.equal(v, saved[k]) for k, v in encoder.state_dict().items())
    report["projector_moved"] = not torch.equal(fc1, engine.model.vision.fc1.weight)
    report["losses"] = losses

    fresh, fresh_batches = build()
    meta = checkpoint.load_checkpoint(fresh, path)
    fresh_batches.load_state_dict(meta["data"])
    report["resumed"] = [fresh.train_step(next(fresh_batches), s).loss for s in range(2, STEPS)]
    report["resumed_state_equal"] = all(
        torch.equal(p, dict(fresh.model.named_parameters())[n])
        for n, p in engine.model.named_parameters())
    report["checkpoint"] = str(path)
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


def _predict_worker(rank: int, checkpoint_path: str, out: str) -> None:
    """Build the prediction engine from a frozen-stem checkpoint at EP=1 (the stem file gone)."""
    from epruntime import distributed
    from epruntime.predict import build_engine, checkpoint_vocab, load_inference_config

    cfg, meta = load_inference_config(Path(checkpoint_path), None, ["parallel.ep_size=1"])
    env = distributed.init_distributed(cfg)
    engine, _ = build_engine(cfg, env, checkpoint_vocab(meta, cfg), Path(checkpoint_path))
    conv = engine.model.vision.encoder.stages[0][0].weight
    torch.save(conv.detach().clone(), f"{out}/predict_conv.pt")


def test_frozen_encoder_keeps_its_weights_at_ep_2_resumes_and_predicts_without_its_file(tmp_path):
    m = configs.small_config(*CONV).model
    _file_for(m, tmp_path / "stem.pt")
    spawn(_frozen_worker, 2, str(tmp_path))
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["loaded"] and r["frozen"] and r["others_train"], r
        assert r["unchanged"] and r["projector_moved"], r
        assert r["resumed"] == r["losses"][2:], r
        assert r["resumed_state_equal"], r
    # prediction reads the encoder from the checkpoint: the pretrained file is not needed
    stem = torch.load(tmp_path / "stem.pt", weights_only=True)["state_dict"]
    (tmp_path / "stem.pt").unlink()
    spawn(_predict_worker, 1, r["checkpoint"], str(tmp_path))
    assert torch.equal(torch.load(tmp_path / "predict_conv.pt"), stem["stages.0.0.weight"])


def test_checkpoint_of_a_frozen_stem_loads_without_its_file(tmp_path):
    """pretrained / freeze say how training started, not what the weights are: a checkpoint of
    such a run is compatible with a config without them (prediction), and a changed stem is not."""
    from epruntime.checkpoint import CheckpointError
    from epruntime.checkpoint.load import check_compatible

    frozen = load_config(None, [*TINY, "model.vision.pretrained=stem.pt",
                                "model.vision.freeze=true"])
    meta = {"config": json.loads(frozen.canonical_json())}
    check_compatible(meta, load_config(None, TINY), tmp_path)
    older = json.loads(load_config(None, TINY).canonical_json())  # before the two fields existed
    for name in ("pretrained", "freeze"):
        del older["model"]["vision"][name]
    check_compatible({"config": older}, frozen, tmp_path)
    changed = r"model.vision: checkpoint .*'channels': \[4, 8, 8\]"
    with pytest.raises(CheckpointError, match=changed):
        check_compatible(meta, load_config(None, [*TINY, "model.vision.channels=[4,8,16]"]),
                         tmp_path)
