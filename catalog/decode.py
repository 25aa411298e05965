"""Decode images from the real web into RGB arrays, with stable failure reasons.

Shared by ingest (validation), embedding and the trainer so that every stage agrees on what
"the image" is: EXIF orientation applied, alpha composited on a neutral grey, 16-bit data scaled
(not clipped) to 8 bit, first frame of animations. Failures raise `DecodeError` whose `.reason`
is one of the short codes below, so manifests can count rejects by cause.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

EMPTY_FILE = "empty_file"
HTML_PAGE = "html_page"  # an error or login page saved under an image name: common in crawls
TEXT_FILE = "text_file"
NOT_AN_IMAGE = "not_an_image"  # binary data of no known image format
TRUNCATED = "truncated"
DECOMPRESSION_BOMB = "decompression_bomb"
CORRUPT = "corrupt"
MISSING = "missing"
REASONS = (EMPTY_FILE, HTML_PAGE, TEXT_FILE, NOT_AN_IMAGE, TRUNCATED, DECOMPRESSION_BOMB, CORRUPT, MISSING)

DEFAULT_MAX_PIXELS = 64_000_000
# Formats with real magic numbers. Magic-less formats (TGA, ...) would let random bytes
# "identify" as an image and then fail as corrupt instead of not_an_image.
WEB_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "ICO", "PPM")
_JPEG_MAGIC, _JPEG_EOI, _PNG_MAGIC = b"\xff\xd8\xff", b"\xff\xd9", b"\x89PNG\r\n\x1a\n"
# Prefixes of formats we accept: bytes starting like this but unreadable are damaged, not foreign.
_IMAGE_MAGICS = (_JPEG_MAGIC, _PNG_MAGIC, b"GIF87a", b"GIF89a", b"BM",
                 b"II*\x00", b"MM\x00*")
_NEUTRAL_BACKGROUND = (128, 128, 128)
_PROBE_DRAFT_SIDE = 64
_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
_EXIF_ERRORS = (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncation must surface as an error, never grey fill


class DecodeError(Exception):
    """An image that cannot be used; `.reason` is one of `REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown decode failure reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class ImageInfo(NamedTuple):
    """Size as a viewer shows it (EXIF orientation applied) and the file's own format facts."""

    width: int
    height: int
    format: str
    mode: str
    n_frames: int


def _not_an_image(data: bytes) -> DecodeError:
    """Say what the bytes are instead, so the errors table tells crawl problems apart.

    Never quote the content: the message lands in the catalog, and the file may be a secret.
    """
    head = data[:512].lstrip().lower()
    if b"<svg" in data[:4096].lower():  # vector drawings are skipped, not rasterised: say so
        return DecodeError(NOT_AN_IMAGE, f"an SVG drawing: curate reads raster images only ({len(data)} bytes)")
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")) or b"<html" in head:
        return DecodeError(HTML_PAGE, f"an HTML/XML page, not an image ({len(data)} bytes)")
    try:
        text = data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return DecodeError(TEXT_FILE, f"plain text, not an image ({len(data)} bytes)")
    return DecodeError(NOT_AN_IMAGE, f"binary data of no known image format ({len(data)} bytes)")


def _looks_like_image(data: bytes) -> bool:
    is_webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return is_webp or any(data.startswith(m) for m in _IMAGE_MAGICS)


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily and reject by header alone: nothing is decoded yet."""
    if len(data) == 0:
        raise DecodeError(EMPTY_FILE, "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=WEB_FORMATS)
    except Image.DecompressionBombError as e:
        raise DecodeError(DECOMPRESSION_BOMB, str(e)) from e
    except UnidentifiedImageError as e:
        if _looks_like_image(data):
            raise DecodeError(CORRUPT, f"unreadable header ({len(data)} bytes)") from e
        raise _not_an_image(data) from e
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise DecodeError(CORRUPT, f"bad header: {e}") from e
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError(DECOMPRESSION_BOMB, f"declared {w}x{h} exceeds {max_pixels} pixels")
    if w <= 0 or h <= 0:
        raise DecodeError(CORRUPT, f"declared size {w}x{h}")
    return img


def _load(img: Image.Image) -> None:
    """Decode the (current frame's) pixel data fully, classifying failures."""
    try:
        img.load()
    except (OSError, EOFError) as e:
        if isinstance(e, EOFError) or "truncated" in str(e):
            raise DecodeError(TRUNCATED, str(e) or "unexpected end of data") from e
        raise DecodeError(CORRUPT, str(e)) from e
    except (SyntaxError, ValueError, struct.error, MemoryError) as e:
        raise DecodeError(CORRUPT, f"{type(e).__name__}: {e}") from e


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except _EXIF_ERRORS:
        return 1


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Validate `data` by decoding it (JPEGs at reduced scale) and report its displayed size."""
    img = _open_checked(data, max_pixels)
    width, height = img.size
    fmt, mode = img.format or "", img.mode
    n_frames = int(getattr(img, "n_frames", 1))
    if fmt in ("JPEG", "MPO"):
        img.draft(None, (_PROBE_DRAFT_SIDE, _PROBE_DRAFT_SIDE))
    _load(img)
    if _orientation(img) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(width, height, fmt, mode, n_frames)


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Map 16-bit (and 32-bit int holding 16-bit) grey onto 0..255 by scaling, not clipping."""
    a = np.asarray(img)
    if img.mode == "F":
        a8 = np.clip(a, 0.0, 1.0) * 255.0
    else:
        a8 = np.clip(a.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.rint(a8).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        img = _sixteen_bit_to_l(img)
    has_alpha = img.mode in _ALPHA_MODES or "transparency" in img.info
    if not has_alpha:
        return img if img.mode == "RGB" else img.convert("RGB")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _NEUTRAL_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def decode_rgb(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> Image.Image:
    """Decode to an upright RGB image; with `min_side`, JPEGs decode at the smallest DCT scale
    (1/2, 1/4, 1/8) whose shorter side is still >= min_side, which is much cheaper."""
    img = _open_checked(data, max_pixels)
    if min_side is not None and img.format in ("JPEG", "MPO"):
        img.draft(None, (min_side, min_side))
    _load(img)
    try:
        upright = ImageOps.exif_transpose(img)
    except _EXIF_ERRORS:
        upright = img  # unreadable EXIF: the pixels themselves are fine
    try:
        return _to_rgb(upright)
    except (OSError, ValueError) as e:
        raise DecodeError(CORRUPT, f"cannot convert mode {img.mode} to RGB: {e}") from e


def plain_jpeg(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Whether a plain JPEG decoder (nvJPEG on a GPU) turns ``data`` into the image `decode_rgb` gives.

    True for a complete (ending in the EOI marker) single-image JPEG of 8-bit YCbCr or grey samples,
    upright (no EXIF rotation) and within ``max_pixels``: such files may be decoded elsewhere (the
    embed stage's GPU path). Everything else (other formats, CMYK or Adobe-RGB JPEGs, rotated or cut
    files, bad headers) is left to `decode_rgb`, whose error reasons say what is wrong. Reads the header only.
    """
    if not data.startswith(_JPEG_MAGIC) or not data.endswith(_JPEG_EOI):
        return False
    try:
        img = _open_checked(data, max_pixels)
    except DecodeError:
        return False
    stored_rgb = img.info.get("adobe_transform") == 0 and "adobe" in img.info  # no YCbCr transform
    return img.format == "JPEG" and img.mode in ("RGB", "L") and not stored_rgb and _orientation(img) == 1


def plain_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Whether a plain ``Image.open(...).convert("RGB")`` (what WebDataset's and most clients' PIL
    decoders do) turns the PNG ``data`` into the image `decode_rgb` gives.

    True for 8-bit grey, RGB or palette PNGs without transparency and without an EXIF rotation. False for
    16-bit samples (a plain convert clips them to white), alpha or a transparent colour (a plain convert
    drops it instead of compositing over the neutral background) and everything that is not a PNG.
    Reads the header only.
    """
    if not data.startswith(_PNG_MAGIC):
        return False
    try:
        img = _open_checked(data, max_pixels)
    except DecodeError:
        return False
    return img.mode in ("RGB", "L", "P") and "transparency" not in img.info and _orientation(img) == 1


_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Evaluation transform: shorter side to `resize_size`, centre crop `size`, normalise.

    The default `resize_size` keeps the 256/224 ratio of DINO-style evaluation.
    """

    size: int = 224
    resize_size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resize_size is None:
            object.__setattr__(self, "resize_size", round(self.size * 256 / 224))
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        if self.resize_size < self.size:
            raise ValueError(f"resize_size {self.resize_size} < crop size {self.size}")

    def fingerprint(self) -> str:
        """Stable description recorded in manifests: equal strings mean equal pixels."""
        mean = ",".join(f"{m:.4f}" for m in self.mean)
        std = ",".join(f"{s:.4f}" for s in self.std)
        return (f"resize{self.resize_size}-{self.interpolation}-center{self.size}"
                f"-mean{mean}-std{std}")

    def crop(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 array [size, size, 3]: resized and centre-cropped, not normalised.

        The embed stage ships these compact pixels from decode tasks to the model actors.
        """
        if img.mode != "RGB":
            img = img.convert("RGB")
        new_w, new_h = self.resized(*img.size)
        img = img.resize((new_w, new_h), _INTERPOLATIONS[self.interpolation])
        left, top = self.crop_origin(new_w, new_h)
        return np.asarray(img.crop((left, top, left + self.size, top + self.size)), dtype=np.uint8)

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) once the shorter side is scaled to ``resize_size`` (the other side rounded)."""
        scale = self.resize_size / min(width, height)
        new_w = self.resize_size if width <= height else max(self.resize_size, round(width * scale))
        new_h = self.resize_size if height <= width else max(self.resize_size, round(height * scale))
        return new_w, new_h

    def crop_origin(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the centre crop in an image of the resized size."""
        return int(round((width - self.size) / 2.0)), int(round((height - self.size) / 2.0))

    def normalize_batch(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [n, size, size, 3] -> float32 [n, 3, size, size] with the mean/std applied."""
        x = pixels.astype(np.float32) / np.float32(255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 array [3, size, size]."""
        return self.normalize_batch(self.crop(img)[None])[0]


def decode_crop(data: bytes, pre: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image -> uint8 [size, size, 3]: decoded at the cheapest JPEG scale that keeps
    ``resize_size``, resized and centre-cropped (the embed stage's CPU path). Raises `DecodeError`."""
    return pre.crop(decode_rgb(data, max_pixels=max_pixels, min_side=pre.resize_size))
