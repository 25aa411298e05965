"""Small synthetic image sets with known copies, for measuring copy detection (tests and benchmarks).

* `copy_variants`: what a web pool does to an image it holds twice: mirrored, cropped a little,
  colour-shifted, re-encoded as JPEG, or several at once.
* `look_alike_glyphs`: distinct images that a weak copy descriptor merges: letters whose lower and
  upper case share a shape (w/W, x/X, ...), digits, and coins that differ only in their value.
  Mirror-image letter pairs (b/d, p/q) are left out on purpose: a descriptor robust to flips must
  call them copies, as SSCD-style copy detectors (trained with flips) do.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

Variant = Callable[[Image.Image, np.random.Generator], Image.Image]

LETTER_PAIRS = "cCoOsSuUvVwWxXzZkKpP"
DIGITS = "0123456789"
COIN_VALUES = ("1", "2", "5", "10", "20", "25", "50", "100")


def flip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(img)


def crop(img: Image.Image, rng: np.random.Generator, most: float = 0.06) -> Image.Image:
    """Cut up to ``most`` of the width/height off each side."""
    w, h = img.size
    left, right = rng.uniform(0, most, 2) * w
    top, bottom = rng.uniform(0, most, 2) * h
    return img.crop((round(left), round(top), w - round(right), h - round(bottom)))


def jitter(img: Image.Image, rng: np.random.Generator, most: float = 0.2) -> Image.Image:
    """Brightness, contrast and saturation each scaled by up to ±``most``."""
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(1 - most, 1 + most)))
    return img


def reencode(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A JPEG round trip at quality 45-75 (chroma subsampled, blocky)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=int(rng.integers(45, 76)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def resize(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    f = float(rng.uniform(0.6, 1.4))
    return img.resize((max(8, round(img.width * f)), max(8, round(img.height * f))), Image.Resampling.BICUBIC)


def combined(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return reencode(jitter(crop(flip(img, rng), rng), rng), rng)


VARIANTS: dict[str, Variant] = {"flip": flip, "crop": crop, "jitter": jitter, "reencode": reencode,
                                "resize": resize, "flip+crop+jitter+reencode": combined}


def copy_variants(img: Image.Image, rng: np.random.Generator, kinds: tuple[str, ...] = tuple(VARIANTS)
                  ) -> list[tuple[str, Image.Image]]:
    """One copy of ``img`` per variant kind."""
    return [(kind, VARIANTS[kind](img, rng)) for kind in kinds]


def random_scene(rng: np.random.Generator, width: int = 96, height: int = 80) -> Image.Image:
    """A distinct photo-like image: a smooth random colour field, a shape, and sometimes stripes."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    field = np.zeros((height, width, 3))
    for _ in range(4):
        fy, fx = rng.uniform(0.5, 3.0, 2)
        field += rng.uniform(-1, 1, 3) * np.cos(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))[..., None]
    rgb = 128 + 40 * field
    if rng.random() < 0.5:
        period, angle = rng.uniform(4, 10), rng.uniform(0, np.pi)
        rgb += 30 * np.sign(np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) * width / period))[..., None]
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    x0, y0 = rng.uniform(0.1, 0.5, 2) * (width, height)
    x1, y1 = (x0, y0) + rng.uniform(0.2, 0.45, 2) * (width, height)
    shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
    shape((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _centred_text(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, size: int,
                  fill: tuple[int, int, int], stroke: int = 0) -> None:
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    x = (box[0] + box[2] - (right - left)) / 2 - left
    y = (box[1] + box[3]) / 2 - (bottom - top) / 2 - top
    draw.text((x, y), text, font=font, fill=fill, stroke_width=stroke, stroke_fill=fill)


def glyph(text: str, side: int = 48) -> Image.Image:
    """One character on a plain square, placed on a common baseline (so w and W differ in height)."""
    img = Image.new("RGB", (side, side), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    font = _font(int(side * 0.8))
    _, top, _, bottom = draw.textbbox((0, 0), "Hg", font=font)
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    draw.text(((side - (right - left)) / 2 - left, (side - (bottom - top)) / 2 - top), text, font=font,
              fill=(20, 20, 30))
    return img


def coin(value: str, side: int = 48) -> Image.Image:
    """A gold disc with its value in bold in the middle, as coin icons show it: the same disc for
    every value, so coins differ only in their numerals."""
    img = Image.new("RGB", (side, side), (235, 238, 240))
    draw = ImageDraw.Draw(img)
    m = side // 12
    draw.ellipse((m, m, side - m, side - m), fill=(215, 175, 70), outline=(140, 105, 30), width=max(1, side // 24))
    _centred_text(draw, (m, m, side - m, side - m), value, int(side * (0.5 if len(value) < 3 else 0.36)),
                  (70, 45, 10), stroke=side // 48)
    return img


def look_alike_glyphs(side: int = 48) -> list[tuple[str, Image.Image]]:
    """(name, image) of distinct look-alike glyphs: case pairs, digits and coins of every value."""
    out = [(f"letter:{c}", glyph(c, side)) for c in LETTER_PAIRS]
    out += [(f"digit:{c}", glyph(c, side)) for c in DIGITS]
    out += [(f"coin:{v}", coin(v, side)) for v in COIN_VALUES]
    return out
