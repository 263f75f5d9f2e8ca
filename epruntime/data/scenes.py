"""Scenes of real product photos (Fashion-MNIST) with questions whose answers need the image.

    python -m epruntime.data.scenes --out data/scenes --seed 0 --train 6000 --test 1000

Each scene is a 2x2, 3x3 or 4x4 grid (`--grid`; `--grid 4` gives 4x4 scenes only) on a
textured or noisy background (stripes, checks, gradients, speckle); some cells hold a
Fashion-MNIST photo (tinted, and with `--layout jitter` scaled and moved freely inside its cell),
others are empty. Every scene gets `--questions` questions, one of each kind in turn:

    position  "what is in row 2, column 3?"           -> a category, or "nothing"
    count     "how many bags are there?"               -> "0" .. "4" (categories seen at most 4x)
    presence  "is there a sneaker?"                    -> "yes" / "no"
    relative  "is the bag left of the boot?"           -> "yes" / "no" (each appears once; the
              "is the coat above the dress?"              two differ along the asked axis)

Output, the JSONL + images format of `epruntime.data.jsonl`:

    OUT/train.jsonl, OUT/test.jsonl      {"id", "image", "question", "answer", "kind"} per line
    OUT/train_scenes.jsonl, test_...     each scene's metadata: grid size and its items (category,
                                         row, column, pixel box, Fashion-MNIST index)
    OUT/images/{train,test}/NNNNNN.png

Training scenes use photos of Fashion-MNIST's training split and test scenes photos of its test
split, so a model is scored on photos it never saw. Everything is drawn from
numpy.random.default_rng((seed, split, scene)): the same seed gives byte-identical files.
The photos come from Debian's `dataset-fashion-mnist` package (scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Fashion-MNIST's ten labels, one word each so that questions tokenize to one word per category.
CATEGORIES = ("top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
              "boot")
PLURALS = ("tops", "trousers", "pullovers", "dresses", "coats", "sandals", "shirts", "sneakers",
           "bags", "boots")
KINDS = ("position", "count", "presence", "relative")
SPLITS = {"train": ("train", 0), "test": ("t10k", 1)}  # our split -> (file prefix, rng stream)


class FashionMnistMissing(FileNotFoundError):
    """The Fashion-MNIST files are not installed."""


def fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """([N, 28, 28] uint8 photos, [N] uint8 labels) of split "train" or "test" (idx files)."""
    prefix = SPLITS[split][0]
    paths = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FashionMnistMissing(
            f"Fashion-MNIST not found ({', '.join(missing)}): install Debian's "
            "dataset-fashion-mnist package (apt-get install dataset-fashion-mnist, or "
            "bash scripts/setup.sh as root)")
    with gzip.open(paths[0]) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(paths[1]) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} holds {len(images)} images for {len(labels)} labels")
    return images, labels


@dataclass(frozen=True)
class Item:
    category: str
    row: int  # 0-based
    col: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)
    source: int  # index of the photo in its Fashion-MNIST split


@dataclass(frozen=True)
class Scene:
    image: str
    grid: int
    items: tuple[Item, ...]

    def at(self, row: int, col: int) -> Item | None:
        return next((it for it in self.items if (it.row, it.col) == (row, col)), None)

    def count(self, category: str) -> int:
        return sum(it.category == category for it in self.items)


# ---- drawing --------------------------------------------------------------------------------
def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] float32 in [0, 1]: one of four textures in random low-contrast colours,
    plus pixel noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(0.0, 0.6, 3), rng.uniform(0.0, 0.6, 3)
    kind = rng.integers(4)
    if kind == 0:  # stripes at a random angle and period
        theta, period = rng.uniform(0, np.pi), rng.uniform(0.08, 0.3)
        t = (np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period) + 1) / 2
    elif kind == 1:  # checks
        n = rng.integers(3, 9)
        t = ((np.floor(x * n) + np.floor(y * n)) % 2).astype(np.float32)
    elif kind == 2:  # linear gradient
        theta = rng.uniform(0, 2 * np.pi)
        t = (x * np.cos(theta) + y * np.sin(theta))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:  # blotches: coarse noise upsampled
        n = int(rng.integers(3, 8))
        coarse = rng.uniform(0, 1, (n, n)).astype(np.float32)
        idx = np.minimum((np.arange(size) * n) // size, n - 1)
        t = coarse[idx][:, idx]
    img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    img += rng.normal(0, rng.uniform(0.02, 0.08), img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def resize_photo(photo: np.ndarray, side: int) -> np.ndarray:
    """[28, 28] uint8 -> [side, side] float32 in [0, 1] (bilinear, PIL)."""
    from PIL import Image

    im = Image.fromarray(photo).resize((side, side), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


def paste(canvas: np.ndarray, photo: np.ndarray, x0: int, y0: int, tint: np.ndarray) -> None:
    """Alpha-blend a grayscale photo (its brightness is the alpha) in colour `tint`."""
    s = photo.shape[0]
    alpha = photo[..., None]
    region = canvas[y0:y0 + s, x0:x0 + s]
    region[:] = region * (1 - alpha) + tint[None, None] * alpha


# ---- one scene ------------------------------------------------------------------------------
def make_scene(rng: np.random.Generator, photos: np.ndarray, labels: np.ndarray, size: int,
               layout: str, name: str, grids: tuple[int, int] = (2, 4)) -> tuple[Scene, np.ndarray]:
    """One scene and its [size, size, 3] uint8 pixels; its grid side drawn from grids=(lo, hi)."""
    grid = int(rng.integers(grids[0], grids[1] + 1))
    cell = size // grid
    canvas = background(rng, size)
    fill = rng.uniform(0.5, 0.9)
    items = []
    for row in range(grid):
        for col in range(grid):
            if rng.uniform() > fill:
                continue
            source = int(rng.integers(len(photos)))
            if layout == "jitter":
                side = int(rng.integers(max(cell * 6 // 10, 8), cell + 1))
                dx, dy = (int(rng.integers(0, cell - side + 1)) for _ in range(2))
            else:
                side, dx, dy = cell, 0, 0
            x0, y0 = col * cell + dx, row * cell + dy
            tint = rng.uniform(0.55, 1.0, 3)  # bright on the darker background
            paste(canvas, resize_photo(photos[source], side), x0, y0, tint)
            items.append(Item(CATEGORIES[int(labels[source])], row, col,
                              (x0, y0, x0 + side, y0 + side), source))
    pixels = (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Scene(name, grid, tuple(items)), pixels


# ---- questions ------------------------------------------------------------------------------
def position_question(rng, scene: Scene) -> tuple[str, str]:
    row, col = (int(rng.integers(scene.grid)) for _ in range(2))
    item = scene.at(row, col)
    return f"what is in row {row + 1}, column {col + 1}?", item.category if item else "nothing"


MAX_COUNT = 4  # counts asked about stay in 0..4, so every split shares the count answers


def count_question(rng, scene: Scene) -> tuple[str, str]:
    askable = [c for c in CATEGORIES if scene.count(c) <= MAX_COUNT]  # never empty: <= 16 items
    present = [c for c in askable if scene.count(c)]
    # Half the time a category that is there, so counts above 0 are common.
    pool = present if present and rng.uniform() < 0.5 else askable
    c = pool[int(rng.integers(len(pool)))]
    return f"how many {PLURALS[CATEGORIES.index(c)]} are there?", str(scene.count(c))


def presence_question(rng, scene: Scene) -> tuple[str, str]:
    present = sorted({it.category for it in scene.items})
    absent = [c for c in CATEGORIES if c not in present]
    want_yes = bool(present) and (not absent or rng.uniform() < 0.5)
    pool = present if want_yes else absent
    c = pool[int(rng.integers(len(pool)))]
    return f"is there a {c}?", "yes" if scene.count(c) else "no"


def relative_question(rng, scene: Scene) -> tuple[str, str] | None:
    """About two categories that each appear once and differ along the asked axis; None when
    the scene has no such pair."""
    once = [it for it in scene.items if scene.count(it.category) == 1]
    pairs = [(a, b) for i, a in enumerate(once) for b in once[i + 1:]]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    if rng.uniform() < 0.5:
        a, b = b, a
    axes = [ax for ax in ("left", "above") if (a.col != b.col if ax == "left" else a.row != b.row)]
    axis = axes[int(rng.integers(len(axes)))]
    if axis == "left":
        return f"is the {a.category} left of the {b.category}?", "yes" if a.col < b.col else "no"
    return f"is the {a.category} above the {b.category}?", "yes" if a.row < b.row else "no"


QUESTIONS = {"position": position_question, "count": count_question,
             "presence": presence_question, "relative": relative_question}


def answer(scene: Scene, kind: str, question: str) -> str:
    """The answer to `question` from the scene's metadata alone (tests rebuild answers with it)."""
    words = question.rstrip("?").replace(",", "").split()
    if kind == "position":
        item = scene.at(int(words[4]) - 1, int(words[6]) - 1)
        return item.category if item else "nothing"
    if kind == "count":
        return str(scene.count(CATEGORIES[PLURALS.index(words[2])]))
    if kind == "presence":
        return "yes" if scene.count(words[3]) else "no"
    a = next(it for it in scene.items if it.category == words[2])
    b = next(it for it in scene.items if it.category == words[-1])
    return "yes" if (a.col < b.col if words[3] == "left" else a.row < b.row) else "no"


# ---- a split --------------------------------------------------------------------------------
def write_split(out: Path, split: str, num_scenes: int, seed: int, size: int, layout: str,
                questions_per_scene: int, root: Path = FASHION_MNIST_DIR,
                grids: tuple[int, int] = (2, 4)) -> int:
    """Write one split's images, questions and scene metadata; returns the question count."""
    from PIL import Image

    photos, labels = fashion_mnist(split, root)
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    stream = SPLITS[split][1]
    n_questions = 0
    with open(out / f"{split}.jsonl", "w") as qf, open(out / f"{split}_scenes.jsonl", "w") as sf:
        for index in range(num_scenes):
            rng = np.random.default_rng((seed, stream, index))
            name = f"images/{split}/{index:06d}.png"
            scene, pixels = make_scene(rng, photos, labels, size, layout, name, grids)
            Image.fromarray(pixels).save(out / name, optimize=False)
            sf.write(json.dumps({"image": name, "grid": scene.grid,
                                 "items": [asdict(it) for it in scene.items]}) + "\n")
            first = int(rng.integers(len(KINDS)))
            for q in range(questions_per_scene):
                kind = KINDS[(first + q) % len(KINDS)]
                made = QUESTIONS[kind](rng, scene)
                if made is None:  # no pair for a relative question: ask a presence one
                    kind, made = "presence", presence_question(rng, scene)
                question, ans = made
                qf.write(json.dumps({"id": f"{split}-{index:06d}-{q}", "image": name,
                                     "question": question, "answer": ans, "kind": kind}) + "\n")
                n_questions += 1
    return n_questions


def load_scenes(path: Path) -> dict[str, Scene]:
    """image -> Scene from a `*_scenes.jsonl` file."""
    scenes = {}
    for line in Path(path).read_text().splitlines():
        d = json.loads(line)
        items = tuple(Item(it["category"], it["row"], it["col"], tuple(it["box"]), it["source"])
                      for it in d["items"])
        scenes[d["image"]] = Scene(d["image"], d["grid"], items)
    return scenes


def parse_grid(text: str) -> tuple[int, int]:
    """"4" -> (4, 4), "2-4" -> (2, 4): the grid sides a scene may have."""
    lo, _, hi = text.partition("-")
    try:
        grids = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or LO-HI") from None
    if not 1 <= grids[0] <= grids[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= LO <= HI")
    return grids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="epruntime.data.scenes", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, required=True, help="training scenes")
    p.add_argument("--test", type=int, required=True, help="test scenes")
    p.add_argument("--questions", type=int, default=3, help="questions per scene")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--layout", choices=("grid", "jitter"), default="jitter",
                   help="grid: a photo fills its cell; jitter: scaled and placed freely in it")
    p.add_argument("--grid", type=parse_grid, default=(2, 4), metavar="N|LO-HI",
                   help="grid sides per scene (default 2-4); 4 with --size 64 makes every cell "
                        "one 16-pixel token")
    p.add_argument("--fashion-mnist", type=Path, default=FASHION_MNIST_DIR,
                   help="folder of the Fashion-MNIST idx files")
    args = p.parse_args(argv)
    for name in ("train", "test", "questions"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.size < 4 * args.grid[1]:
        p.error(f"--size must be >= {4 * args.grid[1]} (a {args.grid[1]}x{args.grid[1]} grid "
                "needs 4 pixels per cell at least)")
    try:
        counts = {split: write_split(args.out, split, n, args.seed, args.size, args.layout,
                                     args.questions, args.fashion_mnist, args.grid)
                  for split, n in (("train", args.train), ("test", args.test))}
    except FashionMnistMissing as err:
        print(f"epruntime.data.scenes: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} training and {counts['test']} test questions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
