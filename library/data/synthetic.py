"""Small generated datasets (coloured shapes with captions) for the demo, tests and benchmarks.

Each image shows one shape whose colour, kind and position are in its caption; an optional conditioning image is
the shape's white silhouette on black, so the conditioning decides the layout (what ControlNet-LLLite must learn).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


@dataclass
class ShapeSample:
    name: str
    caption: str
    size: tuple[int, int]
    box: tuple[int, int, int, int]


def draw_shape(size: tuple[int, int], box: tuple[int, int, int, int], shape: str, fill: tuple[int, int, int],
               background: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=fill)
    return img


def make_shapes_dataset(image_dir: str, n: int, sizes: list[tuple[int, int]] | None = None, seed: int = 0,
                        conditioning_dir: str | None = None, caption_extension: str = ".txt") -> list[ShapeSample]:
    """Write n images (cycling through `sizes`), one caption file each, and optionally conditioning images."""
    rng = random.Random(seed)
    sizes = sizes or [(64, 64)]
    os.makedirs(image_dir, exist_ok=True)
    if conditioning_dir:
        os.makedirs(conditioning_dir, exist_ok=True)
    samples = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        colour = rng.choice(list(COLOURS))
        shape = rng.choice(SHAPES)
        side = max(8, min(w, h) // 3)
        x0, y0 = rng.randrange(0, w - side), rng.randrange(0, h - side)
        box = (x0, y0, x0 + side, y0 + side)
        where = ("left" if x0 + side / 2 < w / 2 else "right")
        caption = f"a {colour} {shape} on the {where}"
        name = f"img_{i:04d}"
        background = tuple(int(v) for v in np.clip(np.array([235, 235, 235]) + rng.randint(-10, 10), 0, 255))
        draw_shape((w, h), box, shape, COLOURS[colour], background).save(os.path.join(image_dir, name + ".png"))
        with open(os.path.join(image_dir, name + caption_extension), "w", encoding="utf-8") as f:
            f.write(caption)
        if conditioning_dir:
            draw_shape((w, h), box, shape, (255, 255, 255), (0, 0, 0)).save(
                os.path.join(conditioning_dir, name + ".png"))
        samples.append(ShapeSample(name, caption, (w, h), box))
    return samples
