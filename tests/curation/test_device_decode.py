"""The embed stage's device path (`curation.device_decode`) against the CPU path (`catalog.decode`).

On CPU the device decoder is PIL's (the stand-in for nvJPEG); ``pytest --device cuda`` runs the same
tests with nvJPEG (`benchmarks/gpu_session.sh tests`). Only the decoder differs: the routing, batching,
fallback, ordering and the tensor resize/crop are the code the GPU runs.
"""

from __future__ import annotations

import io
import os
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from catalog.decode import CORRUPT, DecodeError, Preprocess, decode_crop, decode_rgb, plain_jpeg
from curation.device_decode import (
    DeviceBatch,
    device_batches,
    jpeg_decoder,
    normalize,
    pil_decoder,
    prefetched,
    resize_crop,
)

# Tolerance in 8-bit levels of |device path - CPU path| over the demo pool's plain JPEGs, per crop size:
# (mean, 99th percentile). At 224 px (resize 256) no demo image is decoded at reduced scale: what is left
# is PIL's fixed-point resampling against float (measured on CPU: mean 0.16, p99 1; a wrong kernel, no
# antialiasing or a crop one pixel off give 0.47-2.2 / 4-21). At 64 px the CPU path decodes most demo
# JPEGs at 1/2 or 1/4 scale (DCT-domain reduction, a softer filter than antialiased bicubic from full
# resolution; measured: mean 0.50-0.59, p99 7-8). On CUDA nvJPEG's IDCT and chroma upsampling add up to
# about a level; that part is measured only where `gpu_session.sh` runs.
TOLERANCE = {224: (0.35, 2.0), 64: (1.0, 10.0)}


def _pool_files(demo_pool: str) -> list[tuple[dict, bytes]]:
    rows = pq.read_table(os.path.join(demo_pool, "truth", "pool.parquet")).to_pylist()
    out = []
    for r in rows:
        path = os.path.join(demo_pool, "pool", r["relpath"])
        if os.path.exists(path):
            with open(path, "rb") as f:
                out.append((r, f.read()))
    return out


@pytest.fixture(scope="module")
def pool_files(demo_pool) -> list[tuple[dict, bytes]]:
    return _pool_files(demo_pool)


@pytest.fixture(scope="module")
def jpegs(pool_files) -> list[bytes]:
    return [data for _, data in pool_files if plain_jpeg(data)]


def _jpeg(seed: int, size: tuple[int, int] = (160, 120), **save) -> bytes:
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def _corrupt_scan(data: bytes) -> bytes:
    """A JPEG whose header and end marker are intact but whose entropy-coded data is garbage."""
    mid = bytearray(data)
    mid[len(data) // 2 : len(data) // 2 + 200] = b"\xff" * 200
    return bytes(mid)


def test_plain_jpeg_takes_exactly_the_jpegs_a_plain_decoder_reads_as_decode_rgb_does(pool_files):
    routed = {}
    for row, data in pool_files:
        ok = plain_jpeg(data)
        routed.setdefault((row["kind"], row["detail"]), set()).add(ok)
        if ok:  # nothing for decode_rgb to fix: the plain RGB conversion is its result
            plain = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            assert np.array_equal(np.asarray(decode_rgb(data)), plain)
    awkward = [k for k in routed if k[0] in ("broken", "awkward")]
    assert awkward and all(routed[k] == {False} for k in awkward)  # CMYK, EXIF-rotated, cut, not JPEG…
    assert True in routed[("normal", "")] and False in routed[("normal", "")]  # JPEGs and PNGs
    assert plain_jpeg(_jpeg(0)) and plain_jpeg(_jpeg(1, progressive=True))
    assert not plain_jpeg(_jpeg(2)[:-2]) and not plain_jpeg(_jpeg(3), max_pixels=100)


@pytest.mark.parametrize("size", sorted(TOLERANCE))
def test_device_resize_crop_agrees_with_the_cpu_path_within_the_stated_tolerance(jpegs, device, size):
    pre, decode = Preprocess(size=size), jpeg_decoder(device)
    diffs = []
    for data in jpegs[:: max(1, len(jpegs) // 150)]:
        cpu = decode_crop(data, pre).astype(np.float32)
        dev = resize_crop(decode([data])[0], pre)
        assert dev.shape == (3, size, size) and dev.dtype == torch.float32
        diffs.append(np.abs(dev.permute(1, 2, 0).cpu().numpy() - cpu).ravel())
    d = np.concatenate(diffs)
    mean, p99 = TOLERANCE[size]
    assert len(diffs) >= 120 and d.mean() <= mean and np.percentile(d, 99) <= p99, (d.mean(), np.percentile(d, 99))


def test_normalize_is_the_cpu_normalisation_bit_for_bit():
    pre = Preprocess(size=16)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    got = normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2).float(), pre)
    assert np.array_equal(got.numpy(), pre.normalize_batch(pixels))


def _baseline_only(device: torch.device):
    """A decoder that, like some hardware decoders, rejects files PIL reads (progressive JPEGs)."""
    pil = pil_decoder(device)

    def decode(files: list[bytes]) -> list[torch.Tensor]:
        if any(Image.open(io.BytesIO(f)).info.get("progressive") for f in files):
            raise RuntimeError("progressive JPEG not supported")
        return pil(files)

    return decode


def test_batches_keep_unit_order_and_fall_back_to_the_cpu_path_with_its_reasons(device):
    pre = Preprocess(size=32)
    host_decode = lambda data: decode_crop(data, pre)  # noqa: E731
    good = [_jpeg(i, (60 + 7 * i, 50 + 3 * i)) for i in range(6)]
    progressive = _jpeg(10, progressive=True)
    broken = _corrupt_scan(_jpeg(11))
    png = io.BytesIO()
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(png, "PNG")
    # unit: 0 jpeg, 1 host-decoded png, 2 failed in load, 3 progressive, 4 jpeg, 5 corrupt scan, 6-9 jpegs
    files = [good[0], png.getvalue(), b"", progressive, good[1], broken, *good[2:]]
    usable = [i != 2 for i in range(len(files))]
    encoded = [f if plain_jpeg(f) else b"" for f in files]
    encoded[2] = b""
    assert [bool(e) for e in encoded] == [True, False, False, True, True, True, True, True, True, True]
    host_pixels = np.stack([decode_crop(files[1], pre)])
    batches = list(device_batches(encoded, host_pixels, usable, pre, _baseline_only(device), host_decode, device, 4))

    assert [b.positions for b in batches] == [[0, 1, 3, 4], [6, 7, 8], [9]]  # 2 failed in load, 5 here
    assert batches[1].failed.keys() == {5} and batches[1].failed[5].reason == CORRUPT
    with pytest.raises(DecodeError) as cpu:
        decode_crop(broken, pre)
    assert str(batches[1].failed[5]) == str(cpu.value)
    assert batches[0].redecoded == 1 and batches[0].failed == {}  # the progressive file, read by PIL
    x = torch.cat([b.x for b in batches]).cpu()
    dev = jpeg_decoder(device)
    for row, i in enumerate(p for b in batches for p in b.positions):
        if i in (1, 3):  # host pixels: exactly the CPU path's
            expected = torch.from_numpy(pre.normalize_batch(decode_crop(files[i], pre)[None])[0])
            assert torch.equal(x[row], expected)
        else:
            expected = normalize(resize_crop(dev([files[i]])[0], pre)[None], pre)[0].cpu()
            assert torch.allclose(x[row], expected, atol=1e-6)


def test_batches_refuse_host_pixels_that_do_not_match_the_unit(device):
    pre = Preprocess(size=8)
    with pytest.raises(ValueError, match="2 host-decoded images for 1"):
        list(device_batches([b""], np.zeros((2, 8, 8, 3), np.uint8), [True], pre, pil_decoder(device),
                            lambda d: decode_crop(d, pre), device, 4))


def _numbered(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise DecodeError(CORRUPT, "made to fail")
        yield DeviceBatch([i], torch.full((1, 3, 2, 2), float(i)))


def test_prefetched_yields_in_order_raises_worker_errors_and_stops_early(device):
    got = [int(b.x[0, 0, 0, 0]) for b in prefetched(_numbered(7), device)]
    assert got == list(range(7))
    seen = []
    with pytest.raises(DecodeError, match="made to fail"):
        for b in prefetched(_numbered(7, fail_at=3), device):
            seen.append(b.positions[0])
    assert seen == [0, 1, 2]
    stream = prefetched(_numbered(100), device, depth=1)
    assert next(stream).positions == [0]
    stream.close()  # the worker thread is stopped and joined
    assert not any(t.name == "curate-prefetch" and t.is_alive() for t in threading.enumerate())
