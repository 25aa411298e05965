"""pipelines.demo.pool: a small pool (n=300) checked against its own ground truth."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catalog import decode
from catalog.decode import DecodeError, decode_rgb
from pipelines.demo.concepts import CONCEPTS, N_CONCEPTS, PALETTES, render_concept_image
from pipelines.demo.pool import (
    AWKWARD_KINDS,
    BROKEN_KINDS,
    ZIPF_EXPONENT,
    generate_demo_pool,
    injected_copy_groups,
    plan_concept_counts,
)

N = 300
EXPECTED_REASON = {
    "empty_file": decode.EMPTY_FILE,
    "truncated_jpeg": decode.TRUNCATED,
    "text_as_jpg": decode.TEXT_FILE,
    "html_as_jpg": decode.HTML_PAGE,
    "png_bomb": decode.DECOMPRESSION_BOMB,
    "random_bytes_png": decode.NOT_AN_IMAGE,
    "corrupt_png": decode.CORRUPT,
    "dangling_symlink": decode.MISSING,
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("demo")
    return out, generate_demo_pool(str(out), n=N, seed=0, workers=1)


def _rows(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / "truth" / f"{name}.parquet").to_pylist()


def _digest(path: Path) -> str:
    if path.is_symlink():
        return "link:" + os.readlink(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _digest(p)
            for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}


def _decode_file(path: Path) -> Image.Image:
    """What a caller does: a vanished file is a `missing` decode failure."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise DecodeError(decode.MISSING, str(path)) from e
    return decode_rgb(data)


def _thumb(path: Path) -> np.ndarray:
    """Area-averaged 8x8: a slight crop shifts the phase of fine textures, averaging forgives it
    while different concepts stay far apart."""
    return np.asarray(_decode_file(path).resize((8, 8), Image.Resampling.BOX), float)


def test_deterministic_and_independent_of_worker_count(pool, tmp_path: Path) -> None:
    out, summary = pool
    again = generate_demo_pool(str(tmp_path), n=N, seed=0, workers=2)
    assert again == summary
    first = {k: v for k, v in _tree(out).items() if not k.startswith("truth")}
    second = {k: v for k, v in _tree(tmp_path).items() if not k.startswith("truth")}
    assert first == second and len(first) == summary["n_files"] + summary["n_seed_images"]
    for name in ("pool", "seed", "concepts"):
        assert _rows(out, name) == _rows(tmp_path, name)


def test_refuses_non_empty_pool(pool) -> None:
    out, _ = pool
    with pytest.raises(FileExistsError):
        generate_demo_pool(str(out), n=N)


def test_truth_lists_every_pool_file(pool) -> None:
    out, summary = pool
    rows = _rows(out, "pool")
    on_disk = {str(p.relative_to(out / "pool")) for p in (out / "pool").rglob("*")
               if p.is_file() or p.is_symlink()}
    assert {r["relpath"] for r in rows} == on_disk and len(rows) == summary["n_files"] == N
    for folder in (out / "pool").iterdir():
        assert len(list(folder.iterdir())) <= 1000
    for r in rows:
        if r["kind"] == "broken":
            assert r["concept"] == -1 and r["super_concept"] == -1
        else:
            c = CONCEPTS[r["concept"]]
            assert (r["concept_name"], r["family"], r["super_concept"]) == (
                c.name, c.family, c.super_concept)
    concepts = _rows(out, "concepts")
    assert len(concepts) == N_CONCEPTS
    shown = np.bincount([r["concept"] for r in rows if r["concept"] >= 0], minlength=N_CONCEPTS)
    assert [c["count"] for c in concepts] == shown.tolist()
    assert len({c["super_concept"] for c in concepts}) >= 20


def test_every_broken_kind_fails_with_its_reason(pool) -> None:
    out, _ = pool
    broken = [r for r in _rows(out, "pool") if r["kind"] == "broken"]
    assert {r["detail"] for r in broken} == set(BROKEN_KINDS) == set(EXPECTED_REASON)
    for r in broken:
        with pytest.raises(DecodeError) as exc:
            _decode_file(out / "pool" / r["relpath"])
        assert exc.value.reason == EXPECTED_REASON[r["detail"]], r
    bombs = [out / "pool" / r["relpath"] for r in broken if r["detail"] == "png_bomb"]
    assert all(p.stat().st_size < 1000 for p in bombs)
    links = [out / "pool" / r["relpath"] for r in broken if r["detail"] == "dangling_symlink"]
    assert all(p.is_symlink() and not p.exists() for p in links)


def test_every_awkward_kind_decodes_to_its_content(pool) -> None:
    out, _ = pool
    awkward = [r for r in _rows(out, "pool") if r["kind"] == "awkward"]
    assert {r["detail"] for r in awkward} == set(AWKWARD_KINDS)
    for r in awkward:
        path = out / "pool" / r["relpath"]
        img = _decode_file(path)
        assert img.mode == "RGB"
        stored = Image.open(path)
        if r["detail"] == "exif_rotated_jpeg":
            assert img.size == stored.size[::-1] and img.size[0] != img.size[1]
        else:
            assert img.size == stored.size
        expected, mask = render_concept_image(r["concept"], r["instance_seed"], img.size)
        got = np.asarray(img, float)
        if r["detail"] in ("png16", "gray_png"):
            want = np.asarray(expected.convert("L"), float)[..., None]
            assert np.abs(got - want).max() <= 1
        elif r["detail"] in ("rgba_png", "palette_trns_png"):
            rgba = np.asarray(stored.convert("RGBA"), float)
            alpha = rgba[..., 3:] / 255.0
            assert alpha.min() < 1.0
            assert np.abs(got - (rgba[..., :3] * alpha + 128.0 * (1.0 - alpha))).max() <= 1
            assert np.abs(rgba[..., :3] - np.asarray(expected, float)).mean() < 12
        else:
            assert np.abs(got - np.asarray(expected, float)).mean() < 12, r


def test_near_duplicates_look_alike_and_exact_copies_match(pool) -> None:
    out, _ = pool
    rows = _rows(out, "pool")
    groups: dict[int, list[dict]] = {}
    for r in rows:
        if r["dup_group"] >= 0:
            groups.setdefault(r["dup_group"], []).append(r)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("near_duplicate") >= 4 and kinds.count("exact_duplicate") >= 2
    assert all(2 <= len(g) <= 5 for g in groups.values())
    normals = [r for r in rows if r["kind"] == "normal" and r["dup_group"] < 0]
    others = np.stack([_thumb(out / "pool" / r["relpath"]) for r in normals])
    for members in groups.values():
        (original,) = [m for m in members if m["kind"] == "normal"]
        assert len({m["concept"] for m in members}) == 1
        base = _thumb(out / "pool" / original["relpath"])
        nearest_other = np.abs(others - base).mean(axis=(1, 2, 3)).min()
        for m in members:
            if m["kind"] == "exact_duplicate":
                assert (_digest(out / "pool" / m["relpath"])
                        == _digest(out / "pool" / original["relpath"]))
            if m["kind"] == "near_duplicate":
                diff = np.abs(_thumb(out / "pool" / m["relpath"]) - base).mean()
                assert diff < 20 and diff < nearest_other, (m, diff, nearest_other)


def test_seed_set_is_fresh_labelled_instances(pool) -> None:
    out, _ = pool
    rows = _rows(out, "seed")
    pool_concepts = {r["concept"] for r in _rows(out, "pool")}
    assert len({r["concept"] for r in rows}) == 15
    pool_hashes = {_digest(p) for p in (out / "pool").rglob("*") if p.is_file()}
    for r in rows:
        path = out / "seed" / r["relpath"]
        assert path.parent.name == CONCEPTS[r["concept"]].name == r["concept_name"]
        assert r["concept"] in pool_concepts
        assert _digest(path) not in pool_hashes
        assert decode_rgb(path.read_bytes()).mode == "RGB"


def test_concept_plan_is_long_tailed_zipf() -> None:
    counts = plan_concept_counts(10_000, N_CONCEPTS, 0)
    assert counts.sum() == 10_000 and counts.min() >= 2
    assert counts.max() / counts.min() >= 100
    ranked = np.sort(counts)[::-1].astype(float)
    ranks = np.arange(1, len(ranked) + 1)
    slope = np.polyfit(np.log(ranks[:50]), np.log(ranked[:50] - 2), 1)[0]
    assert abs(slope + ZIPF_EXPONENT) < 0.1
    other = plan_concept_counts(10_000, N_CONCEPTS, 1)
    assert np.array_equal(np.sort(other), np.sort(counts)) and not np.array_equal(other, counts)
    small = plan_concept_counts(250, N_CONCEPTS, 0)
    assert small.sum() == 250 and small[small > 0].min() >= 2


def test_render_is_deterministic_with_consistent_masks() -> None:
    for c in CONCEPTS[::7]:
        img, mask = render_concept_image(c.id, 5, (90, 60))
        img2, mask2 = render_concept_image(c.id, 5, (90, 60))
        assert img.size == (90, 60) and mask.shape == (60, 90) and mask.dtype == np.uint8
        assert img.tobytes() == img2.tobytes() and np.array_equal(mask, mask2)
        if c.family in ("shape", "digit"):
            assert 0.03 < mask.mean() < 0.7
            a = np.asarray(img, float)
            fg = a[mask == 1].mean(axis=0)
            bg = a[mask == 0].mean(axis=0)
            pal = PALETTES[c.palette]
            assert np.abs(fg - pal.fg).mean() < np.abs(fg - pal.bg).mean()
            assert np.abs(bg - pal.bg).mean() < np.abs(bg - pal.fg).mean()
        else:
            assert not mask.any()


def test_concepts_separable_by_colour_statistics() -> None:
    """A 1-NN on colour histograms alone tells many concepts apart (chance is 1/40); shape
    kinds sharing a palette differ only in geometry, which colour cannot see."""
    rng = np.random.default_rng(0)
    chosen = rng.choice(N_CONCEPTS, 40, replace=False)

    def hist(img: Image.Image) -> np.ndarray:
        q = np.asarray(img, np.int64) // 64
        h = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64)
        return h / h.sum()

    feats, labels = [], []
    for c in chosen:
        for k in range(4):
            img, _ = render_concept_image(int(c), 1000 + k, (72, 64))
            feats.append(hist(img))
            labels.append(c)
    f, y = np.stack(feats), np.asarray(labels)
    d = np.abs(f[:, None] - f[None]).sum(-1)
    np.fill_diagonal(d, np.inf)
    accuracy = (y[d.argmin(1)] == y).mean()
    # chance is 1/40; the per-instance lighting field (which keeps distinct instances from looking like
    # copies) costs some colour-histogram accuracy, so the bar is 12x chance
    assert accuracy >= 0.3, accuracy


def test_injected_copy_groups_are_the_files_the_pool_holds(pool) -> None:
    """The dedup stage's default calibration set: the pool's own near-duplicate groups, byte for byte."""
    out, _ = pool
    truth = _rows(out, "pool")
    exact = {r["dup_group"] for r in truth if r["kind"] == "exact_duplicate"}
    on_disk: dict[int, set[str]] = {}
    for r in truth:
        if r["dup_group"] >= 0 and r["dup_group"] not in exact:
            on_disk.setdefault(r["dup_group"], set()).add(_digest(out / "pool" / r["relpath"]))
    files, groups = injected_copy_groups(len(on_disk) + 5, seed=0, n=N)
    made: dict[int, set[str]] = {}
    for data, g in zip(files, groups):
        made.setdefault(int(g), set()).add(hashlib.sha256(data).hexdigest())
    assert len(on_disk) >= 3 and made == on_disk
    few, few_groups = injected_copy_groups(2, seed=0, n=N)
    assert len(set(few_groups)) == 2 and len(few) == sum(len(made[g]) for g in set(few_groups.tolist()))
