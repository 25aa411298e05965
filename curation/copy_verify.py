"""Pixel-level verification of copy candidates: align two small grey thumbnails, then look for the
one place where they differ.

The pixel descriptor (`curation.copy_descriptor`) pools gradients over 8-pixel cells, which is what
makes it tolerant of crops, and also what makes it blind to a small detail: c/o, 0/O, w/W, or two
coins that differ in one numeral reach its copy threshold. Each pair it proposes is therefore
checked here, at 32×32 grey:

1. **alignment**: the affine map that a crop of up to ~6 % a side (and a resize, which changes
   nothing in frame coordinates) implies, a scale and a shift per axis, plus a gain and an offset of
   the grey level (brightness, contrast), fitted by Gauss-Newton on blurred thumbnails, coarse then
   fine (mirrored first where the pair met as mirror images). Warping is separable (a row and a column interpolation matrix).
2. **scale check**: the fitted scale must lie in the range a crop can cause (`COPY_SCALES`). A lower-
   case letter is its capital shrunk by ~0.7 and a digit 0 a narrowed O: the fit finds that scale,
   and it is not a copy's.
3. **local residual**: the absolute difference of the aligned thumbnails, in units of the first
   one's grey standard deviation, averaged over 3×3 pixels; its maximum over the overlap is the
   pair's residual. A copy differs a little everywhere (re-encoding, resampling); two look-alikes
   differ a lot in one place (the missing stroke, the other numeral). Both thumbnails are blurred to
   the resolution of the smaller image first, so a 20-pixel copy is not held to 32-pixel detail; the
   blur shrinks a look-alike's residual too, so a pair with an image under ``SMALL_SIDE`` is held to
   a stricter one.
4. **colour field**: the same alignment applied to the colour thumbnails, then the best global
   affine colour map from B to A (brightness, contrast, saturation and white balance are global and
   linear); what it leaves, low-passed, is a difference in the slowly varying colour and lighting
   field across the frame. A copy keeps its original's field; two photos of one textured scene or two
   instances of a periodic texture (stripes in another phase, which a shift aligns in grey) do not.
   Its RMS over the frame, in units of full scale, is the pair's colour residual.

Thresholds are calibrated with benchmarks/copy_descriptor.py (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion, gaussian_filter, uniform_filter

from curation.copy_descriptor import mirror
from curation.dedup import Edges

SIDE = 32
#: Scale range of a copy (B's frame in A's, per axis): a crop of ≤ 6 % a side of either image.
COPY_SCALES = (0.86, 1.17)
#: Shorter side (pixels) under which a pair is held to ``SMALL_FACTOR`` × the residual threshold: the
#: blur to the smaller image's resolution also shrinks the residual of a differing detail (at 32 px a
#: numeral is ~6 px). benchmarks/copy_descriptor.py's glyphs, seeds 0-4, pairs under 24 px: distinct
#: look-alikes from 0.83 (a 19 px coin against coins of other values), copies 60-85 % under 0.75.
SMALL_SIDE = 24
SMALL_FACTOR = 0.87  # 0.86 → 0.75
#: Largest residual of a copy (grey standard deviations, 3×3 mean; see the module docstring).
RESIDUAL_THRESHOLD = 0.86
#: Largest colour-field residual of a copy (RMS, full scale = 1). On benchmarks/copy_descriptor.py's sets
#: of seeds 0 and 1, the edges that pass the grey check: copies at most 0.037 (99 % under 0.023; 30 of
#: ~25,000 above this), distinct images 0.029 and up (56; stripes in another phase, one scene's crops).
COLOUR_THRESHOLD = 0.028
#: What a check's verdicts depend on besides the residual threshold (part of a kept copy graph's key).
FIXED_SETTINGS = (COLOUR_THRESHOLD, SMALL_SIDE, SMALL_FACTOR)

_FIT_SCALES = (0.7, 1.45)  # wide enough that a look-alike's scale is found, not clipped into range
_FIT_SHIFT = 0.25  # frame half-widths
_FIT_STEPS = ((2.0, 6), (1.0, 4))  # (blur sigma in pixels, Gauss-Newton steps): coarse, then fine
_COMPARE_SIGMA = 0.55  # pixels at SIDE for a full-resolution image; more for smaller images
_POOL = 3
_COLOUR_BLUR = 1.0  # pixels at SIDE, before the colour fit (JPEG's chroma blocks)
_COLOUR_LOW_PASS = 4.0  # pixels at SIDE: the scale of a lighting field, not of an edge misaligned by a pixel
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's "L"
_CENTRES = (np.arange(SIDE) + 0.5) / SIDE * 2 - 1  # pixel centres in frame coordinates [-1, 1]


def thumbnail(img: Image.Image) -> np.ndarray:
    """uint8 [SIDE, SIDE, 3] RGB, the whole frame (aspect ratio is part of what the fit aligns)."""
    return np.asarray(img.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BOX), np.uint8)


def _blur(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for s in np.unique(sigma):
        rows = sigma == s
        out[rows] = gaussian_filter(x[rows], (0, s, s), mode="nearest")
    return out


def _interpolation(scale: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([n, SIDE, SIDE] linear interpolation matrices whose row i samples at scale·cᵢ + shift,
    [n, SIDE] whether that point lies inside the source frame)."""
    p = ((scale[:, None] * _CENTRES + shift[:, None]) + 1) / 2 * SIDE - 0.5
    inside = (p > -0.5) & (p < SIDE - 0.5)
    p = np.clip(p, 0, SIDE - 1)
    lo = np.floor(p).astype(np.int64)
    hi = np.minimum(lo + 1, SIDE - 1)
    w = (p - lo).astype(np.float32)
    m = np.zeros((*p.shape, SIDE), np.float32)
    n, i = np.indices(p.shape)
    m[n, i, lo] = 1 - w
    m[n, i, hi] += w
    return m, inside


def _warp(theta: np.ndarray, *images: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Images [n, SIDE, SIDE] resampled at the frame map of ``theta`` (sx, sy, tx, ty, ...), and the
    mask of output pixels that fall inside the source."""
    my, in_y = _interpolation(theta[:, 1], theta[:, 3])
    mx, in_x = _interpolation(theta[:, 0], theta[:, 2])
    warped = [np.einsum("nij,njk,nlk->nil", my, im, mx, optimize=True) for im in images]
    return warped, (in_y[:, :, None] & in_x[:, None, :]).astype(np.float32)


def _fit(a: np.ndarray, b: np.ndarray, theta: np.ndarray, sigma: float, steps: int) -> np.ndarray:
    """Gauss-Newton on (sx, sy, tx, ty, gain, offset) minimising ‖a − (gain·b∘map + offset)‖²."""
    n = len(a)
    sig = np.full(n, sigma)
    a, b = _blur(a, sig), _blur(b, sig)
    gx, gy = np.gradient(b, axis=2) * SIDE / 2, np.gradient(b, axis=1) * SIDE / 2  # per frame unit
    x, y = _CENTRES[None, None, :], _CENTRES[None, :, None]
    for _ in range(steps):
        (bw, bx, by), mask = _warp(theta, b, gx, gy)
        gain, offset = theta[:, 4, None, None], theta[:, 5, None, None]
        r = ((a - gain * bw - offset) * mask).reshape(n, -1)
        jac = np.stack([gain * bx * x, gain * by * y, gain * bx, gain * by, bw, np.ones_like(bw)], 1)
        jac = (jac * mask[:, None]).reshape(n, 6, -1)
        hessian = jac @ jac.transpose(0, 2, 1) + 1e-3 * np.eye(6, dtype=np.float32)
        theta = theta + np.linalg.solve(hessian, (jac @ r[..., None]))[..., 0]
        theta[:, :2] = theta[:, :2].clip(*_FIT_SCALES)
        theta[:, 2:4] = theta[:, 2:4].clip(-_FIT_SHIFT, _FIT_SHIFT)
    return theta


def _residual(a: np.ndarray, b: np.ndarray, theta: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    a, b = _blur(a, sigma), _blur(b, sigma)
    (bw,), mask = _warp(theta, b)
    diff = np.abs(a - theta[:, 4, None, None] * bw - theta[:, 5, None, None])
    inside = mask > 0
    mean = (a * mask).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1)
    std = np.sqrt((((a - mean[:, None, None]) * mask) ** 2).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1))
    local = uniform_filter(diff / (std[:, None, None] + 0.02), (0, _POOL, _POOL), mode="nearest")
    interior = binary_erosion(inside, np.ones((1, 3, 3), bool))  # the pooled window lies inside
    return np.where(interior, local, 0.0).reshape(len(a), -1).max(1)


def _colour_residual(a: np.ndarray, b: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """[n] RMS of the low-passed colour difference of RGB thumbnails [n, SIDE, SIDE, 3] once b is warped
    by ``theta`` and mapped by its least-squares affine colour map onto a (step 4 of the module docstring)."""
    n = len(a)
    a = gaussian_filter(a, (0, _COLOUR_BLUR, _COLOUR_BLUR, 0), mode="nearest")
    b = gaussian_filter(b, (0, _COLOUR_BLUR, _COLOUR_BLUR, 0), mode="nearest")
    warped, mask = _warp(theta, *np.moveaxis(b, -1, 0))
    inside = mask[..., None]
    x = np.concatenate([np.stack(warped, -1), np.ones_like(a[..., :1])], -1) * inside
    x, y = x.reshape(n, -1, 4), (a * inside).reshape(n, -1, 3)
    xt = x.transpose(0, 2, 1).astype(np.float64)
    # float64 and a ridge of 1e-5 per pixel: a grey image's channels are collinear, a singular fit
    ridge = 1e-5 * mask.sum((1, 2))[:, None, None] * np.eye(4)
    colour_map = np.linalg.solve(xt @ x + ridge, xt @ y)
    diff = (y - x @ colour_map).reshape(a.shape).astype(np.float32)
    weight = gaussian_filter(mask, (0, _COLOUR_LOW_PASS, _COLOUR_LOW_PASS), mode="constant")
    low = gaussian_filter(diff, (0, _COLOUR_LOW_PASS, _COLOUR_LOW_PASS, 0), mode="constant")
    power = (low**2).sum(-1) / np.maximum(weight, 1e-3) ** 2
    covered = weight > 0.5
    return np.sqrt((power * covered).sum((1, 2)) / np.maximum(covered.sum((1, 2)), 1))


def _alignment(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, 6] the frame map and grey gain/offset of b onto a (grey [n, SIDE, SIDE]), coarse then fine."""
    n = len(a)
    gain = (a.std((1, 2)) + 1e-3) / (b.std((1, 2)) + 1e-3)
    theta = np.stack([np.ones(n), np.ones(n), np.zeros(n), np.zeros(n), gain,
                      a.mean((1, 2)) - gain * b.mean((1, 2))], 1).astype(np.float32)
    for blur, steps in _FIT_STEPS:
        theta = _fit(a, b, theta, blur, steps)
    return theta


def residuals(thumbs_a: np.ndarray, thumbs_b: np.ndarray, sides_a: np.ndarray, sides_b: np.ndarray,
              mirrored: np.ndarray, batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n] each pair's local grey residual (+inf where the alignment is not a copy's scale) and
    [n] its colour-field residual, for RGB thumbnails [n, SIDE, SIDE, 3].

    ``sides_*``: the shorter side of each original image in pixels (0: no thumbnail, never a copy);
    ``mirrored``: which pairs meet
    as mirror images (the descriptor search says which: trying both here would let a mirrored
    look-alike, e.g. a reversed numeral, have a second chance).
    """
    grey, colour = np.empty(len(thumbs_a), np.float32), np.empty(len(thumbs_a), np.float32)
    for s in range(0, len(grey), batch):
        a = np.asarray(thumbs_a[s : s + batch], np.float32) / 255.0
        b = np.asarray(thumbs_b[s : s + batch], np.float32) / 255.0
        b = np.ascontiguousarray(np.where(mirrored[s : s + batch, None, None, None], b[:, :, ::-1], b))
        smaller = np.minimum(sides_a[s : s + batch], sides_b[s : s + batch]).astype(np.float64)
        sigma = np.round(_COMPARE_SIGMA * np.maximum(1.0, SIDE / np.maximum(smaller, 1.0)), 1)
        a_grey, b_grey = a @ _LUMA, b @ _LUMA
        theta = _alignment(a_grey, b_grey)
        in_range = ((theta[:, :2] >= COPY_SCALES[0]) & (theta[:, :2] <= COPY_SCALES[1])).all(1)
        grey[s : s + len(a)] = np.where(in_range & (smaller > 0), _residual(a_grey, b_grey, theta, sigma), np.inf)
        colour[s : s + len(a)] = _colour_residual(a, b, theta)
    return grey, colour


def verified(thumbs_a: np.ndarray, thumbs_b: np.ndarray, sides_a: np.ndarray, sides_b: np.ndarray,
             mirrored: np.ndarray, threshold: float = RESIDUAL_THRESHOLD) -> np.ndarray:
    """bool [n]: which candidate pairs are copies (a pair with an image under ``SMALL_SIDE`` held to
    ``SMALL_FACTOR`` × ``threshold``)."""
    grey, colour = residuals(thumbs_a, thumbs_b, sides_a, sides_b, mirrored)
    small = np.minimum(sides_a, sides_b) < SMALL_SIDE
    return (grey < np.where(small, SMALL_FACTOR * threshold, threshold)) & (colour < COLOUR_THRESHOLD)


Thumbnails = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def edge_check(x: np.ndarray, thumbnails: Thumbnails, threshold: float = RESIDUAL_THRESHOLD
               ) -> Callable[[Edges], np.ndarray]:
    """The ``verify`` of `curation.dedup.copy_dedup` for pixel descriptors ``x``: ``thumbnails(rows)``
    gives (uint8 [len(rows), SIDE, SIDE, 3], shorter side of each original) for sorted unique rows."""

    def check(edges: Edges) -> np.ndarray:
        if not len(edges):
            return np.zeros(0, bool)
        rows, inverse = np.unique(np.concatenate([edges.src, edges.dst]), return_inverse=True)
        thumbs, sides = thumbnails(rows)
        a, b = inverse[: len(edges)], inverse[len(edges) :]
        xa, xb = np.asarray(x[edges.src], np.float32), np.asarray(x[edges.dst], np.float32)
        mirrored = np.einsum("ij,ij->i", mirror(xa), xb) > np.einsum("ij,ij->i", xa, xb)
        return verified(thumbs[a], thumbs[b], sides[a], sides[b], mirrored, threshold)

    return check
