"""A small offline dataset of drawn shapes, for the demo and the tests (no download needed).

Each class is a shape (circle, square, triangle, cross, ring, bar) drawn with a random colour,
size, position and rotation on a noisy background, so a model has to learn the shape, not a
colour. `python -m train.synthetic DIR` writes DIR/train and DIR/test as class folders.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")


def _polygon(cx, cy, r, sides, angle):
    return [(cx + r * math.cos(angle + 2 * math.pi * i / sides), cy + r * math.sin(angle + 2 * math.pi * i / sides))
            for i in range(sides)]


def draw(shape: str, size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    # Not Image.effect_noise: it draws from C's rand(), so the same seed gave other images on a
    # second call in one process.
    sigma = rng.uniform(10, 40)
    noise_rng = np.random.default_rng(rng.randrange(2**32))
    noise = Image.fromarray(noise_rng.normal(128, sigma, (size, size)).clip(0, 255).astype(np.uint8)).convert("RGB")
    img = Image.blend(img, noise, 0.25)
    d = ImageDraw.Draw(img)
    fg = tuple((c + rng.randint(90, 166)) % 256 for c in bg)
    r = size * rng.uniform(0.18, 0.32)
    cx, cy = (rng.uniform(r + 2, size - r - 2) for _ in range(2))
    angle = rng.uniform(0, math.pi)
    width = max(2, int(r * 0.35))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=width)
    elif shape == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, angle), fill=fg)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.2, 3, angle), fill=fg)
    elif shape == "cross":
        for a in (angle, angle + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=fg, width=width)
    elif shape == "bar":
        dx, dy = 1.3 * r * math.cos(angle), 1.3 * r * math.sin(angle)
        d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=fg, width=width)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def make_dataset(root: Path, per_class: int = 60, size: int = 64, classes: int = len(SHAPES),
                 test_per_class: int = 0, seed: int = 0) -> dict[str, Path]:
    """Write root/train/<shape>/*.jpg (and root/test when test_per_class) and return the folders."""
    rng = random.Random(seed)
    made = {}
    for split, count in (("train", per_class), ("test", test_per_class)):
        if count <= 0:
            continue
        for shape in SHAPES[:classes]:
            folder = Path(root) / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw(shape, size, rng).save(folder / f"{shape}_{i:04d}.jpg", quality=90)
        made[split] = Path(root) / split
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=len(SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    made = make_dataset(args.root, args.per_class, args.size, args.classes, args.test_per_class, args.seed)
    print(" ".join(f"{k}={v}" for k, v in made.items()))


if __name__ == "__main__":
    main()
