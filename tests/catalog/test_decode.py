"""catalog.decode on real broken and awkward byte strings built here."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from catalog import decode
from catalog.decode import DecodeError, Preprocess, decode_rgb, probe_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue: orientation errors become visible."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def _png_declaring(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(DecodeError) as probe_exc:
        probe_image(data, **kw)
    with pytest.raises(DecodeError) as decode_exc:
        decode_rgb(data, **kw)
    assert probe_exc.value.reason == decode_exc.value.reason
    return decode_exc.value.reason


def test_empty_file() -> None:
    assert _reason(b"") == decode.EMPTY_FILE


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.97])
def test_truncated_jpeg(fraction: float) -> None:
    data = _encode(_noise_rgb(160, 120), "JPEG", quality=90)
    sos = data.find(b"\xff\xda")
    cut = sos + 20 + int((len(data) - sos - 20) * fraction)
    assert _reason(data[:cut]) == decode.TRUNCATED
    with pytest.raises(DecodeError) as exc:
        decode_rgb(data[:cut], min_side=16)  # draft mode must not hide truncation
    assert exc.value.reason == decode.TRUNCATED


def test_truncated_png() -> None:
    data = _encode(_noise_rgb(100, 80), "PNG")
    assert _reason(data[: len(data) // 2]) == decode.TRUNCATED


@pytest.mark.parametrize("payload, reason", [
    (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
     b"<body><h1>Not Found</h1></body></html>\n", decode.HTML_PAGE),
    (b"Access denied. Please log in to view this resource.\n", decode.TEXT_FILE),
    (np.random.default_rng(3).bytes(3000), decode.NOT_AN_IMAGE),
])
def test_not_an_image(payload: bytes, reason: str) -> None:
    assert _reason(payload) == reason


@pytest.mark.parametrize("w,h", [(100_000, 100_000), (9_000, 9_000)])
def test_decompression_bomb_from_header(w: int, h: int) -> None:
    data = _png_declaring(w, h)
    assert len(data) < 200
    assert _reason(data) == decode.DECOMPRESSION_BOMB


def test_pixel_limit_is_configurable() -> None:
    data = _encode(_noise_rgb(100, 100), "PNG")
    assert _reason(data, max_pixels=9_999) == decode.DECOMPRESSION_BOMB
    assert probe_image(data, max_pixels=10_000).width == 100


def test_corrupt_png_stream() -> None:
    data = bytearray(_encode(_noise_rgb(120, 90), "PNG"))
    idat = data.find(b"IDAT")
    data[idat + 100 : idat + 900] = np.random.default_rng(1).bytes(800)
    assert _reason(bytes(data)) == decode.CORRUPT


def test_reason_codes_are_distinct_and_checked() -> None:
    assert len(set(decode.REASONS)) == len(decode.REASONS) == 8
    assert DecodeError(decode.MISSING, "gone").reason == decode.MISSING
    with pytest.raises(ValueError):
        DecodeError("weird", "x")


def test_exif_rotated_jpeg_swaps_size_and_is_upright() -> None:
    shown = _halves(120, 80)
    for orientation, stored_transpose in ((6, Image.Transpose.ROTATE_90),
                                          (8, Image.Transpose.ROTATE_270)):
        stored = shown.transpose(stored_transpose)
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
        assert Image.open(io.BytesIO(data)).size == (80, 120)
        info = probe_image(data)
        assert (info.width, info.height) == (120, 80)
        img = decode_rgb(data)
        assert img.mode == "RGB" and img.size == (120, 80)
        a = np.asarray(img).astype(int)
        assert a[:, :50, 0].mean() > 200 and a[:, :50, 2].mean() < 60
        assert a[:, 70:, 2].mean() > 200 and a[:, 70:, 0].mean() < 60


def test_cmyk_jpeg() -> None:
    src = _halves(64, 48)
    data = _encode(src.convert("CMYK"), "JPEG", quality=95)
    assert probe_image(data).mode == "CMYK"
    img = decode_rgb(data)
    assert img.mode == "RGB" and img.size == (64, 48)
    assert np.abs(np.asarray(img).astype(int) - np.asarray(src).astype(int)).mean() < 12


def test_sixteen_bit_png_keeps_gradient() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (32, 1))
    data = _encode(Image.fromarray(ramp), "PNG")
    assert probe_image(data).mode.startswith("I")
    a = np.asarray(decode_rgb(data))
    assert a.shape == (32, 256, 3)
    expected = np.rint(ramp.astype(np.float64) / 257.0)
    assert np.abs(a[..., 0].astype(float) - expected).max() <= 1
    assert a.min() == 0 and a.max() == 255 and (a == 255).mean() < 0.05
    assert np.all(np.diff(a[0, :, 0].astype(int)) >= 0)


def test_grayscale_png() -> None:
    g = np.arange(50 * 70, dtype=np.uint32).reshape(50, 70) % 256
    img = decode_rgb(_encode(Image.fromarray(g.astype(np.uint8)), "PNG"))
    a = np.asarray(img)
    assert img.size == (70, 50)
    assert np.array_equal(a[..., 0], g) and np.array_equal(a[..., 1], g)


def test_palette_with_transparency_composites_on_grey() -> None:
    p = Image.new("P", (40, 30), 0)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (20, 0, 40, 30))
    data = _encode(p, "PNG", transparency=0)
    a = np.asarray(decode_rgb(data))
    assert a.shape == (30, 40, 3)
    assert np.all(a[:, :20] == 128)
    assert np.all(a[:, 20:] == (0, 255, 0))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composited_on_neutral_background(mode: str) -> None:
    a = np.zeros((20, 30, 4), np.uint8)
    a[..., :3] = 250
    a[:, :10, 3] = 0
    a[:, 10:20, 3] = 255
    a[:, 20:, 3] = 128
    img = Image.fromarray(a, "RGBA").convert(mode)
    out = np.asarray(decode_rgb(_encode(img, "PNG"))).astype(float)
    assert np.all(out[:, :10] == 128)
    assert np.all(out[:, 10:20] == 250)
    expected_mix = 250 * 128 / 255 + 128 * (1 - 128 / 255)
    assert np.abs(out[:, 20:] - expected_mix).max() <= 1.5


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (32, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    info = probe_image(data)
    assert info.format == "GIF" and info.n_frames == 3
    a = np.asarray(decode_rgb(data))
    assert a.shape == (24, 32, 3) and np.all(a == (255, 0, 0))


def test_webp() -> None:
    src = _noise_rgb(50, 40, seed=2)
    data = _encode(src, "WEBP", lossless=True)
    assert probe_image(data).format == "WEBP"
    assert np.array_equal(np.asarray(decode_rgb(data)), np.asarray(src))


def test_probe_reports_declared_jpeg_size() -> None:
    data = _encode(_noise_rgb(333, 211), "JPEG")
    assert probe_image(data) == decode.ImageInfo(333, 211, "JPEG", "RGB", 1)


@pytest.mark.parametrize("min_side", [30, 70, 150, 300])
def test_min_side_uses_smallest_sufficient_jpeg_scale(min_side: int) -> None:
    w, h = 400, 300
    data = _encode(_noise_rgb(w, h), "JPEG")
    img = decode_rgb(data, min_side=min_side)
    scale = max(s for s in (1, 2, 4, 8) if -(-h // s) >= min_side)
    assert img.size == (-(-w // scale), -(-h // scale))
    assert min(img.size) >= min_side


def test_preprocess_matches_numpy_reference() -> None:
    pre = Preprocess(size=64)
    assert pre.resize_size == round(64 * 256 / 224)
    img = _noise_rgb(120, 90, seed=4)
    x = pre(img)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    r = pre.resize_size
    resized = np.asarray(img.resize((round(120 * r / 90), r), Image.Resampling.BICUBIC))
    top = int(round((r - 64) / 2.0))
    left = int(round((resized.shape[1] - 64) / 2.0))
    crop = resized[top : top + 64, left : left + 64].astype(np.float64) / 255.0
    ref = (crop - np.array(decode.IMAGENET_MEAN)) / np.array(decode.IMAGENET_STD)
    ref = ref.transpose(2, 0, 1)
    assert np.allclose(x, ref, atol=1e-5)


def test_preprocess_constant_image_is_exact_normalisation() -> None:
    pre = Preprocess()
    x = pre(Image.new("RGB", (300, 200), (10, 128, 240)))
    assert x.shape == (3, 224, 224)
    for c, v in enumerate((10, 128, 240)):
        expected = (v / 255.0 - decode.IMAGENET_MEAN[c]) / decode.IMAGENET_STD[c]
        assert np.allclose(x[c], expected, atol=1e-4)


def test_preprocess_fingerprint_is_stable_and_discriminating() -> None:
    assert Preprocess().fingerprint() == Preprocess(224, 256).fingerprint()
    assert Preprocess().fingerprint() != Preprocess(interpolation="bilinear").fingerprint()
    assert Preprocess().fingerprint() != Preprocess(224, 288).fingerprint()
    with pytest.raises(ValueError):
        Preprocess(224, 200)
