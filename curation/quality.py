"""Cheap per-image quality signals, from the image ingest already decodes.

The signals the curation tools our users compare us with filter on (DataComp: size and aspect;
cleanvision and fastdup: blurry, dark, over-exposed, low-information), measured on a small grey
thumbnail, where they add about 7 % to ingest's per-image work on the demo pool
(``benchmarks/quality_filter.py``):

- ``min_side`` and ``aspect`` (longer side / shorter side, >= 1) of the image as displayed;
- ``sharpness``: variance of the Laplacian of the grey thumbnail (0..255 levels); blur removes the
  high frequencies the Laplacian responds to. It depends on the thumbnail's scale, so values are
  comparable across images of any size but not with figures measured on full-resolution images;
- ``dark_fraction`` / ``bright_fraction``: share of thumbnail pixels at most `DARK_LEVEL` / at least
  `BRIGHT_LEVEL` grey;
- ``colour_entropy``: Shannon entropy (bits, 0..9) of the thumbnail's colours quantised to 8 levels per
  channel; a flat or two-colour image scores near 0;
- ``nearly_constant``: grey standard deviation below `CONSTANT_STD` levels (a blank or single-colour
  image, whatever its compression noise).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image

THUMB_SIDE = 64  # longer side of the thumbnail the pixel signals are measured on (never upscaled)
DARK_LEVEL, BRIGHT_LEVEL = 24, 232
CONSTANT_STD = 3.0
COLOUR_BITS = 3  # per channel: 8 levels, 512 colour bins


class QualitySignals(NamedTuple):
    """One image's signals; the field names are the ``pool`` columns (``catalog.schemas.QUALITY_COLUMNS``)."""

    min_side: int
    aspect: float
    sharpness: float
    dark_fraction: float
    bright_fraction: float
    colour_entropy: float
    nearly_constant: bool


def thumbnail(img: Image.Image, side: int = THUMB_SIDE) -> np.ndarray:
    """RGB uint8 ``[h, w, 3]`` with the longer side at most ``side``: an integer box reduction (PIL's
    ``reduce``, about 3x cheaper than a resize to an exact size), never upscaled."""
    factor = math.ceil(max(img.size) / side)
    small = img.reduce(factor) if factor > 1 else img
    return np.asarray(small if small.mode == "RGB" else small.convert("RGB"))


def colour_entropy(rgb: np.ndarray) -> float:
    """Entropy in bits of the colours of ``rgb [h, w, 3]`` quantised to `COLOUR_BITS` bits per channel."""
    q = (rgb >> (8 - COLOUR_BITS)).astype(np.uint16)
    codes = (q[..., 0] << (2 * COLOUR_BITS)) | (q[..., 1] << COLOUR_BITS) | q[..., 2]
    p = np.bincount(codes.ravel(), minlength=1 << (3 * COLOUR_BITS)) / codes.size
    p = p[p > 0]
    return max(0.0, float(-(p * np.log2(p)).sum()))  # never -0.0


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels (0 for an image under 3 px a side).

    Written as array slices: on a thumbnail this small, ``scipy.ndimage.laplace`` costs about 3x as much, in
    call overhead rather than arithmetic."""
    if min(grey.shape) < 3:
        return 0.0
    g = grey.astype(np.float32, copy=False)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def quality_signals(img: Image.Image, width: int, height: int) -> QualitySignals:
    """The signals of one decoded image; ``width``/``height``: its displayed size (the decode may be a draft)."""
    rgb = thumbnail(img)
    grey = rgb.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
    short, long = sorted((int(width), int(height)))
    sharpness = laplacian_variance(grey)
    return QualitySignals(
        min_side=short,
        aspect=long / max(short, 1),
        sharpness=sharpness,
        dark_fraction=float((grey <= DARK_LEVEL).mean()),
        bright_fraction=float((grey >= BRIGHT_LEVEL).mean()),
        colour_entropy=colour_entropy(rgb),
        nearly_constant=bool(grey.std() < CONSTANT_STD),
    )


class Rule(NamedTuple):
    """A filter rule: an image is removed when ``column`` is ``op`` the threshold (``<`` or ``>``; for a
    boolean column, when it is true)."""

    name: str  # the errors reason is ``filtered:<name>``
    column: str
    op: str


# In the order they are checked: an image removed by several is recorded under the first.
RULES = (
    Rule("constant", "nearly_constant", "is"),
    Rule("small", "min_side", "<"),
    Rule("aspect", "aspect", ">"),
    Rule("blurry", "sharpness", "<"),
    Rule("dark", "dark_fraction", ">"),
    Rule("bright", "bright_fraction", ">"),
    Rule("flat", "colour_entropy", "<"),
)


def first_failed_rule(columns: dict[str, np.ndarray], thresholds: dict[str, float | bool | None]) -> np.ndarray:
    """Per image, the index into `RULES` of the first rule it fails, or -1.

    ``columns``: the signal columns (equal length); ``thresholds``: rule name -> threshold, None (or
    False for ``constant``) switches a rule off.
    """
    n = len(next(iter(columns.values()))) if columns else 0
    failed = np.full(n, -1, np.int64)
    for i, rule in reversed(list(enumerate(RULES))):
        limit = thresholds.get(rule.name)
        if limit is None or limit is False:
            continue
        values = columns[rule.column]
        hit = values.astype(bool) if rule.op == "is" else (values < limit if rule.op == "<" else values > limit)
        failed[hit] = i
    return failed
