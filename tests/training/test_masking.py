import numpy as np
import pytest
import torch

from training.data.masking import block_mask, collate, mask_counts


@pytest.mark.parametrize("grid", [(4, 4), (14, 14), (7, 12)])
def test_block_mask_exact_count_and_blocks_inside_mask(grid):
    rng = np.random.default_rng(0)
    n = grid[0] * grid[1]
    for n_masked in [0, 1, 3, n // 10, n // 4, n // 2, n - 1, n]:
        mask, blocks = block_mask(grid, n_masked, rng, max_block_patches=max(1, n // 2))
        assert mask.shape == grid and mask.dtype == bool
        assert int(mask.sum()) == n_masked
        union = np.zeros(grid, dtype=bool)
        for b in blocks:
            assert 0 <= b.top and b.top + b.height <= grid[0]
            assert 0 <= b.left and b.left + b.width <= grid[1]
            union[b.top : b.top + b.height, b.left : b.left + b.width] = True
        assert mask[union].all()
        assert union.sum() <= n_masked


def test_blocks_are_shorter_and_narrower_than_the_grid_and_do_most_of_the_masking():
    rng = np.random.default_rng(1)
    aspects, block_share = [], []
    for _ in range(300):
        mask, blocks = block_mask((14, 14), 60, rng, max_block_patches=98)
        assert blocks, "a 60-patch mask on a 14x14 grid always fits blocks"
        union = np.zeros((14, 14), dtype=bool)
        for b in blocks:
            assert b.height < 14 and b.width < 14
            aspects.append(b.height / b.width)
            union[b.top : b.top + b.height, b.left : b.left + b.width] = True
        block_share.append(union.sum() / 60)
    aspects = np.array(aspects)
    assert (aspects < 0.8).any() and (aspects > 1.25).any()  # both orientations occur
    assert np.mean(block_share) > 0.8


def test_a_block_as_tall_or_wide_as_the_grid_is_rejected():
    # On a 2-row grid most drawn shapes are 2 rows tall; the reference rejects them (h < grid height).
    rng = np.random.default_rng(2)
    heights, widths = set(), set()
    for n_masked in [n for n in range(4, 13) for _ in range(30)]:
        mask, blocks = block_mask((2, 12), n_masked, rng, max_block_patches=12.0)
        assert int(mask.sum()) == n_masked  # the random top-up still delivers the exact count
        heights |= {b.height for b in blocks}
        widths |= {b.width for b in blocks}
    assert heights == {1} and max(widths) < 12


def test_mask_counts_match_recipe_example():
    # DINOv3 collate, verified: B=4 images (8 global crops), N=16 -> {3,4,6,8} + four zeros
    assert sorted(mask_counts(8, 16, (0.1, 0.5), 0.5)) == [0, 0, 0, 0, 3, 4, 6, 8]


def test_mask_counts_use_the_float32_ratios_of_the_reference():
    # 196 patches (224 px / 16), 49 images per rank -> 98 global crops, 49 of them masked.
    ratios = torch.linspace(0.1, 0.5, 50)  # float32, as torch.linspace in the reference collate
    expected = [int(196 * ratios[i + 1]) for i in range(49)] + [0] * 49
    assert mask_counts(98, 196, (0.1, 0.5), 0.5) == expected
    float64 = [int(196 * r) for r in np.linspace(0.1, 0.5, 50)[1:]]
    differs = [i for i in range(49) if float64[i] != expected[i]]
    assert differs == [38] and (expected[38], float64[38]) == (81, 82)


def _samples(batch: int, n_local: int = 3, size: int = 32, local: int = 16, gram: int | None = None):
    samples = []
    for b in range(batch):
        s = {
            "global_crops": torch.stack([torch.full((3, size, size), 10.0 * b + c) for c in range(2)]),
            "local_crops": torch.stack([torch.full((3, local, local), 100.0 * b + c) for c in range(n_local)]),
        }
        if gram:
            s["gram_teacher_crops"] = torch.stack([torch.full((3, gram, gram), -10.0 * b - c) for c in range(2)])
        samples.append(s)
    return samples


def test_collate_layout_is_crop_major():
    batch = 5
    out = collate(_samples(batch, gram=48), patch_size=8, rng=np.random.default_rng(0))
    assert out["global_crops"].shape == (2 * batch, 3, 32, 32)
    assert out["local_crops"].shape == (3 * batch, 3, 16, 16)
    assert out["gram_teacher_crops"].shape == (2 * batch, 3, 48, 48)
    for c in range(2):
        for b in range(batch):
            assert out["global_crops"][c * batch + b, 0, 0, 0] == 10.0 * b + c
            assert out["gram_teacher_crops"][c * batch + b, 0, 0, 0] == -10.0 * b - c
    for c in range(3):
        for b in range(batch):
            assert out["local_crops"][c * batch + b, 0, 0, 0] == 100.0 * b + c


@pytest.mark.parametrize("batch,size,patch", [(4, 32, 8), (16, 64, 8), (7, 224, 16)])
def test_collate_masks_counts_indices_and_weights(batch, size, patch):
    out = collate(_samples(batch, size=size), patch_size=patch, rng=np.random.default_rng(batch))
    n = (size // patch) ** 2
    masks = out["masks"]
    assert masks.shape == (2 * batch, n) and masks.dtype == torch.bool
    n_masked = int(2 * batch * 0.5)
    ratios = torch.linspace(0.1, 0.5, n_masked + 1)
    expected = sorted([int(n * ratios[i + 1]) for i in range(n_masked)] + [0] * (2 * batch - n_masked))
    assert sorted(masks.sum(1).tolist()) == expected
    np.testing.assert_array_equal(out["mask_indices"].numpy(), np.flatnonzero(masks.numpy().ravel()))
    assert out["n_masked_patches"].tolist() == [int(masks.sum())]
    assert out["masks_weight"].shape == out["mask_indices"].shape
    crop_of_token = out["mask_indices"] // n
    per_crop = torch.zeros(2 * batch).index_add_(0, crop_of_token, out["masks_weight"])
    masked_crops = masks.any(1)
    torch.testing.assert_close(per_crop[masked_crops], torch.ones(int(masked_crops.sum())))
    assert (per_crop[~masked_crops] == 0).all()


def test_masked_crops_are_shuffled_across_positions_and_deterministic():
    batch, trials = 4, 400
    masked_freq = np.zeros(2 * batch)
    for seed in range(trials):
        out = collate(_samples(batch), patch_size=8, rng=np.random.default_rng(seed))
        masked_freq += out["masks"].any(1).numpy()
    masked_freq /= trials
    assert ((masked_freq > 0.35) & (masked_freq < 0.65)).all()
    a = collate(_samples(batch), patch_size=8, rng=np.random.default_rng(123))
    b = collate(_samples(batch), patch_size=8, rng=np.random.default_rng(123))
    assert torch.equal(a["masks"], b["masks"])
