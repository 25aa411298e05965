"""The bundled demo pool: a deterministic, web-like image folder with sidecar ground truth.

Curation stages see only `OUT/pool` (and the labelled stand-in for ImageNet in `OUT/seed`);
`OUT/truth/*.parquet` records what each file really is (concept, near-duplicate group, broken or
awkward kind) so evaluations can score curation without any stage reading it.

Content is the ~300 concepts of `pipelines.demo.concepts` with Zipf-like frequencies, plus
near-duplicates, exact copies, broken files and awkward-but-valid formats.
Every file is a pure function of (seed, plan position), so worker count never changes a byte.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

from pipelines.demo.concepts import (
    CONCEPTS,
    N_CONCEPTS,
    N_SUPER_CONCEPTS,
    dense_probe_set,
    render_concept_image,
)

ZIPF_EXPONENT = 1.1
MIN_CONCEPT_COUNT = 2
MIN_SIDE, MAX_SIDE = 48, 256
FILES_PER_DIR = 1000
NEAR_DUP_FRACTION = 0.04
SEED_SET_CONCEPTS, SEED_SET_PER_CONCEPT = 15, 20

BROKEN_KINDS = ("empty_file", "truncated_jpeg", "text_as_jpg", "html_as_jpg", "png_bomb",
                "random_bytes_png", "corrupt_png", "dangling_symlink")
AWKWARD_KINDS = ("cmyk_jpeg", "png16", "gray_png", "palette_trns_png", "animated_gif",
                 "exif_rotated_jpeg", "webp", "rgba_png")
NEAR_DUP_TRANSFORMS = ("reencode", "resize", "crop", "format")
# Valid images a quality filter should remove (kind "low_quality"), planted only on request so that the
# default pool, and every figure measured on it, stays as it was.
LOW_QUALITY_KINDS = ("blurred", "constant", "tiny", "extreme_aspect")
_EXT = {"jpeg": "jpg", "png": "png", "empty_file": "jpg", "truncated_jpeg": "jpg",
        "text_as_jpg": "jpg", "html_as_jpg": "jpg", "png_bomb": "png", "random_bytes_png": "png",
        "corrupt_png": "png", "dangling_symlink": "jpg", "cmyk_jpeg": "jpg", "png16": "png",
        "gray_png": "png", "palette_trns_png": "png", "animated_gif": "gif",
        "exif_rotated_jpeg": "jpg", "webp": "webp", "rgba_png": "png"}
_TEXT_BODIES = (
    "Access denied. You do not have permission to view this resource.\n",
    "The requested URL was rejected. Please consult with your administrator.\n",
    "{\"error\": \"rate limited\", \"retry_after\": 60}\n",
)
_HTML_BODIES = (
    "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n<body><h1>Not Found"
    "</h1><p>The requested URL was not found on this server.</p></body></html>\n",
    "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Just a moment..."
    "</title></head><body><noscript>Enable JavaScript and cookies to continue</noscript>"
    "</body></html>\n",
)



def plan_concept_counts(n: int, n_concepts: int = N_CONCEPTS, seed: int = 0) -> np.ndarray:
    """Images per concept: Zipf(ZIPF_EXPONENT) over a seeded ranking, each present concept >= 2.

    When n cannot give every concept MIN_CONCEPT_COUNT images, only the top-ranked
    n // (2 * MIN_CONCEPT_COUNT) concepts are present (the rest get 0), keeping a tail.
    """
    n_active = min(n_concepts, n // (2 * MIN_CONCEPT_COUNT))
    if n_active < 1:
        raise ValueError(f"n={n} is too small for a concept plan")
    weights = 1.0 / np.arange(1, n_active + 1) ** ZIPF_EXPONENT
    spare = n - MIN_CONCEPT_COUNT * n_active
    quota = spare * weights / weights.sum()
    by_rank = np.floor(quota).astype(np.int64)
    leftover = spare - int(by_rank.sum())
    by_rank[np.argsort(-(quota - by_rank), kind="stable")[:leftover]] += 1
    counts = np.zeros(n_concepts, np.int64)
    ranking = np.random.default_rng(seed).permutation(n_concepts)
    counts[ranking[:n_active]] = by_rank + MIN_CONCEPT_COUNT
    return counts



# ---------------------------------------------------------------------------------- encoding


def _save(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    if fmt == "PNG":
        kw.setdefault("compress_level", 1)  # level 6 is 4x slower on noisy content
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    return _save(img, "JPEG", quality=quality) if fmt == "jpeg" else _save(img, "PNG")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def _png_bomb(rng: np.random.Generator) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header declares >= 81 Mpx."""
    w, h = (int(v) for v in rng.integers(9_000, 100_001, 2))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 256)) + _png_chunk(b"IEND", b""))


def _broken_bytes(detail: str, img: Image.Image, rng: np.random.Generator) -> bytes:
    if detail == "empty_file":
        return b""
    if detail == "truncated_jpeg":
        data = _save(img, "JPEG", quality=90)
        scan = data.find(b"\xff\xda") + 20
        return data[: scan + int((len(data) - scan) * rng.uniform(0.2, 0.9))]
    if detail == "text_as_jpg":
        return _TEXT_BODIES[int(rng.integers(len(_TEXT_BODIES)))].encode()
    if detail == "html_as_jpg":
        return _HTML_BODIES[int(rng.integers(len(_HTML_BODIES)))].encode()
    if detail == "png_bomb":
        return _png_bomb(rng)
    if detail == "random_bytes_png":
        return rng.bytes(int(rng.integers(256, 4096)))
    if detail == "corrupt_png":  # bit rot inside the compressed stream, header intact
        data = bytearray(_save(img, "PNG"))
        idat = data.find(b"IDAT")
        length = int.from_bytes(data[idat - 4 : idat], "big")
        start = idat + 6 + int((length - 2) * 0.3)
        n = max(4, length // 8)
        data[start : start + n] = rng.bytes(n)
        return bytes(data)
    raise ValueError(f"unknown broken kind {detail!r}")


def _awkward_bytes(detail: str, img: Image.Image, mask: np.ndarray,
                   rng: np.random.Generator) -> bytes:
    if detail == "cmyk_jpeg":
        return _save(img.convert("CMYK"), "JPEG", quality=90)
    if detail == "png16":
        grey = np.asarray(img.convert("L"), np.uint16) * 257
        return _save(Image.fromarray(grey), "PNG")
    if detail == "gray_png":
        return _save(img.convert("L"), "PNG")
    if detail == "palette_trns_png":
        pal = img.quantize(64)
        return _save(pal, "PNG", transparency=int(pal.getpixel((0, 0))))
    if detail == "animated_gif":
        shift = int(rng.integers(2, 8))
        frames = [img.rotate(0, translate=(k * shift, 0)) for k in range(1, 3)]
        return _save(img, "GIF", save_all=True, append_images=frames, duration=120, loop=0)
    if detail == "exif_rotated_jpeg":
        orientation = 6 if rng.random() < 0.5 else 8
        stored = img.transpose(Image.Transpose.ROTATE_90 if orientation == 6
                               else Image.Transpose.ROTATE_270)
        exif = Image.Exif()
        exif[0x0112] = orientation
        return _save(stored, "JPEG", quality=90, exif=exif.tobytes())
    if detail == "webp":
        return _save(img, "WEBP", quality=80)
    if detail == "rgba_png":
        w, h = img.size
        ramp = np.linspace(rng.uniform(60, 120), 255, w, dtype=np.float32)[None, :]
        alpha = np.where(mask > 0, 255.0, np.broadcast_to(ramp, (h, w))).astype(np.uint8)
        rgba = img.copy()
        rgba.putalpha(Image.fromarray(alpha))
        return _save(rgba, "PNG")
    raise ValueError(f"unknown awkward kind {detail!r}")


def _near_duplicate_bytes(img: Image.Image, item: dict[str, Any],
                          rng: np.random.Generator) -> bytes:
    fmt, quality, transform = item["fmt"], item["quality"], item["detail"]
    w, h = img.size
    if transform == "reencode":
        return _save(img, "JPEG", quality=int(rng.integers(45, 70)))
    if transform == "format":
        return _encode(img, "png" if fmt == "jpeg" else "jpeg", 90)
    if transform == "resize":
        f = rng.uniform(0.6, 0.85) if rng.random() < 0.7 else rng.uniform(1.15, 1.4)
        if max(w, h) * f > MAX_SIDE:
            f = 1.0 / f
        img = img.resize((max(24, round(w * f)), max(24, round(h * f))),
                         Image.Resampling.BICUBIC)
        return _encode(img, fmt, quality)
    left, right = rng.uniform(0, 0.05, 2) * w
    top, bottom = rng.uniform(0, 0.05, 2) * h
    img = img.crop((round(left), round(top), w - round(right), h - round(bottom)))
    return _encode(img, fmt, quality)


def _low_quality_bytes(detail: str, img: Image.Image, rng: np.random.Generator) -> bytes:
    """A planted defect; tiny and extreme-aspect images were planned at their size, the others are made here."""
    if detail == "blurred":  # a blur radius of 1/6 of the longer side: out of focus at any scale
        return _save(img.filter(ImageFilter.GaussianBlur(max(img.size) / 6)), "JPEG", quality=95)
    if detail == "constant":  # one colour with faint sensor noise
        w, h = img.size
        colour = rng.integers(0, 256, 3).astype(np.float32)
        flat = colour + rng.standard_normal((h, w, 3), dtype=np.float32) * 0.8
        return _save(Image.fromarray(np.clip(flat, 0, 255).astype(np.uint8), "RGB"), "JPEG", quality=90)
    if detail in ("tiny", "extreme_aspect"):
        return _save(img, "PNG")
    raise ValueError(f"unknown low-quality kind {detail!r}")


def _materialise(out: Path, item: dict[str, Any]) -> None:
    """Write one planned file; everything it needs is in `item`, so any process can do it."""
    path = out / item["rel"]
    if item["detail"] == "dangling_symlink":
        os.symlink(f".gone-{path.name}", path)
        return
    path.write_bytes(_item_bytes(item))


def _item_bytes(item: dict[str, Any]) -> bytes:
    """The encoded file of one planned item (not a symlink)."""
    render_concept = item["concept"] if item["concept"] >= 0 else item["render_concept"]
    img, mask = render_concept_image(render_concept, item["instance_seed"], item["size"])
    rng = np.random.default_rng([item["instance_seed"], 1])
    kind = item["kind"]
    if kind == "broken":
        return _broken_bytes(item["detail"], img, rng)
    elif kind == "awkward":
        return _awkward_bytes(item["detail"], img, mask, rng)
    elif kind == "near_duplicate":
        return _near_duplicate_bytes(img, item, np.random.default_rng(item["transform_seed"]))
    elif kind == "low_quality":
        return _low_quality_bytes(item["detail"], img, rng)
    else:
        return _encode(img, item["fmt"], item["quality"])


def injected_copy_groups(groups: int, seed: int = 0, n: int = 10_000) -> tuple[list[bytes], np.ndarray]:
    """The files of the first ``groups`` near-duplicate groups that the demo pool of (``n``, ``seed``)
    injects (each an original and its re-encoded, re-formatted, resized or cropped copies; exact copies
    left out), made in memory, and the group of each: labelled copies without a pool on disk."""
    items, _ = _plan_pool(n, seed)
    near = sorted({it["dup_group"] for it in items if it["kind"] == "near_duplicate"})[:groups]
    chosen = sorted((it for it in items if it["dup_group"] in set(near)), key=lambda it: it["dup_group"])
    return [_item_bytes(it) for it in chosen], np.array([it["dup_group"] for it in chosen])


def _materialise_chunk(out: str, items: list[dict[str, Any]]) -> None:
    for item in items:
        _materialise(Path(out), item)


# ---------------------------------------------------------------------------------- planning


def _draw_size(rng: np.random.Generator, non_square: bool = False) -> tuple[int, int]:
    side = math.exp(rng.uniform(math.log(MIN_SIDE), math.log(MAX_SIDE)))
    aspect = 1.0 if rng.random() < 0.4 else math.exp(rng.uniform(-0.5, 0.5))
    w = int(np.clip(round(side * math.sqrt(aspect)), MIN_SIDE, MAX_SIDE))
    h = int(np.clip(round(side / math.sqrt(aspect)), MIN_SIDE, MAX_SIDE))
    if non_square and w == h:
        h = w - 16 if w >= MIN_SIDE + 16 else w + 16
    return w, h


def _item(rng: np.random.Generator, concept: int, kind: str, detail: str = "",
          non_square: bool = False) -> dict[str, Any]:
    return {"concept": concept, "kind": kind, "detail": detail, "dup_group": -1,
            "instance_seed": int(rng.integers(0, 2**63)), "size": _draw_size(rng, non_square),
            "fmt": "png" if rng.random() < 0.15 else "jpeg",
            "quality": int(rng.integers(72, 96)), "render_concept": -1, "transform_seed": 0}


def _ext(item: dict[str, Any]) -> str:
    if item["kind"] in ("broken", "awkward"):
        return _EXT[item["detail"]]
    if item["kind"] == "near_duplicate" and item["detail"] in ("reencode", "format"):
        to_png = item["detail"] == "format" and item["fmt"] == "jpeg"
        return "png" if to_png else "jpg"
    return _EXT[item["fmt"]]


def _low_quality_size(detail: str, rng: np.random.Generator) -> tuple[int, int]:
    """Tiny: both sides 8..20 px; extreme aspect: 4..6 : 1 with the shorter side >= 32 (so never tiny)."""
    if detail == "tiny":
        return int(rng.integers(8, 21)), int(rng.integers(8, 21))
    if detail == "extreme_aspect":
        short = int(rng.integers(32, 49))
        long = int(round(short * rng.uniform(4.0, 6.0)))
        return (long, short) if rng.random() < 0.5 else (short, long)
    return _draw_size(rng)


def _plan_low_quality(per_kind: int, seed: int) -> list[dict[str, Any]]:
    """``per_kind`` planted images of each `LOW_QUALITY_KINDS`, drawn from their own random stream."""
    rng = np.random.default_rng([seed, 3])
    items = []
    for i in range(per_kind * len(LOW_QUALITY_KINDS)):
        detail = LOW_QUALITY_KINDS[i % len(LOW_QUALITY_KINDS)]
        item = _item(rng, -1, "low_quality", detail)
        item.update(size=_low_quality_size(detail, rng), render_concept=int(rng.integers(N_CONCEPTS)),
                    fmt="png" if detail in ("tiny", "extreme_aspect") else "jpeg")
        items.append(item)
    return items


def _plan_pool(n: int, seed: int, low_quality_per_kind: int = 0) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Every pool file as a plain dict (truth + render recipe), in final listing order."""
    rng = np.random.default_rng([seed, 0])
    per_kind = max(2, round(n * 0.0005))
    n_exact = max(2, n // 1000)
    group_sizes: list[int] = []
    while sum(group_sizes) < max(4, round(NEAR_DUP_FRACTION * n)):
        group_sizes.append(int(rng.choice([2, 3, 4, 5], p=[0.45, 0.3, 0.15, 0.1])))
    n_broken, n_awkward = per_kind * len(BROKEN_KINDS), per_kind * len(AWKWARD_KINDS)
    n_content = n - n_broken - n_exact - sum(g - 1 for g in group_sizes)
    if n_content < 2 * (n_awkward + len(group_sizes) + n_exact):
        raise ValueError(f"n={n} is too small: {n_broken} broken and {n_awkward} awkward "
                         "files must stay a minority of the pool")
    counts = plan_concept_counts(n_content, N_CONCEPTS, seed)
    concepts = rng.permutation(np.repeat(np.arange(N_CONCEPTS), counts))
    items = []
    for i, c in enumerate(concepts):
        awkward = i < n_awkward
        detail = AWKWARD_KINDS[i % len(AWKWARD_KINDS)] if awkward else ""
        items.append(_item(rng, int(c), "awkward" if awkward else "normal", detail,
                           non_square=detail == "exif_rotated_jpeg"))
    originals = rng.choice(np.arange(n_awkward, n_content), len(group_sizes) + n_exact,
                           replace=False)
    for group, (orig, size) in enumerate(zip(originals, group_sizes + [2] * n_exact)):
        base = items[int(orig)]
        base["dup_group"] = group
        exact = group >= len(group_sizes)
        for _ in range(size - 1):
            copy = dict(base, kind="exact_duplicate" if exact else "near_duplicate")
            if not exact:
                copy["detail"] = NEAR_DUP_TRANSFORMS[int(rng.integers(len(NEAR_DUP_TRANSFORMS)))]
                copy["transform_seed"] = int(rng.integers(0, 2**63))
            items.append(copy)
    for i in range(n_broken):
        broken = _item(rng, -1, "broken", BROKEN_KINDS[i % len(BROKEN_KINDS)])
        broken["render_concept"] = int(rng.integers(N_CONCEPTS))
        items.append(broken)
    items += _plan_low_quality(low_quality_per_kind, seed)
    order = rng.permutation(len(items))
    listed = [items[i] for i in order]
    for pos, item in enumerate(listed):
        name = hashlib.sha1(f"{seed}:{pos}".encode()).hexdigest()[:16]
        item["rel"] = f"pool/{pos // FILES_PER_DIR:03d}/{name}.{_ext(item)}"
    return listed, counts


def _plan_seed_set(counts: np.ndarray, n: int, seed: int) -> list[dict[str, Any]]:
    """Fresh labelled instances (never pool copies) of a few concepts present in the pool;
    small pools get fewer per concept so tests stay fast."""
    rng = np.random.default_rng([seed, 1])
    present = np.flatnonzero(counts > 0)
    chosen = np.sort(rng.choice(present, min(SEED_SET_CONCEPTS, len(present)), replace=False))
    per_concept = min(SEED_SET_PER_CONCEPT, max(5, n // 100))
    items = []
    for c in chosen:
        for j in range(per_concept):
            item = _item(rng, int(c), "seed")
            item.update(fmt="jpeg", size=(int(rng.integers(96, 257)), int(rng.integers(96, 257))),
                        rel=f"seed/{CONCEPTS[c].name}/{j:03d}.jpg")
            items.append(item)
    return items


def _write_truth(out: Path, pool: list[dict[str, Any]], seed_items: list[dict[str, Any]]
                 ) -> None:
    truth = out / "truth"
    truth.mkdir(parents=True, exist_ok=True)
    pool = sorted(pool, key=lambda it: it["rel"])

    def concept_attr(item: dict[str, Any], attr: str, missing: Any) -> Any:
        return getattr(CONCEPTS[item["concept"]], attr) if item["concept"] >= 0 else missing

    pq.write_table(pa.table({
        "relpath": pa.array([it["rel"].removeprefix("pool/") for it in pool], pa.string()),
        "concept": pa.array([it["concept"] for it in pool], pa.int32()),
        "concept_name": pa.array([concept_attr(it, "name", "") for it in pool], pa.string()),
        "super_concept": pa.array([concept_attr(it, "super_concept", -1) for it in pool],
                                  pa.int32()),
        "family": pa.array([concept_attr(it, "family", "") for it in pool], pa.string()),
        "dup_group": pa.array([it["dup_group"] for it in pool], pa.int32()),
        "kind": pa.array([it["kind"] for it in pool], pa.string()),
        "detail": pa.array([it["detail"] for it in pool], pa.string()),
        "instance_seed": pa.array([it["instance_seed"] for it in pool], pa.int64()),
    }), truth / "pool.parquet")
    pq.write_table(pa.table({
        "relpath": pa.array([it["rel"].removeprefix("seed/") for it in seed_items], pa.string()),
        "concept": pa.array([it["concept"] for it in seed_items], pa.int32()),
        "concept_name": pa.array([CONCEPTS[it["concept"]].name for it in seed_items],
                                 pa.string()),
    }), truth / "seed.parquet")
    shown = np.bincount([it["concept"] for it in pool if it["concept"] >= 0],
                        minlength=N_CONCEPTS)
    pq.write_table(pa.table({
        "concept": pa.array([c.id for c in CONCEPTS], pa.int32()),
        "name": pa.array([c.name for c in CONCEPTS], pa.string()),
        "family": pa.array([c.family for c in CONCEPTS], pa.string()),
        "super_concept": pa.array([c.super_concept for c in CONCEPTS], pa.int32()),
        "count": pa.array(shown, pa.int64()),
    }), truth / "concepts.parquet")


DENSE_PROBE_FILE = "truth/dense_probe.npz"


def generate_demo_pool(out: str, n: int = 10_000, seed: int = 0, workers: int | None = None,
                       low_quality_per_kind: int = 0) -> dict[str, int]:
    """Write OUT/pool, OUT/seed and OUT/truth (with the dense probe set) for (n, seed); returns counts by kind.

    ``low_quality_per_kind`` > 0 plants that many images of each `LOW_QUALITY_KINDS` (kind ``low_quality``
    in the truth) on top of the ``n`` files; 0 (the default) leaves the pool byte for byte as without them.

    Refuses a non-empty OUT/pool so a stale pool never mixes with a new one. Workers are
    spawned (not forked, so threads of Ray or torch in the caller are harmless); scripts that
    call this must do so under `if __name__ == "__main__":`.
    """
    root = Path(out)
    if (root / "pool").exists() and any((root / "pool").iterdir()):
        raise FileExistsError(f"{root / 'pool'} is not empty")
    pool, counts = _plan_pool(n, seed, low_quality_per_kind)
    seed_items = _plan_seed_set(counts, n, seed)
    everything = pool + seed_items
    for folder in sorted({(root / it["rel"]).parent for it in everything}):
        folder.mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = os.cpu_count() or 1
    if workers <= 1:
        _materialise_chunk(str(root), everything)
    else:
        n_chunks = workers * 8
        chunks = [everything[i::n_chunks] for i in range(n_chunks)]
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
            list(ex.map(_materialise_chunk, [str(root)] * n_chunks, chunks))
    _write_truth(root, pool, seed_items)
    images, masks = dense_probe_set(96, 96, seed)
    np.savez_compressed(root / DENSE_PROBE_FILE, images=images, masks=masks)
    kinds = [it["kind"] for it in pool]
    summary = {k: kinds.count(k) for k in
               ("normal", "near_duplicate", "exact_duplicate", "broken", "awkward")}
    if low_quality_per_kind:
        summary["low_quality"] = kinds.count("low_quality")
    summary.update(n_files=len(pool), n_seed_images=len(seed_items),
                   n_dup_groups=len({it["dup_group"] for it in pool} - {-1}),
                   n_concepts_present=int((counts > 0).sum()),
                   n_super_concepts=N_SUPER_CONCEPTS)
    return summary
