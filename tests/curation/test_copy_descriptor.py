"""The pixel copy descriptor: exact mirror equivariance, and copies found without merging look-alikes."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from curation.copy_descriptor import COPY_THRESHOLD, DIM, copy_descriptor, mirror
from curation.dedup import copy_dedup
from curation.index import build_index
from curation.synthetic_images import copy_variants, glyph, random_scene


def pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    out = set()
    for lab in np.unique(labels[labels >= 0]):
        m = np.flatnonzero(labels == lab)
        out |= {(int(a), int(b)) for i, a in enumerate(m) for b in m[i + 1 :]}
    return out


@pytest.fixture(scope="module")
def copies():
    """40 distinct scenes and the case pairs the 16×16 thumbnail merged (w/W, x/X, v/V, u/U), each
    with six copies: mirrored, cropped, colour-jittered, re-encoded, resized, all of these at once."""
    rng = np.random.default_rng(0)
    originals = [random_scene(rng, int(rng.integers(64, 160)), int(rng.integers(64, 160))) for _ in range(40)]
    originals += [glyph(c, 48) for c in "wWxXvVuU"]
    images, groups = [], []
    for g, img in enumerate(originals):
        for copy in [img] + [v for _, v in copy_variants(img, rng)]:
            images.append(copy)
            groups.append(g)
    return np.stack([copy_descriptor(i) for i in images]), np.array(groups)


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


def test_copies_found_and_look_alikes_kept_apart(copies):
    x, groups = copies
    x = x.astype(np.float32)
    n = len(x)
    result = copy_dedup(x, np.arange(n), np.zeros(n), threshold=COPY_THRESHOLD,
                        index=build_index(x, exact_max=n), mirror=mirror)
    merged = np.where(np.bincount(result.labels)[result.labels] > 1, result.labels, -1)
    found, truth = pairs(merged), pairs(groups)
    hits = len(found & truth)
    assert hits / len(found) >= 0.95 and hits / len(truth) >= 0.95


def test_mirrored_copies_need_the_mirrored_search(copies):
    x, _ = copies
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
