import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image

from catalog.decode import IMAGENET_MEAN, IMAGENET_STD
from training.data.multicrop import (
    MultiCrop,
    MultiCropConfig,
    _adjust_hue,
    gaussian_blur,
    random_resized_crop_box,
)

SMALL = dict(global_size=24, local_size=12, n_local=2)


def _image(seed: int = 0, w: int = 40, h: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_shapes_and_dtypes():
    out = MultiCrop(MultiCropConfig(global_size=32, local_size=16, n_local=5, gram_size=48))(
        _image(), np.random.default_rng(0)
    )
    assert out["global_crops"].shape == (2, 3, 32, 32) and out["global_crops"].dtype == torch.float32
    assert out["local_crops"].shape == (5, 3, 16, 16) and out["local_crops"].dtype == torch.float32
    assert out["gram_teacher_crops"].shape == (2, 3, 48, 48)
    assert len(out["ops"]) == 7
    plain = MultiCrop(MultiCropConfig(**SMALL))(_image(), np.random.default_rng(0))
    assert "gram_teacher_crops" not in plain


def test_deterministic_given_rng():
    crop = MultiCrop(MultiCropConfig(**SMALL))
    a = crop(_image(), np.random.default_rng(42))
    b = crop(_image(), np.random.default_rng(42))
    c = crop(_image(), np.random.default_rng(43))
    assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["local_crops"], b["local_crops"])
    assert a["ops"] == b["ops"]
    assert not torch.equal(a["global_crops"], c["global_crops"])


def _frequencies(mode: str, draws: int = 1500) -> dict[str, np.ndarray]:
    crop = MultiCrop(MultiCropConfig(blur_probabilities=mode, **SMALL))
    image = _image(w=30, h=30)
    rng = np.random.default_rng(7)
    names = ("blur", "solarize", "jitter", "grayscale", "flip")
    counts = {name: np.zeros(2 + SMALL["n_local"]) for name in names}
    for _ in range(draws):
        for i, ops in enumerate(crop(image, rng)["ops"]):
            for name in names:
                counts[name][i] += name in ops
    return {name: c / draws for name, c in counts.items()}


def _within(freq: float, p: float, draws: int = 1500) -> bool:
    if p in (0.0, 1.0):
        return freq == p
    return abs(freq - p) < 4 * math.sqrt(p * (1 - p) / draws)


@pytest.mark.parametrize("mode,expected", [("effective", (0.0, 0.9, 0.5)), ("written", (1.0, 0.1, 0.5))])
def test_blur_probability_modes(mode, expected):
    freq = _frequencies(mode)
    g1, g2, local = expected
    assert _within(freq["blur"][0], g1) and _within(freq["blur"][1], g2)
    assert all(_within(f, local) for f in freq["blur"][2:])
    # solarize only on global crop 2; the other ops at their configured rates everywhere
    assert freq["solarize"][0] == 0 and _within(freq["solarize"][1], 0.2) and (freq["solarize"][2:] == 0).all()
    assert all(_within(f, 0.8) for f in freq["jitter"])
    assert all(_within(f, 0.2) for f in freq["grayscale"])
    assert all(_within(f, 0.5) for f in freq["flip"])


def test_normalisation_of_constant_image():
    colour = (200, 30, 120)
    image = Image.new("RGB", (50, 40), colour)
    config = MultiCropConfig(
        jitter_probability=0.0, grayscale_probability=0.0, solarize_probability=0.0, blur_probabilities="written",
        **SMALL,
    )
    out = MultiCrop(config)(image, np.random.default_rng(0))
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)])
    for crops in (out["global_crops"], out["local_crops"]):
        torch.testing.assert_close(crops, expected.view(1, 3, 1, 1).expand_as(crops), atol=1e-5, rtol=0)


def test_gram_crop_has_no_distortions():
    colour = (90, 160, 40)
    image = Image.new("RGB", (50, 40), colour)
    config = MultiCropConfig(jitter_probability=1.0, brightness=0.4, gram_size=32, **SMALL)
    out = MultiCrop(config)(image, np.random.default_rng(3))
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)])
    gram = out["gram_teacher_crops"]
    torch.testing.assert_close(gram, expected.view(1, 3, 1, 1).expand_as(gram), atol=1e-5, rtol=0)
    assert not torch.allclose(out["global_crops"], expected.view(1, 3, 1, 1).expand_as(out["global_crops"]))


def test_random_resized_crop_box_bounds_and_fallback():
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, w, h = random_resized_crop_box(300, 200, rng, (0.05, 0.32), (3 / 4, 4 / 3))
        assert 0 <= left and left + w <= 300 and 0 <= top and top + h <= 200
        assert 0.04 < w * h / (300 * 200) < 0.34
        assert 3 / 4 - 0.05 < w / h < 4 / 3 + 0.05
    # a 1000x10 strip cannot hold a 3/4..4/3 crop of 90% of its area: centre fallback, ratio clamped
    assert random_resized_crop_box(1000, 10, rng, (0.9, 1.0), (3 / 4, 4 / 3)) == ((1000 - 13) // 2, 0, 13, 10)


def test_hue_shift_matches_colorsys():
    image = Image.new("RGB", (4, 4), (220, 40, 40))
    shifted = np.asarray(_adjust_hue(image, 1 / 3))[0, 0] / 255
    h0 = colorsys.rgb_to_hsv(220 / 255, 40 / 255, 40 / 255)[0]
    h1 = colorsys.rgb_to_hsv(*shifted)[0]
    assert abs((h1 - h0) % 1.0 - 1 / 3) < 0.01


def test_gaussian_blur_matches_direct_2d_convolution():
    x = np.random.default_rng(0).random((20, 17, 3), dtype=np.float32)
    sigma, size = 1.3, 9
    ours = gaussian_blur(x, size, sigma)
    r = size // 2
    offsets = np.arange(-r, r + 1)
    weights = np.exp(-0.5 * (offsets[:, None] ** 2 + offsets[None, :] ** 2) / sigma**2)
    weights /= weights.sum()
    padded = np.pad(x.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    ref = np.zeros(x.shape)
    for i, di in enumerate(offsets):
        for j, dj in enumerate(offsets):
            ref += weights[i, j] * padded[r + di : r + di + 20, r + dj : r + dj + 17]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
