"""The small model the distributed tests share: synthetic 16x16 images (16 vision tokens), two
layers, hidden 32, 8 experts top-3, a global batch of 8, patch vision tokens (whatever the base
config, e.g. launch/train.sh's tiny-vqa.yaml with its conv stem). Tests state only what they
change."""

from __future__ import annotations

from epruntime.config import Config, load_config

GLOBAL_BATCH = 8
SMALL = [
    "data.dataset=synthetic", f"data.global_batch_size={GLOBAL_BATCH}",
    "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=2",
    "model.num_experts=8", "model.moe_topk=3", "model.moe_ffn_hidden_size=16",
    "model.image_size=16", "model.patch_size=4", "model.vision.kind=patch",
    "parallel.timeout_s=60",
]


def small_config(*overrides: str) -> Config:
    """The shared small config with `overrides` (`a.b=value`, later ones win)."""
    return load_config(None, [*SMALL, *overrides])
