"""The demo pool's concepts and how one instance of each is drawn.

About 300 concepts from four families: procedural shapes and textures on 18 palettes, handwritten
digits (scikit-learn's bundled 8x8 set, upscaled) and crops of scikit-image's bundled photos. Each
concept belongs to a super-concept (family x palette group, or source photo), so a curation can be
scored against a two-level ground truth. An instance is a pure function of (concept, seed, size).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Palette:
    name: str
    group: int
    fg: tuple[int, int, int]
    bg: tuple[int, int, int]
    bg_style: str  # flat | noise | grid | stripes


PALETTE_GROUPS = ("red", "blue", "green", "amber", "violet", "mono")
PALETTES = (
    Palette("red-cream", 0, (215, 35, 35), (245, 235, 215), "flat"),
    Palette("crimson-navy", 0, (200, 30, 70), (30, 40, 95), "noise"),
    Palette("vermilion-forest", 0, (240, 95, 40), (35, 85, 45), "grid"),
    Palette("blue-lemon", 1, (40, 80, 220), (250, 245, 190), "flat"),
    Palette("sky-maroon", 1, (40, 160, 235), (95, 25, 30), "noise"),
    Palette("indigo-mint", 1, (70, 55, 190), (195, 235, 205), "stripes"),
    Palette("green-lilac", 2, (40, 170, 60), (235, 220, 245), "noise"),
    Palette("lime-plum", 2, (130, 210, 40), (60, 25, 80), "flat"),
    Palette("teal-sand", 2, (20, 125, 105), (240, 205, 150), "grid"),
    Palette("yellow-slate", 3, (245, 205, 30), (45, 50, 70), "flat"),
    Palette("orange-ice", 3, (250, 140, 20), (180, 220, 250), "noise"),
    Palette("gold-purple", 3, (215, 175, 60), (110, 35, 120), "stripes"),
    Palette("violet-mint", 4, (150, 45, 200), (225, 250, 230), "flat"),
    Palette("pink-teal", 4, (240, 100, 180), (20, 70, 70), "noise"),
    Palette("purple-butter", 4, (100, 35, 140), (250, 225, 130), "grid"),
    Palette("white-charcoal", 5, (250, 250, 250), (30, 30, 35), "flat"),
    Palette("black-silver", 5, (20, 20, 20), (205, 205, 210), "noise"),
    Palette("grey-midnight", 5, (150, 150, 160), (15, 20, 50), "grid"),
)
SHAPE_KINDS = ("circle", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent")
TEXTURE_KINDS = ("stripes", "diagonal", "checker", "dots", "rings", "blobs")
DIGIT_PALETTES = (0, 3, 15)  # one palette from the red, blue and mono groups
PHOTO_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                 "immunohistochemistry")
PHOTO_REGIONS = ((0.3, 0.3, 0.45), (0.5, 0.6, 0.4), (0.72, 0.72, 0.45))  # centre x, y; side


@dataclass(frozen=True)
class Concept:
    id: int
    name: str
    family: str  # shape | texture | digit | photo
    super_concept: int
    kind: str  # shape kind, texture kind, digit, or source photo
    palette: int  # index into PALETTES, -1 for photos
    region: tuple[float, float, float] | None = None


def _build_concepts() -> tuple[Concept, ...]:
    out: list[Concept] = []

    def add(name: str, family: str, sup: int, kind: str, palette: int = -1,
            region: tuple[float, float, float] | None = None) -> None:
        out.append(Concept(len(out), name, family, sup, kind, palette, region))

    n_groups = len(PALETTE_GROUPS)
    for kind in SHAPE_KINDS:
        for p, pal in enumerate(PALETTES):
            add(f"shape-{kind}-{pal.name}", "shape", pal.group, kind, p)
    for kind in TEXTURE_KINDS:
        for p, pal in enumerate(PALETTES):
            add(f"texture-{kind}-{pal.name}", "texture", n_groups + pal.group, kind, p)
    for g, p in enumerate(DIGIT_PALETTES):
        for digit in range(10):
            add(f"digit-{digit}-{PALETTES[p].name}", "digit", 2 * n_groups + g, str(digit), p)
    first_photo_super = 2 * n_groups + len(DIGIT_PALETTES)
    for s, src in enumerate(PHOTO_SOURCES):
        for r, region in enumerate(PHOTO_REGIONS):
            add(f"photo-{src.replace('_', '')}-{r}", "photo", first_photo_super + s, src,
                region=region)
    return tuple(out)


CONCEPTS = _build_concepts()
N_CONCEPTS = len(CONCEPTS)
N_SUPER_CONCEPTS = len({c.super_concept for c in CONCEPTS})

# ---------------------------------------------------------------------------------- rendering


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled 8x8 digits, read straight from its data file: importing sklearn
    costs seconds in every worker process, the file costs milliseconds."""
    spec = importlib.util.find_spec("sklearn")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


@lru_cache(maxsize=len(PHOTO_SOURCES))
def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: float = 12.0
            ) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 255
                   ).astype(np.float32)


def _grid(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx, yy


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    small = Image.fromarray(rng.random((cells, cells), dtype=np.float32), mode="F")
    return np.clip(np.asarray(small.resize((w, h), Image.Resampling.BILINEAR)), 0.0, 1.0)


def _wave(xx: np.ndarray, yy: np.ndarray, angle: float, period: float, phase: float
          ) -> np.ndarray:
    return np.sin(2 * np.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)


def _background(pal: Palette, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    bg = _jitter(pal.bg, rng)
    if pal.bg_style == "flat":
        return np.broadcast_to(bg, (h, w, 3)).copy()
    if pal.bg_style == "noise":
        t = _smooth_noise(rng, w, h, 4) - 0.5
        return bg + t[..., None] * 80.0
    xx, yy = _grid(w, h)
    period = min(w, h) / rng.uniform(4.5, 6.5)
    if pal.bg_style == "stripes":
        t = _wave(xx, yy, rng.uniform(0, np.pi), period, rng.uniform(0, 2 * np.pi))
        return bg + t[..., None] * 30.0
    ox, oy = rng.uniform(0, period, 2)
    lines = ((xx + ox) % period < period * 0.12) | ((yy + oy) % period < period * 0.12)
    line_colour = bg * 0.6 + (255.0 - bg) * 0.4
    return np.where(lines[..., None], line_colour, bg)


_UNIT_POLYGONS = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(math.cos(a), math.sin(a)) for a in np.radians([90, 210, 330])],
    "hexagon": [(math.cos(a), math.sin(a)) for a in np.radians(np.arange(0, 360, 60))],
    "star": [((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45)
              * math.sin(a)) for k, a in enumerate(np.radians(np.arange(-90, 270, 36)))],
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
              (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
}


def _shape_alpha(kind: str, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Soft coverage in [0, 1], drawn at 2x and box-filtered for anti-aliased edges."""
    s = 2
    r = rng.uniform(0.28, 0.4) * min(w, h)
    cx = w / 2 + rng.uniform(-1, 1) * max(0.0, w / 2 - r) * 0.7
    cy = h / 2 + rng.uniform(-1, 1) * max(0.0, h / 2 - r) * 0.7
    theta = rng.uniform(0, 2 * np.pi)
    canvas = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(canvas)

    def disc(x: float, y: float, radius: float, fill: int) -> None:
        draw.ellipse([(x - radius) * s, (y - radius) * s, (x + radius) * s, (y + radius) * s],
                     fill=fill)

    if kind == "circle":
        disc(cx, cy, r, 255)
    elif kind == "ring":
        disc(cx, cy, r, 255)
        disc(cx, cy, 0.55 * r, 0)
    elif kind == "crescent":
        disc(cx, cy, r, 255)
        disc(cx + 0.45 * r * math.cos(theta), cy + 0.45 * r * math.sin(theta), 0.85 * r, 0)
    else:
        c, si = math.cos(theta), math.sin(theta)
        pts = [((cx + r * (x * c - y * si)) * s, (cy + r * (x * si + y * c)) * s)
               for x, y in _UNIT_POLYGONS[kind]]
        draw.polygon(pts, fill=255)
    small = canvas.resize((w, h), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def _digit_alpha(digit: int, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    images, targets = _digits()
    glyph = images[rng.choice(np.flatnonzero(targets == digit))]
    side = max(8, int(rng.uniform(0.6, 0.85) * min(w, h)))
    g = Image.fromarray(np.clip(glyph * 16.0, 0, 255).astype(np.uint8))
    g = g.resize((side, side), Image.Resampling.BICUBIC).rotate(rng.uniform(-12, 12),
                                                                 Image.Resampling.BILINEAR)
    canvas = Image.new("L", (w, h), 0)
    x = int((w - side) / 2 + rng.uniform(-0.5, 0.5) * (w - side))
    y = int((h - side) / 2 + rng.uniform(-0.5, 0.5) * (h - side))
    canvas.paste(g, (x, y))
    return np.asarray(canvas, np.float32) / 255.0


def _figure_on_ground(alpha: np.ndarray, pal: Palette, rng: np.random.Generator
                      ) -> np.ndarray:
    h, w = alpha.shape
    xx, yy = _grid(w, h)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - w / 2) * math.cos(angle) + (yy - h / 2) * math.sin(angle)) / max(w, h)
    fg = _jitter(pal.fg, rng) * (1.0 + 0.3 * ramp[..., None])
    a = alpha[..., None]
    return _background(pal, rng, w, h) * (1.0 - a) + fg * a


def _texture(kind: str, pal: Palette, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    xx, yy = _grid(w, h)
    period = min(w, h) / rng.uniform(4.0, 6.5)
    phase = rng.uniform(0, 2 * np.pi)
    tilt = rng.normal(0.0, 0.15)
    if kind == "stripes":
        t = np.tanh(3 * _wave(xx, yy, np.pi / 2 + tilt, period, phase))
    elif kind == "diagonal":
        t = np.tanh(3 * _wave(xx, yy, np.pi / 4 + tilt, period, phase))
    elif kind == "checker":
        t = np.tanh(4 * _wave(xx, yy, tilt, period, phase)
                    * _wave(xx, yy, tilt + np.pi / 2, period, phase))
    elif kind == "dots":
        t = np.tanh(4 * (_wave(xx, yy, tilt, period, phase)
                         + _wave(xx, yy, tilt + np.pi / 2, period, phase) - 1.0))
    elif kind == "rings":
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        t = np.tanh(3 * np.sin(2 * np.pi * np.hypot(xx - cx, yy - cy) / period + phase))
    else:  # blobs
        t = np.tanh(8 * (_smooth_noise(rng, w, h, 5) - 0.5))
    t = (0.5 + 0.5 * t)[..., None]
    return _jitter(pal.bg, rng) * (1.0 - t) + _jitter(pal.fg, rng) * t


def _photo_crop(concept: Concept, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    src = _photo(concept.kind)
    sw, sh = src.size
    cx, cy, frac = concept.region
    side = frac * min(sw, sh) * rng.uniform(0.9, 1.1)
    cw = min(sw, side * math.sqrt(w / h))
    ch = min(sh, side * math.sqrt(h / w))
    x0 = float(np.clip(cx * sw + rng.normal(0, 0.1) * min(sw, sh) - cw / 2, 0, sw - cw))
    y0 = float(np.clip(cy * sh + rng.normal(0, 0.1) * min(sw, sh) - ch / 2, 0, sh - ch))
    img = src.resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img, np.float32) * rng.uniform(0.9, 1.1)


def render_concept_image(concept_id: int, instance_seed: int, size: tuple[int, int]
                         ) -> tuple[Image.Image, np.ndarray]:
    """One instance of a concept at (width, height), and its uint8 class map
    (1 = object pixels of shapes and digits, 0 elsewhere; all zero for textures and photos)."""
    concept = CONCEPTS[concept_id]
    w, h = size
    rng = np.random.default_rng(instance_seed)
    mask = np.zeros((h, w), np.uint8)
    if concept.family in ("shape", "digit"):
        alpha = (_shape_alpha(concept.kind, rng, w, h) if concept.family == "shape"
                 else _digit_alpha(int(concept.kind), rng, w, h))
        rgb = _figure_on_ground(alpha, PALETTES[concept.palette], rng)
        mask[alpha > 0.5] = 1
    elif concept.family == "texture":
        rgb = _texture(concept.kind, PALETTES[concept.palette], rng, w, h)
    else:
        rgb = _photo_crop(concept, rng, w, h)
    # A smooth per-instance lighting field: distinct instances of a concept stay distinct images
    # (what copy detection must tell apart), while a near-duplicate keeps its original's field.
    light = np.stack([_smooth_noise(rng, w, h, 3) for _ in range(3)], axis=-1) - 0.5
    rgb = rgb * 0.75 + 32.0 + 64.0 * light + rng.standard_normal((h, w, 3), dtype=np.float32) * rng.uniform(1.5, 6.0)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB"), mask


def dense_probe_set(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` shape/digit concept images ``[n, size, size, 3]`` (uint8) and their object masks
    ``[n, size, size]``: patch-level ground truth for the trainer's dense probe."""
    rng = np.random.default_rng([seed, 2])
    concepts = [c.id for c in CONCEPTS if c.family in ("shape", "digit")]
    images, masks = [], []
    for _ in range(n):
        image, mask = render_concept_image(int(rng.choice(concepts)), int(rng.integers(2**63)), (size, size))
        images.append(np.asarray(image))
        masks.append(mask)
    return np.stack(images), np.stack(masks)
