"""The vision encoders ahead of the projector (epruntime.model.vision): token counts set by
model.patch_size at any image size, per-sample tokens (batch-independent, so EP-independent),
named config errors, and the same loss and gradients at EP=1 and 2 with an encoder."""

from __future__ import annotations

import pytest
import torch

from epruntime.config import ConfigError, load_config
from epruntime.model.vision import VisionTower, patchify
from tests import configs
from tests.dist import spawn
from tests.test_ep_equivalence import assert_same

KINDS = {
    "patch": [],
    "conv": ["model.vision.kind=conv", "model.vision.channels=[8,16]"],
    "vit": ["model.vision.kind=vit", "model.vision.width=16", "model.vision.heads=2",
            "model.vision.layers=1"],
    "conv-grid": ["model.vision.kind=conv", "model.vision.channels=[8,16]",
                  "model.vision.grid_positions=true"],
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("image_size, patch_size", [(16, 4), (32, 8), (48, 16)])
def test_tokens_per_patch_at_any_image_size(kind, image_size, patch_size):
    cfg = load_config(None, [*KINDS[kind], "model.hidden_size=32", "model.num_attention_heads=2",
                             f"model.image_size={image_size}", f"model.patch_size={patch_size}"])
    tower = VisionTower(cfg.model)
    images = torch.rand(3, 3, image_size, image_size)
    tokens = tower(images)
    assert tokens.shape == (3, cfg.model.num_vision_tokens, 32)
    assert cfg.model.num_vision_tokens == (image_size // patch_size) ** 2
    # one sample's tokens do not depend on the rest of its batch (no batch statistics)
    torch.testing.assert_close(tower(images[1:2]), tokens[1:2], rtol=1e-5, atol=1e-6)
    # and do depend on its image
    assert not torch.allclose(tower(images.flip(0))[0], tokens[0])


def test_conv_tokens_follow_their_region():
    """Token i of the conv stem sees patch i: changing only the top-left patch changes the
    top-left token most (row-major order, as patchify's)."""
    cfg = load_config(None, [*KINDS["conv"], "model.image_size=32", "model.patch_size=8"])
    tower = VisionTower(cfg.model)
    images = torch.rand(1, 3, 32, 32)
    changed = images.clone()
    changed[..., :8, :8] = 1 - changed[..., :8, :8]
    delta = (tower.encoder(changed) - tower.encoder(images)).abs().sum(-1)[0]
    assert int(delta.argmax()) == 0 and delta[-1] == 0  # far corner untouched (receptive field)


def test_patch_kind_is_the_pixels_of_each_patch():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = patchify(images, 2)
    assert patches.shape == (2, 4, 12)
    assert torch.equal(patches[0, 1], images[0, :, 0:2, 2:4].reshape(-1))
    cfg = load_config(None, ["model.image_size=4", "model.patch_size=2", "model.hidden_size=8",
                             "model.num_attention_heads=2"])
    tower = VisionTower(cfg.model)
    assert [n for n, _ in tower.named_parameters()] == [
        "norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


@pytest.mark.parametrize("overrides, message", [
    (["model.vision.kind=conv", "model.vision.channels=[8,8,8]", "model.patch_size=4",
      "model.image_size=16"], "model.vision.channels has 3 stride-2 convs"),
    (["model.vision.kind=vit", "model.vision.width=30", "model.vision.heads=4"],
     "model.vision.width=30 is not divisible by model.vision.heads=4"),
    (["model.vision.channels=[8,0]"], "model.vision.channels=[8, 0]"),
    (["model.vision.kind=resnet"], "model.vision.kind"),
])
def test_bad_vision_config_is_a_named_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)


GLOBAL_BATCH = 8


def _grads_worker(rank: int, kind: str, ep_size: int, out: str) -> None:
    from epruntime import distributed
    from epruntime.data import SyntheticVQA, shard_slice
    from epruntime.engine import Engine

    cfg = configs.small_config(*KINDS[kind], "model.moe_aux_loss_coeff=0",
                               f"parallel.ep_size={ep_size}")
    env = distributed.init_distributed(cfg)
    ds = SyntheticVQA(64, image_size=16, question_len=6, seed=3)
    engine = Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len)
    local = torch.arange(GLOBAL_BATCH)[shard_slice(GLOBAL_BATCH, env.dp_rank, env.dp_size)]
    loss = engine.forward_backward(ds.batch(local), GLOBAL_BATCH)
    grads = {n: p.grad.clone() for n, p in engine.model.global_named_parameters(env.ep_rank)}
    torch.save({"loss": loss, "grads": grads}, f"{out}/rank{rank}.pt")


def _run(tmp_path, kind: str, world: int) -> tuple[float, dict]:
    out = tmp_path / f"{kind}_ep{world}"
    out.mkdir()
    spawn(_grads_worker, world, kind, world, str(out))
    merged, losses = {}, set()
    for rank in range(world):
        r = torch.load(out / f"rank{rank}.pt")
        losses.add(r["loss"])
        merged.update(r["grads"])
    assert len(losses) == 1
    return losses.pop(), merged


@pytest.mark.parametrize("kind", ["conv", "vit", "conv-grid"])
def test_encoder_loss_and_grads_equal_at_ep_1_and_2(tmp_path, kind):
    ref = _run(tmp_path, kind, 1)
    encoder = {n: g for n, g in ref[1].items() if n.startswith("vision.encoder.")}
    assert encoder and all(g.abs().sum() > 0 for g in encoder.values())
    positions = {n: g for n, g in ref[1].items() if n.endswith(("row_pos", "col_pos"))}
    assert len(positions) == (2 if kind == "conv-grid" else 0)
    assert all(g.abs().sum() > 0 for g in positions.values())  # trained with the model
    assert_same(ref, _run(tmp_path, kind, 2))


def test_global_context_puts_the_image_mean_beside_every_token():
    cfg = load_config(None, [*KINDS["conv"], "model.image_size=32", "model.patch_size=8",
                             "model.vision.global_context=true"])
    tower = VisionTower(cfg.model)
    assert tower.encoder.out_dim == 3 + 8 + 16 + 16
    feats = tower.encoder(torch.rand(2, 3, 32, 32))  # [B, 16 tokens, 43]
    context = feats[..., -16:]
    assert torch.equal(context, context[:, :1].expand_as(context))  # same on every token
    torch.testing.assert_close(context[:, 0], feats[..., 11:27].mean(1))  # = mean of the last stage


def test_max_pool_keeps_a_small_shape_whole():
    """model.vision.pool=max: each stage's token feature is the maximum over the token's region
    (a small bright spot keeps its full response), the pixels stay the region's mean colour."""
    cfg = load_config(None, [*KINDS["conv"], "model.image_size=32", "model.patch_size=8",
                             "model.vision.pool=max"])
    stem = VisionTower(cfg.model).encoder
    images = torch.rand(2, 3, 32, 32)
    feats = stem(images)  # [B, 16 tokens, 3 + 8 + 16]
    x = images * 2 - 1
    torch.testing.assert_close(feats[..., :3], torch.nn.functional.avg_pool2d(x, 8)
                               .flatten(2).transpose(1, 2))
    stage1 = stem.stages[0](x)  # [B, 8, 16, 16] -> each token the max of its 4x4 cells
    torch.testing.assert_close(feats[..., 3:11], torch.nn.functional.max_pool2d(stage1, 4)
                               .flatten(2).transpose(1, 2))
    with pytest.raises(ConfigError, match="model.vision.pool"):
        load_config(None, ["model.vision.pool=median"])


def test_grid_positions_add_row_plus_column_to_each_token():
    """model.vision.grid_positions: token r*G + c gets row[r] + col[c] on top of the projector's
    output; off, the tower has no such parameters."""
    on = load_config(None, [*KINDS["conv-grid"], "model.image_size=32", "model.patch_size=8"])
    off = load_config(None, [*KINDS["conv"], "model.image_size=32", "model.patch_size=8"])
    assert VisionTower(off.model).row_pos is None
    tower = VisionTower(on.model)
    assert tower.row_pos.shape == tower.col_pos.shape == (4, on.model.hidden_size)
    with torch.no_grad():
        tower.row_pos.normal_()
        tower.col_pos.normal_()
    images = torch.rand(2, 3, 32, 32)
    added = tower(images) - tower.fc2(torch.nn.functional.gelu(tower.fc1(
        tower.norm(tower.encoder(images)))))
    for r, c in [(0, 0), (1, 3), (3, 2)]:
        torch.testing.assert_close(added[:, 4 * r + c],
                                   (tower.row_pos[r] + tower.col_pos[c]).expand(2, -1))
