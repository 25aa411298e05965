"""DINO multi-crop augmentation (2 global + n local crops, optional Gram-teacher crops).

Geometry and colour run on PIL images (C code, uint8), blur/solarize/normalise on float arrays.
Every random decision comes from the ``numpy.random.Generator`` passed in, so the loader can seed it
per (seed, step, rank, slot) and the pipeline is reproducible.

Blur probabilities. The DINOv2/DINOv3 recipe *writes* blur p = 1.0 (global crop 1), 0.1 (global crop
2), 0.5 (local crops), but the reference ``GaussianBlur`` passes ``1 - p`` to ``RandomApply``, so the
probabilities it *effectively* trains with are 0.0, 0.9 and 0.5. The released models were trained with
the effective ones, hence ``blur_probabilities='effective'`` is the default; ``'written'`` gives the
paper's numbers. Solarize (p=0.2) applies to global crop 2 only in both modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageEnhance
from scipy.ndimage import correlate1d

from catalog.decode import IMAGENET_MEAN, IMAGENET_STD

_BLUR_PROBABILITIES = {
    "effective": (0.0, 0.9, 0.5),
    "written": (1.0, 0.1, 0.5),
}


@dataclass(frozen=True)
class MultiCropConfig:
    """Every number of the multi-crop pipeline; defaults are the DINOv3 ViT-L recipe."""

    global_size: int = 224
    global_scale: tuple[float, float] = (0.32, 1.0)
    n_local: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_tries: int = 10
    horizontal_flip: bool = True
    flip_probability: float = 0.5
    jitter_probability: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_probability: float = 0.2
    blur_probabilities: Literal["effective", "written"] = "effective"
    blur_kernel_size: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_threshold: int = 128
    solarize_probability: float = 0.2
    gram_size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.blur_probabilities not in _BLUR_PROBABILITIES:
            raise ValueError(f"blur_probabilities must be one of {sorted(_BLUR_PROBABILITIES)}")
        if self.blur_kernel_size % 2 != 1:
            raise ValueError("blur_kernel_size must be odd")

    @property
    def blur_p(self) -> tuple[float, float, float]:
        """Blur probability of (global crop 1, global crop 2, each local crop)."""
        return _BLUR_PROBABILITIES[self.blur_probabilities]


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    tries: int = 10,
) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a crop covering ``scale`` of the area with log-uniform aspect ``ratio``.

    After ``tries`` misses, falls back to the largest centre crop whose aspect is clamped to ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(tries):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate hue by ``shift`` turns (in [-0.5, 0.5]) in HSV space."""
    h, s, v = img.convert("HSV").split()
    h_arr = (np.asarray(h, dtype=np.uint8).astype(np.int16) + int(round(shift * 255))) % 256
    h = Image.fromarray(h_arr.astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of odd length ``size``."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(x: np.ndarray, kernel_size: int, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an ``[H,W,3]`` float array, mirror (reflect) padding.

    scipy's single-threaded C filter: torch's conv on tiny crops thrashes threads on busy hosts.
    """
    k = gaussian_kernel(kernel_size, sigma)
    y = correlate1d(x, k, axis=0, mode="mirror")
    return correlate1d(y, k, axis=1, mode="mirror")


class MultiCrop:
    """Callable ``(PIL image, rng) -> dict`` producing the crops of one training image.

    Output: ``global_crops`` ``[2,3,G,G]``, ``local_crops`` ``[n_local,3,L,L]`` (float32, normalised),
    ``gram_teacher_crops`` ``[2,3,S,S]`` when ``gram_size`` is set, and ``ops``: for every crop in the
    order (global 1, global 2, locals...) the tuple of random operations that ran, which lets tests
    and audits measure the augmentation frequencies directly.
    """

    def __init__(self, config: MultiCropConfig) -> None:
        self.config = config
        self._mean = np.asarray(config.mean, dtype=np.float32)
        self._std = np.asarray(config.std, dtype=np.float32)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict:
        cfg = self.config
        image = image.convert("RGB") if image.mode != "RGB" else image
        blur_g1, blur_g2, blur_local = cfg.blur_p
        ops: list[tuple[str, ...]] = []
        globals_, grams = [], []
        for blur_p, solarize_p in ((blur_g1, 0.0), (blur_g2, cfg.solarize_probability)):
            flips: list[str] = []
            if cfg.gram_size is None:
                crop = self._crop(image, rng, cfg.global_scale, cfg.global_size, flips)
            else:
                big = self._crop(image, rng, cfg.global_scale, max(cfg.global_size, cfg.gram_size), flips)
                crop = big.resize((cfg.global_size, cfg.global_size), Image.Resampling.BICUBIC)
                gram = big.resize((cfg.gram_size, cfg.gram_size), Image.Resampling.BICUBIC)
                grams.append(self._normalise(self._to_float(gram)))
            tensor, applied = self._distort(crop, rng, blur_p, solarize_p)
            globals_.append(tensor)
            ops.append(tuple(flips) + applied)
        locals_ = []
        for _ in range(cfg.n_local):
            flips = []
            crop = self._crop(image, rng, cfg.local_scale, cfg.local_size, flips)
            tensor, applied = self._distort(crop, rng, blur_local, 0.0)
            locals_.append(tensor)
            ops.append(tuple(flips) + applied)
        local_shape = (0, 3, cfg.local_size, cfg.local_size)
        out = {
            "global_crops": torch.from_numpy(np.stack(globals_)),
            "local_crops": torch.from_numpy(np.stack(locals_) if locals_ else np.empty(local_shape, np.float32)),
            "ops": ops,
        }
        if grams:
            out["gram_teacher_crops"] = torch.from_numpy(np.stack(grams))
        return out

    def _crop(
        self, image: Image.Image, rng: np.random.Generator, scale: tuple[float, float], size: int, ops: list[str]
    ) -> Image.Image:
        cfg = self.config
        left, top, w, h = random_resized_crop_box(image.width, image.height, rng, scale, cfg.ratio, cfg.crop_tries)
        crop = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if cfg.horizontal_flip and rng.random() < cfg.flip_probability:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            ops.append("flip")
        return crop

    def _distort(
        self, crop: Image.Image, rng: np.random.Generator, blur_p: float, solarize_p: float
    ) -> tuple[np.ndarray, tuple[str, ...]]:
        """Colour jitter, grayscale, blur, solarize (in that order), then normalise."""
        cfg = self.config
        applied: list[str] = []
        if rng.random() < cfg.jitter_probability:
            crop = self._jitter(crop, rng)
            applied.append("jitter")
        if rng.random() < cfg.grayscale_probability:
            crop = crop.convert("L").convert("RGB")
            applied.append("grayscale")
        x = self._to_float(crop)
        if rng.random() < blur_p:
            x = gaussian_blur(x, cfg.blur_kernel_size, float(rng.uniform(*cfg.blur_sigma)))
            applied.append("blur")
        if solarize_p > 0 and rng.random() < solarize_p:
            threshold = cfg.solarize_threshold / 255.0
            x = np.where(x >= threshold, 1.0 - x, x)
            applied.append("solarize")
        return self._normalise(x), tuple(applied)

    def _jitter(self, crop: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Brightness, contrast, saturation, hue with random factors, applied in a random order."""
        cfg = self.config
        factors = (
            rng.uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness),
            rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast),
            rng.uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation),
            rng.uniform(-cfg.hue, cfg.hue),
        )
        for op in rng.permutation(4):
            if op == 0:
                crop = ImageEnhance.Brightness(crop).enhance(factors[0])
            elif op == 1:
                crop = ImageEnhance.Contrast(crop).enhance(factors[1])
            elif op == 2:
                crop = ImageEnhance.Color(crop).enhance(factors[2])
            else:
                crop = _adjust_hue(crop, factors[3])
        return crop

    @staticmethod
    def _to_float(image: Image.Image) -> np.ndarray:
        return np.asarray(image, dtype=np.float32) / np.float32(255.0)

    def _normalise(self, x: np.ndarray) -> np.ndarray:
        """``[H,W,3]`` in [0,1] -> normalised ``[3,H,W]`` float32 (stacked with numpy: torch's
        threaded copies on tiny arrays stall on busy hosts)."""
        return ((x - self._mean) / self._std).transpose(2, 0, 1)
