"""The pixel check of copy candidates: copies pass it, look-alikes that the descriptor merges do not, and
distinct instances of a periodic texture that a shift aligns in grey fail on their colour field."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from curation import copy_verify as cv
from curation.copy_descriptor import COPY_THRESHOLD, copy_descriptor, mirror
from curation.synthetic_images import VARIANTS, coin, glyph, random_scene
from pipelines.demo.concepts import render_concept_image


def _check(pairs: list[tuple[Image.Image, Image.Image]]) -> tuple[np.ndarray, np.ndarray]:
    """(grey, colour) residuals of each pair, mirrored where the descriptor says so."""
    a = np.stack([cv.thumbnail(p) for p, _ in pairs])
    b = np.stack([cv.thumbnail(q) for _, q in pairs])
    da = np.stack([copy_descriptor(p) for p, _ in pairs]).astype(np.float32)
    db = np.stack([copy_descriptor(q) for _, q in pairs]).astype(np.float32)
    mirrored = (mirror(da) * db).sum(1) > (da * db).sum(1)
    sides = lambda imgs: np.array([min(i.size) for i in imgs])  # noqa: E731
    return cv.residuals(a, b, sides([p for p, _ in pairs]), sides([q for _, q in pairs]), mirrored)


def test_every_kind_of_copy_passes():
    rng = np.random.default_rng(3)
    originals = [random_scene(rng, 120, 90), glyph("k", 48), coin("25", 64)]
    pairs = [(img, variant(img, rng)) for img in originals for variant in VARIANTS.values()]
    grey, colour = _check(pairs)
    kinds = [k for _ in originals for k in VARIANTS]
    assert (grey < cv.RESIDUAL_THRESHOLD).all(), dict(zip(kinds, grey.round(2)))
    assert (colour < cv.COLOUR_THRESHOLD).all(), dict(zip(kinds, colour.round(3)))


@pytest.mark.parametrize("a, b", [
    (glyph("c", 48), glyph("o", 48)),  # one gap
    (glyph("O", 48), glyph("0", 64)),  # narrower: the fit's scale is not a crop's
    (glyph("3", 48), glyph("8", 48)),
    (glyph("5", 64), glyph("6", 48)),
    (coin("20", 64), coin("25", 64)),  # one numeral
    (coin("20", 48), ImageOps.mirror(coin("50", 64))),
    (coin("2", 64), coin("5", 48)),
])
def test_look_alikes_the_descriptor_merges_fail(a, b):
    da, db = copy_descriptor(a).astype(np.float32), copy_descriptor(b).astype(np.float32)
    assert max(da @ db, mirror(da[None])[0] @ db) > COPY_THRESHOLD  # the descriptor alone merges them
    assert _check([(a, b)])[0][0] >= cv.RESIDUAL_THRESHOLD


def test_distinct_stripes_aligned_in_grey_differ_in_their_colour_field():
    """Instances of a demo stripes concept differ in phase and in a smooth lighting field: a shift
    aligns some pairs in grey, and only the colour check tells them apart; their copies pass it."""
    rng = np.random.default_rng(0)
    grey_passed, copies = [], []
    for concept in (149, 147):  # texture-stripes indigo-mint, blue-lemon
        images = [render_concept_image(concept, s, tuple(int(v) for v in rng.integers(90, 170, 2)))[0]
                  for s in range(40)]
        i, j = np.triu_indices(len(images), 1)
        grey, colour = _check([(images[a], images[b]) for a, b in zip(i, j)])
        grey_passed += list(colour[grey < cv.RESIDUAL_THRESHOLD])
        copies += [(img, variant(img, rng)) for img in images[:3] for variant in VARIANTS.values()]
    assert len(grey_passed) >= 2 and min(grey_passed) >= cv.COLOUR_THRESHOLD, grey_passed
    grey, colour = _check(copies)
    aligned = grey < cv.RESIDUAL_THRESHOLD  # (the fit can lock onto the wrong period of a cropped copy: a miss)
    assert aligned.mean() > 0.9 and (colour[aligned] < cv.COLOUR_THRESHOLD).all(), colour.round(3)


def test_an_unreadable_image_is_never_a_copy():
    img = random_scene(np.random.default_rng(0), 64, 64)
    t = cv.thumbnail(img)[None]
    assert cv.verified(t, t, np.array([64]), np.array([64]), np.array([False]))[0]
    assert cv.residuals(t, t, np.array([64]), np.array([0]), np.array([False]))[0][0] == np.inf
    assert not cv.verified(t, t, np.array([64]), np.array([0]), np.array([False]))[0]


def test_a_pair_with_an_image_under_the_small_side_is_held_to_a_stricter_residual(monkeypatch):
    """Under SMALL_SIDE the blur to the smaller image shrinks a differing detail's residual too."""
    img = coin("20", 64)
    a, b = cv.thumbnail(img)[None], cv.thumbnail(img.resize((40, 40), Image.Resampling.BICUBIC))[None]
    sides, small, straight = np.array([64]), np.array([cv.SMALL_SIDE - 1]), np.array([False])
    grey, _ = cv.residuals(a, b, sides, small, straight)
    threshold = float(grey[0]) / 0.95  # above the pair's residual, but not above it × SMALL_FACTOR
    assert cv.SMALL_FACTOR < 0.95 and not cv.verified(a, b, sides, small, straight, threshold)[0]
    monkeypatch.setattr(cv, "SMALL_FACTOR", 1.0)
    assert cv.verified(a, b, sides, small, straight, threshold)[0]
