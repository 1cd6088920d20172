"""The built-in "shapes" dataset: procedurally drawn, captioned images.

Every example is a single coloured shape on a background, with a caption drawn
from many templates ("a small red triangle in the top left corner", "an image
of a blue star on a white background", ...) and structured labels (shape,
colour, size, position, background) as strings and integer ids. It needs no
download, renders at any resolution, and is small enough to train CLIP or
DALL·E end to end on a CPU, which makes it the project's smoke-test and demo set.

Determinism: example `i` of a split is a pure function of `(config, split, i)`,
drawn from its own `np.random.default_rng((seed, split_id, i))`, so the
dataset is a random-access source (grain `RandomAccessDataSource`) that gives
the same pixels in any access order, on any host, in any worker.

Compositional generalisation: a fixed subset of colour-shape combinations
(`heldout_combinations`) never appears in "train" or "validation" and is the
only content of "heldout", so zero-shot accuracy on "heldout" measures whether
a model composes colour and shape rather than memorising pairs.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from typing import Any, SupportsIndex

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon")

# Named colours, chosen to be far apart in RGB so that a name maps to one look.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
    "pink": (245, 130, 190),
    "cyan": (40, 210, 220),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (130, 75, 30),
}
COLORS = tuple(COLOR_RGB)

# Circumradius of the shape as a fraction of the image side, per size name.
SIZE_RADIUS: dict[str, tuple[float, float]] = {
    "small": (0.10, 0.13),
    "medium": (0.17, 0.21),
    "large": (0.25, 0.29),
}
SIZES = tuple(SIZE_RADIUS)

# Row-major 3x3 grid: name -> (column, row, phrase used in captions).
POSITION_GRID: dict[str, tuple[int, int, str]] = {
    "top left corner": (0, 0, "in the top left corner"),
    "top center": (1, 0, "at the top"),
    "top right corner": (2, 0, "in the top right corner"),
    "center left": (0, 1, "on the left"),
    "center": (1, 1, "in the center"),
    "center right": (2, 1, "on the right"),
    "bottom left corner": (0, 2, "in the bottom left corner"),
    "bottom center": (1, 2, "at the bottom"),
    "bottom right corner": (2, 2, "in the bottom right corner"),
}
POSITIONS = tuple(POSITION_GRID)

BACKGROUND_STYLES = ("plain", "gradient", "noise")
SPLITS = ("train", "validation", "heldout")

# Every template names the colour and the shape; the others vary what else is said.
CAPTION_TEMPLATES = (
    "a {color} {shape}",
    "{color} {shape}",
    "a {size} {color} {shape}",
    "a {color} {shape} {where}",
    "a {size} {color} {shape} {where}",
    "an image of a {color} {shape} on a {background} background",
    "a photo of a {size} {color} {shape}",
    "a {color} {shape} on a {background} background",
    "a {size} {color} {shape} {where} on a {background} background",
    "there is a {color} {shape} {where}",
    "a drawing of a {size} {color} {shape}",
    "a {background} background with a {color} {shape} {where}",
    "a {size} {shape} in {color}",
    "a simple picture of a {color} {shape} against a {background} backdrop",
    "{where} there is a {size} {color} {shape}",
    "a {size} {shape} that is {color}",
    "a {color} {shape} drawn {where} of the image",
    "one {size} {color} {shape}, {where}",
)

_GRADIENT_STRENGTH = 0.35  # how far a gradient background blends towards mid-gray
_NOISE_STD = 12.0  # per-pixel std of a noise background, in 0-255 units
_POSITION_MARGIN = 0.03  # gap between the shape's circumcircle and the border, fraction of side
_POSITION_JITTER = 0.12  # random offset within a grid cell, fraction of the cell spacing


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """How the shapes dataset is drawn. Equal configs give identical datasets."""

    image_size: int = 64  # output side in pixels (square images)
    seed: int = 0  # seeds every example: (seed, split, index) -> one image
    supersample: int = 4  # draw at this multiple, box-filter down: antialiased edges
    heldout_fraction: float = 0.2  # fraction of colour-shape combinations kept out of training
    heldout_seed: int = 0  # which combinations are held out; independent of `seed`
    background_styles: tuple[str, ...] = BACKGROUND_STYLES  # sampled uniformly per example
    max_rotation: float = 10.0  # degrees; small, so a square never turns into a diamond
    min_contrast: float = 100.0  # minimum RGB distance between shape and background colours

    def __post_init__(self):
        if self.image_size < 8:
            raise ValueError(f"Expected image_size >= 8 pixels, found {self.image_size}.")
        if self.supersample < 1:
            raise ValueError(f"Expected supersample >= 1, found {self.supersample}.")
        if not 0.0 < self.heldout_fraction <= 0.5:
            raise ValueError("Expected 0 < heldout_fraction <= 0.5 so that every colour and shape "
                             f"stays in training, found {self.heldout_fraction}.")
        unknown = set(self.background_styles) - set(BACKGROUND_STYLES)
        if not self.background_styles or unknown:
            raise ValueError(f"Expected background_styles from {BACKGROUND_STYLES}, "
                             f"found {self.background_styles}.")


def heldout_combinations(config: ShapesConfig = ShapesConfig()) -> frozenset[tuple[str, str]]:
    """The (colour, shape) pairs that appear only in the "heldout" split.

    With C colours and S shapes, `n = round(heldout_fraction * C * S)` pairs laid
    out as a balanced design: pair t is (colour t mod C, shape (t + t // lcm(C, S))
    mod S) under a random relabelling of colours and shapes. The pairs are
    distinct, every colour loses floor or ceil(n / C) shapes and every shape
    floor or ceil(n / S) colours, so all of them keep most of their pairs in
    training. The choice depends only on `heldout_fraction` and
    `heldout_seed`, never on `seed`.
    """
    n_colors, n_shapes = len(COLORS), len(SHAPES)
    n = max(1, round(config.heldout_fraction * n_colors * n_shapes))
    rng = np.random.default_rng(config.heldout_seed)
    colors, shapes = rng.permutation(n_colors), rng.permutation(n_shapes)
    block = math.lcm(n_colors, n_shapes)
    return frozenset((COLORS[colors[t % n_colors]], SHAPES[shapes[(t + t // block) % n_shapes]])
                     for t in range(n))


def _unit_polygons() -> dict[str, np.ndarray]:
    """Vertices (K, 2) of each shape inside the unit circle, y pointing down."""

    def ring(k, radius, start_deg):
        angles = np.deg2rad(start_deg + 360.0 * np.arange(k) / k)
        return np.stack([np.cos(angles), np.sin(angles)], -1) * np.asarray(radius)[..., None]

    star = ring(10, np.tile([1.0, 0.42], 5), -90.0)
    triangle = ring(3, np.ones(3), -90.0)
    arm, reach = 0.3, 0.9
    cross = np.array([(-arm, -reach), (arm, -reach), (arm, -arm), (reach, -arm), (reach, arm),
                      (arm, arm), (arm, reach), (-arm, reach), (-arm, arm), (-reach, arm),
                      (-reach, -arm), (-arm, -arm)])
    t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)  # the classic heart curve
    heart = np.stack([16 * np.sin(t) ** 3,
                      -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], -1)
    polygons = {
        "square": np.array([(-0.72, -0.72), (0.72, -0.72), (0.72, 0.72), (-0.72, 0.72)]),
        "triangle": triangle,
        "star": star,
        "cross": cross,
        "heart": heart,
        "diamond": np.array([(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)]),
        "hexagon": ring(6, np.ones(6), 0.0) * 0.9,
    }
    # Centre each outline on its bounding box so positions mean the same for all shapes.
    for name, pts in polygons.items():
        pts = pts - (pts.max(0) + pts.min(0)) / 2
        polygons[name] = pts / max(1.0, np.linalg.norm(pts, axis=-1).max())
    return polygons


_POLYGONS = _unit_polygons()
_CIRCLE_RADIUS = 0.85  # visually balances the circle against the polygons


def _background(name: str, style: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (size, size, 3) background in 0-255 of the named colour."""
    base = np.asarray(COLOR_RGB[name], np.float32)
    if style == "plain":
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if style == "gradient":
        angle = rng.uniform(0.0, 2.0 * np.pi)
        yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
        ramp = np.clip(xx * np.cos(angle) + yy * np.sin(angle) + 0.5, 0.0, 1.0)[..., None]
        return base + (128.0 - base) * (_GRADIENT_STRENGTH * ramp)
    noise = rng.normal(0.0, _NOISE_STD, (size, size, 3)).astype(np.float32)
    return np.clip(base + noise, 0.0, 255.0)


def _shape_coverage(shape: str, center: tuple[float, float], radius: float, rotation: float,
                    size: int, supersample: int) -> np.ndarray:
    """float32 (size, size, 1) fraction of each pixel covered by the shape, in [0, 1]."""
    k = supersample
    mask = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = center
    if shape == "circle":
        r = _CIRCLE_RADIUS * radius
        # PIL pixel (i, j) is centred on integer coordinates; ours on half-integers.
        draw.ellipse([(cx - r) * k - 0.5, (cy - r) * k - 0.5, (cx + r) * k - 0.5, (cy + r) * k - 0.5],
                     fill=255)
    else:
        theta = np.deg2rad(rotation)
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        pts = (_POLYGONS[shape] @ rot.T * radius + (cx, cy)) * k - 0.5  # (K, 2)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    if k > 1:
        mask = mask.reduce(k)  # box filter: exact area coverage of each output pixel
    return np.asarray(mask, np.float32)[..., None] / 255.0


def _article(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


class ShapesDataset:
    """Random-access captioned shapes: `len(ds)`, `ds[i] -> dict`.

    Each item holds `image` (uint8 (S, S, 3)), `caption` (str), and for each
    of shape, color, size, position, background (a colour name) and
    background_style the label string under that key and its index into
    `SHAPES` / `COLORS` / `SIZES` / `POSITIONS` / `COLORS` /
    `BACKGROUND_STYLES` under `<key>_id`.

    Splits: "train" and "validation" draw from the same colour-shape pairs
    (with independent randomness); "heldout" draws only from
    `heldout_combinations(config)`, which the other two never contain.
    """

    def __init__(self, split: str = "train", num_examples: int = 10_000,
                 config: ShapesConfig = ShapesConfig()):
        if split not in SPLITS:
            raise ValueError(f"Expected split in {SPLITS}, found {split!r}.")
        if num_examples < 0:
            raise ValueError(f"Expected num_examples >= 0, found {num_examples}.")
        self.split, self.num_examples, self.config = split, num_examples, config
        heldout = heldout_combinations(config)
        self.combinations = tuple(
            (c, s) for c in COLORS for s in SHAPES if ((c, s) in heldout) == (split == "heldout"))
        self._backgrounds = {
            c: tuple(b for b in COLORS if math.dist(COLOR_RGB[b], COLOR_RGB[c]) >= config.min_contrast)
            for c in COLORS}
        empty = [c for c, options in self._backgrounds.items() if not options]
        if empty:
            raise ValueError(f"min_contrast={config.min_contrast} leaves no background colour for "
                             f"{empty}; lower it (default 100).")

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return f"ShapesDataset(split={self.split!r}, num_examples={self.num_examples}, config={self.config})"

    def __getitem__(self, index: SupportsIndex) -> dict[str, Any]:
        index = operator.index(index)
        if index < 0:
            index += self.num_examples
        if not 0 <= index < self.num_examples:
            raise IndexError(f"Index {index} out of range for a split of {self.num_examples} examples.")
        cfg, size_px = self.config, self.config.image_size
        rng = np.random.default_rng((cfg.seed, SPLITS.index(self.split), index))

        color, shape = self.combinations[rng.integers(len(self.combinations))]
        size = SIZES[rng.integers(len(SIZES))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        options = self._backgrounds[color]
        background = options[rng.integers(len(options))]
        style = cfg.background_styles[rng.integers(len(cfg.background_styles))]
        template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]

        radius = rng.uniform(*SIZE_RADIUS[size]) * size_px
        lo = radius + _POSITION_MARGIN * size_px
        spacing = (size_px - 2 * lo) / 2  # distance between neighbouring grid cells
        col, row, where = POSITION_GRID[position]
        cx, cy = (float(np.clip(lo + cell * spacing + rng.uniform(-1, 1) * _POSITION_JITTER * spacing,
                                lo, size_px - lo)) for cell in (col, row))
        rotation = rng.uniform(-cfg.max_rotation, cfg.max_rotation)

        bg = _background(background, style, size_px, rng)  # (S, S, 3)
        alpha = _shape_coverage(shape, (cx, cy), radius, rotation, size_px, cfg.supersample)
        image = bg + (np.asarray(COLOR_RGB[color], np.float32) - bg) * alpha
        caption = _article(template.format(color=color, shape=shape, size=size, where=where,
                                           background=background))
        return {
            "image": np.round(image).astype(np.uint8),
            "caption": caption,
            "shape": shape, "shape_id": SHAPES.index(shape),
            "color": color, "color_id": COLORS.index(color),
            "size": size, "size_id": SIZES.index(size),
            "position": position, "position_id": POSITIONS.index(position),
            "background": background, "background_id": COLORS.index(background),
            "background_style": style, "background_style_id": BACKGROUND_STYLES.index(style),
        }
