"""Pretrain the vision encoder as a per-token classifier on scenes of Fashion-MNIST photos.

    python -m epruntime.model.pretrain_vision --config launch/configs/scenes.yaml \\
        --out runs/vision/fashion_stem.pt --steps 2000 --seed 0

Scenes are drawn with the scenes generator's own rendering (`epruntime.data.scenes.make_scene`:
textured noisy backgrounds, tinted photos scaled and moved inside their cells) on a grid of
exactly the model's token grid (model.image_size / model.patch_size per side), so each token
stands for one cell. The encoder that `model.vision` names (`epruntime.model.vision.
build_encoder`) learns to say what each cell holds: one of the ten categories or nothing, through
a LayerNorm and a linear layer on each token's features that are thrown away afterwards.

Only photos of Fashion-MNIST's training split are used: the scenes the encoder learns from take
its first `--train-photos`; the held-out scenes (reported as `heldout_cell_accuracy`) take the
rest. The test split's photos, which the scenes workload scores on, are never seen here.

Writes OUT (the encoder's weights and the encoder config they were trained for, which
`model.vision.pretrained` checks) and OUT with suffix .json (the figures). Deterministic for a
seed: scenes come from numpy.random.default_rng((seed, 2, part, index)), weights and batches from
torch generators seeded by `--seed`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from epruntime.config import ModelConfig, load_config
from epruntime.data import scenes
from epruntime.model.vision import build_encoder, save_pretrained

NOTHING = len(scenes.CATEGORIES)  # label of an empty cell; categories are 0..9


def cell_labels(scene: scenes.Scene) -> np.ndarray:
    """[grid * grid] int64, row-major (the token order): each cell's category or NOTHING."""
    labels = np.full(scene.grid * scene.grid, NOTHING, dtype=np.int64)
    for it in scene.items:
        labels[it.row * scene.grid + it.col] = scenes.CATEGORIES.index(it.category)
    return labels


def make_cells(photos: np.ndarray, labels: np.ndarray, num_scenes: int, grid: int, size: int,
               seed: int, part: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 3, size, size] float32 in [0, 1], cell labels [N, grid * grid] int64) of
    `num_scenes` grid x grid scenes drawn from `photos` [M, 28, 28] with the generator's
    rendering."""
    images = np.empty((num_scenes, size, size, 3), dtype=np.uint8)
    targets = np.empty((num_scenes, grid * grid), dtype=np.int64)
    for i in range(num_scenes):
        rng = np.random.default_rng((seed, 2, part, i))  # stream 2: neither split's scenes
        scene, pixels = scenes.make_scene(rng, photos, labels, size, "jitter", "", (grid, grid))
        images[i], targets[i] = pixels, cell_labels(scene)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0,
            torch.from_numpy(targets))


class CellHead(nn.Module):
    """Per-token classifier: [B, P, F] -> logits [B, P, 11]."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, NOTHING + 1)

    def forward(self, x_BPF: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x_BPF))


@torch.no_grad()
def cell_accuracy(encoder: nn.Module, head: nn.Module, images: torch.Tensor,
                  targets: torch.Tensor, batch: int = 256) -> float:
    right = 0
    for i in range(0, len(images), batch):
        logits = head(encoder(images[i:i + batch]))
        right += int((logits.argmax(-1) == targets[i:i + batch]).sum())
    return right / targets.numel()


def not_pretrainable(m: ModelConfig) -> str | None:
    """Why `m`'s encoder cannot be pretrained, or None when it can."""
    if m.vision.kind in ("conv", "vit"):
        return None
    return (f"model.vision.kind={m.vision.kind}: only conv and vit encoders have weights to "
            "pretrain")


def pretrain(m: ModelConfig, photos: np.ndarray, labels: np.ndarray, *, steps: int, seed: int,
             train_photos: int, train_scenes: int, heldout_scenes: int, batch_size: int,
             lr: float, log_every: int = 0) -> tuple[nn.Module, dict]:
    """The trained encoder and its figures."""
    if (why := not_pretrainable(m)) is not None:
        raise ValueError(why)
    grid = m.image_size // m.patch_size
    started = time.perf_counter()
    train_x, train_y = make_cells(photos[:train_photos], labels[:train_photos], train_scenes,
                                  grid, m.image_size, seed, 0)
    held_x, held_y = make_cells(photos[train_photos:], labels[train_photos:], heldout_scenes,
                                grid, m.image_size, seed, 1)
    made_s = time.perf_counter() - started
    torch.manual_seed(seed)
    encoder = build_encoder(m)
    head = CellHead(encoder.out_dim)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        idx = torch.randint(len(train_x), (batch_size,), generator=gen)
        x = train_x[idx]
        if torch.rand((), generator=gen) < 0.5:  # mirror left-right, labels with it
            x = x.flip(-1)
            y = train_y[idx].view(-1, grid, grid).flip(-1).reshape(-1, grid * grid)
        else:
            y = train_y[idx]
        loss = F.cross_entropy(head(encoder(x)).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    encoder.eval()
    figures = {
        "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
        "train_photos": train_photos, "heldout_photos": len(photos) - train_photos,
        "train_scenes": train_scenes, "heldout_scenes": heldout_scenes, "grid": grid,
        "final_loss": round(loss.item(), 4),
        "train_cell_accuracy": round(cell_accuracy(encoder, head, train_x[:heldout_scenes],
                                                   train_y[:heldout_scenes]), 4),
        "heldout_cell_accuracy": round(cell_accuracy(encoder, head, held_x, held_y), 4),
        "heldout_nothing_rate": round(float((held_y == NOTHING).float().mean()), 4),
        "scene_seconds": round(made_s, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return encoder, figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="epruntime.model.pretrain_vision",
                                description=__doc__.splitlines()[0])
    p.add_argument("--config", help="the training config (its model.vision, "
                   "model.image_size and model.patch_size shape the encoder)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--out", required=True, type=Path, help="weights file to write")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="scenes per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-photos", type=int, default=50000,
                   help="the first N training-split photos compose the training scenes, the "
                        "rest the held-out ones")
    p.add_argument("--train-scenes", type=int, default=6000)
    p.add_argument("--heldout-scenes", type=int, default=1000)
    # One thread: these small convs gain little from more, and lose much on a shared machine.
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--fashion-mnist", type=Path, default=scenes.FASHION_MNIST_DIR)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "train_scenes", "heldout_scenes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(p, args)
    finally:  # main() may run inside another program (the tests)
        torch.set_num_threads(threads)


def _run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if (why := not_pretrainable(cfg.model)) is not None:  # before the photos are read
        p.error(why)
    try:
        photos, labels = scenes.fashion_mnist("train", args.fashion_mnist)
    except scenes.FashionMnistMissing as err:
        print(f"epruntime.model.pretrain_vision: error: {err}", file=sys.stderr)
        return 2
    if not 0 < args.train_photos < len(photos):
        p.error(f"--train-photos must be in 1..{len(photos) - 1}")
    encoder, figures = pretrain(
        cfg.model, photos, labels, steps=args.steps, seed=args.seed,
        train_photos=args.train_photos, train_scenes=args.train_scenes,
        heldout_scenes=args.heldout_scenes, batch_size=args.batch_size, lr=args.lr,
        log_every=max(1, args.steps // 10))
    save_pretrained(args.out, cfg.model, encoder, figures)
    args.out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
