"""Deterministic synthetic "shapes world" scenes.

A scene is 1-4 coloured shapes placed in distinct cells of a 3x3 layout on a
light, slightly noisy background.  ``make_scene(seed)`` always returns the same
pixels and the same ground truth for the same seed (numpy PCG64 + PIL drawing,
no global random state).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "middle", "right")

RGB = {
    "red": (214, 34, 34),
    "green": (34, 160, 56),
    "blue": (36, 78, 218),
    "yellow": (236, 212, 28),
    "purple": (138, 52, 188),
    "orange": (246, 136, 22),
}

IMAGE_SIZE = 64  # native resolution the model sees
_SUPER = 4  # supersampling factor for anti-aliased edges
MAX_OBJECTS = 4
# half-extent of a shape, in native pixels
_RADIUS = {"small": 5.4, "large": 8.6}
_JITTER = 1.0  # max centre offset inside a cell, native pixels
_NOISE_STD = 6.0  # per-pixel background/shape noise (0-255 scale)
_COLOR_JITTER = 14  # per-object RGB jitter


def position_name(row: int, col: int) -> str:
    """Canonical name of a layout cell: 'top left', 'middle right', 'center', ..."""
    if row == 1 and col == 1:
        return "center"
    return f"{ROWS[row]} {COLS[col]}"


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int  # 0 = top
    col: int  # 0 = left
    x: float  # centre in native pixels
    y: float

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)

    @property
    def name(self) -> str:
        """Unique referring expression inside a scene (color+shape is unique)."""
        return f"{self.color} {self.shape}"

    def describe(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at {self.position}"


@dataclass
class Scene:
    seed: int
    objects: list[SceneObject]  # canonical order: row-major by cell
    background: tuple[int, int, int]
    image: Image.Image = field(repr=False)

    def truth(self) -> dict:
        """Plain-data ground truth (JSON friendly)."""
        return {
            "seed": self.seed,
            "background": list(self.background),
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "row": o.row,
                 "col": o.col, "position": o.position, "x": round(o.x, 3), "y": round(o.y, 3)}
                for o in self.objects
            ],
        }

    def find(self, shape: str | None = None, color: str | None = None) -> list[SceneObject]:
        return [o for o in self.objects
                if (shape is None or o.shape == shape) and (color is None or o.color == color)]


def _sample_objects(rng: np.random.Generator, n_objects: int | None) -> list[SceneObject]:
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else int(n_objects)
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n}")
    cells = rng.permutation(9)[:n]
    combos = rng.permutation(len(SHAPES) * len(COLORS))[:n]  # distinct (shape, color)
    cell = IMAGE_SIZE / 3.0
    objs = []
    for c, k in zip(cells, combos):
        row, col = divmod(int(c), 3)
        shape = SHAPES[int(k) % len(SHAPES)]
        color = COLORS[int(k) // len(SHAPES)]
        size = SIZES[int(rng.integers(0, 2))]
        jx, jy = rng.uniform(-_JITTER, _JITTER, size=2)
        objs.append(SceneObject(shape, color, size, row, col,
                                float((col + 0.5) * cell + jx), float((row + 0.5) * cell + jy)))
    objs.sort(key=lambda o: (o.row, o.col))
    return objs


def _draw(objs: list[SceneObject], background: tuple[int, int, int],
          rng: np.random.Generator) -> Image.Image:
    s = _SUPER
    big = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), background)
    draw = ImageDraw.Draw(big)
    for o in objs:
        base = np.array(RGB[o.color])
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, 3), 0, 255))
        r = _RADIUS[o.size] * s
        cx, cy = o.x * s, o.y * s
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            h = r * 0.88
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:  # upward equilateral-ish triangle
            h = r * 1.12
            draw.polygon([(cx, cy - h), (cx - h * 0.98, cy + h * 0.78), (cx + h * 0.98, cy + h * 0.78)],
                         fill=fill)
    small = big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    arr = np.asarray(small).astype(np.float32)
    arr += rng.normal(0.0, _NOISE_STD, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def make_scene(seed: int, n_objects: int | None = None) -> Scene:
    """Render the scene for ``seed`` (same seed -> identical pixels and truth)."""
    seed = int(seed)
    if seed < 0:
        raise ValueError("seed must be non-negative")
    rng = np.random.default_rng(seed)
    objs = _sample_objects(rng, n_objects)
    g = int(rng.integers(196, 238))
    tint = rng.integers(-8, 9, 3)
    background = tuple(int(v) for v in np.clip(g + tint, 0, 255))
    image = _draw(objs, background, rng)
    return Scene(seed=seed, objects=objs, background=background, image=image)


def blank_image(color: tuple[int, int, int] = (216, 216, 216)) -> Image.Image:
    """A plain background with no objects (used for the blind check)."""
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), color)
