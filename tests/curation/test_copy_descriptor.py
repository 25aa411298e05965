"""The pixel copy descriptor: exact mirror equivariance, and copies found without merging look-alikes."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from curation import copy_verify
from curation.copy_descriptor import COPY_THRESHOLD, DIM, copy_descriptor, mirror
from curation.dedup import copy_dedup
from curation.index import build_index
from curation.synthetic_images import coin, copy_variants, crop, glyph, random_scene


def pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    out = set()
    for lab in np.unique(labels[labels >= 0]):
        m = np.flatnonzero(labels == lab)
        out |= {(int(a), int(b)) for i, a in enumerate(m) for b in m[i + 1 :]}
    return out


@pytest.fixture(scope="module")
def copies():
    """24 distinct scenes, the case pairs the 16×16 thumbnail merged (w/W, x/X), glyphs the
    descriptor alone merges (c/o, O/0, 3/8, coins 20/25), each with six copies: mirrored, cropped,
    colour-jittered, re-encoded, resized, all of these at once. Returns descriptors, groups, and the
    pixel check's thumbnails and shorter sides."""
    rng = np.random.default_rng(0)
    originals = [random_scene(rng, int(rng.integers(64, 160)), int(rng.integers(64, 160))) for _ in range(24)]
    originals += [glyph(c, 48) for c in "wWxXcoO038"] + [coin("20", 64), coin("25", 64)]
    images, groups = [], []
    for g, img in enumerate(originals):
        for copy in [img] + [v for _, v in copy_variants(img, rng)]:
            images.append(copy)
            groups.append(g)
    thumbs = np.stack([copy_verify.thumbnail(i) for i in images])
    sides = np.array([min(i.size) for i in images])
    return np.stack([copy_descriptor(i) for i in images]), np.array(groups), thumbs, sides


def test_mirror_is_the_descriptor_of_the_mirrored_image():
    rng = np.random.default_rng(1)
    for img in [random_scene(rng, 97, 61), random_scene(rng, 300, 420), glyph("k", 40)]:
        d = copy_descriptor(img).astype(np.float32)
        flipped = copy_descriptor(ImageOps.mirror(img)).astype(np.float32)
        assert d.shape == (DIM,) and abs(np.linalg.norm(d) - 1) < 1e-3
        np.testing.assert_allclose(mirror(d[None])[0], flipped, atol=2e-3)
        assert float(d @ flipped) < 0.95  # the image is not mirror-symmetric: only the search equates them


def test_flat_image_has_the_zero_descriptor():
    assert not copy_descriptor(Image.new("RGB", (50, 40), (90, 120, 30))).any()


def _found_pairs(x: np.ndarray, verify=None) -> set[tuple[int, int]]:
    n = len(x)
    result = copy_dedup(x, np.arange(n), np.zeros(n), threshold=COPY_THRESHOLD,
                        index=build_index(x, exact_max=n), mirror=mirror, verify=verify)
    return pairs(np.where(np.bincount(result.labels)[result.labels] > 1, result.labels, -1))


def test_copies_found_and_look_alikes_kept_apart_by_the_pixel_check(copies):
    x, groups, thumbs, sides = copies
    x = x.astype(np.float32)
    truth = pairs(groups)
    found = _found_pairs(x, copy_verify.edge_check(x, lambda rows: (thumbs[rows], sides[rows])))
    hits = len(found & truth)
    assert hits / len(found) >= 0.95 and hits / len(truth) >= 0.95
    alone = _found_pairs(x)  # the descriptor without the check merges look-alikes
    assert len(alone & truth) / len(alone) < 0.9


def test_mirrored_copies_need_the_mirrored_search(copies):
    x, *_ = copies
    x = x.astype(np.float32)
    flips = np.arange(len(x)) % 7 == 1  # copy_variants' first kind is the mirror image
    originals = np.arange(len(x)) % 7 == 0
    straight = (x[flips] * x[originals]).sum(1)
    mirrored = (mirror(x[flips]) * x[originals]).sum(1)
    assert (mirrored > COPY_THRESHOLD).mean() == 1.0 and (straight > COPY_THRESHOLD).mean() < 0.5
    # the same through the graph: without the mirror most flipped copies stay apart
    n = len(x)
    index = build_index(x, exact_max=n)
    plain = copy_dedup(x, np.arange(n), np.zeros(n), threshold=COPY_THRESHOLD, index=index)
    assert (plain.labels[flips] != plain.labels[originals]).mean() > 0.5


def test_crops_of_a_fine_isotropic_texture_stay_near_their_original(monkeypatch):
    """Polka dots: every cell holds a flat histogram, so its deviation is noise a crop redraws; weighted by
    its anisotropy it no longer drowns the colour layout that the crop keeps."""
    from curation import copy_descriptor as cd
    from pipelines.demo.concepts import CONCEPTS, render_concept_image

    def crop_cosines() -> np.ndarray:
        rng, out = np.random.default_rng(0), []
        for concept in [c.id for c in CONCEPTS if c.kind == "dots"][:6]:
            for seed in range(4):
                img = render_concept_image(concept, seed, (120, 110))[0]
                a = copy_descriptor(img).astype(np.float32)
                out.append(float(a @ copy_descriptor(crop(img, rng, 0.05)).astype(np.float32)))
        return np.array(out)

    weighted = crop_cosines()
    monkeypatch.setattr(cd, "ANISOTROPY_FULL", 1e-9)  # the gradient part always at full weight
    full = crop_cosines()
    assert (weighted > COPY_THRESHOLD).mean() >= 0.4 and (full > COPY_THRESHOLD).mean() <= 0.15
    assert np.median(weighted) > np.median(full) + 0.1
