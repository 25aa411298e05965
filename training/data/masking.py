"""iBOT block masks on the global crops' patch grid, and the batch collate that applies them.

Masks follow BEiT: rectangular blocks of random area and log-uniform aspect are added until the
requested count is reached or a block adds nothing, then random single patches top the mask up so
each masked crop has *exactly* the requested count (the iBOT loss weights depend on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Block:
    """A masked rectangle on the patch grid."""

    top: int
    left: int
    height: int
    width: int


def _try_block(
    mask: np.ndarray,
    rng: np.random.Generator,
    max_new: float,
    min_patches: int,
    log_aspect: tuple[float, float],
    tries: int,
) -> Block | None:
    """Add one block adding between 1 and ``max_new`` new patches; ``None`` if ``tries`` attempts fail.

    As BEiT/DINOv3: area uniform between ``min_patches`` and ``max_new`` (either may be the larger),
    log-uniform aspect, and a block must be strictly shorter and narrower than the grid.
    """
    grid_h, grid_w = mask.shape
    for _ in range(tries):
        area = min_patches + (max_new - min_patches) * rng.random()  # uniform even when max_new < min_patches
        aspect = math.exp(rng.uniform(*log_aspect))
        h = round(math.sqrt(area * aspect))
        w = round(math.sqrt(area / aspect))
        if not (h < grid_h and w < grid_w):
            continue
        top = int(rng.integers(0, grid_h - h + 1))
        left = int(rng.integers(0, grid_w - w + 1))
        new = h * w - int(mask[top : top + h, left : left + w].sum())
        if 0 < new <= max_new:
            mask[top : top + h, left : left + w] = True
            return Block(top, left, h, w)
    return None


def block_mask(
    grid: tuple[int, int],
    n_masked: int,
    rng: np.random.Generator,
    *,
    min_patches: int = 4,
    max_block_patches: float | None = None,
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
    tries: int = 10,
) -> tuple[np.ndarray, list[Block]]:
    """Boolean ``grid`` mask with exactly ``n_masked`` True patches, and the blocks it was built from.

    Each block adds at most ``min(remaining, max_block_patches)`` new patches (the recipe: half the
    grid, not rounded); patches not covered by blocks are filled in uniformly at random.
    """
    grid_h, grid_w = grid
    if not 0 <= n_masked <= grid_h * grid_w:
        raise ValueError(f"cannot mask {n_masked} of {grid_h * grid_w} patches")
    cap = grid_h * grid_w if max_block_patches is None else max_block_patches
    log_aspect = (math.log(aspect_range[0]), math.log(aspect_range[1]))
    mask = np.zeros(grid, dtype=bool)
    blocks: list[Block] = []
    count = 0
    while count < n_masked:
        block = _try_block(mask, rng, min(n_masked - count, cap), min_patches, log_aspect, tries)
        if block is None:
            break
        blocks.append(block)
        count = int(mask.sum())
    if count < n_masked:
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, size=n_masked - count, replace=False)] = True
    return mask, blocks


def mask_counts(n_crops: int, n_patches: int, ratio_range: tuple[float, float], sample_probability: float) -> list[int]:
    """Masked-patch counts for ``n_crops`` global crops before shuffling.

    ``int(n_crops * sample_probability)`` crops are masked, crop ``i`` with
    ``int(N * linspace(lo, hi, n+1)[i+1])`` patches, spreading the ratios evenly; the rest get 0. The
    ratios and the product are float32 (``torch.linspace``), as the reference computes them: float64
    gives one patch more or less on some grids (196 patches, 98 crops: 82 instead of 81).
    """
    n_masked_crops = int(n_crops * sample_probability)
    ratios = torch.linspace(ratio_range[0], ratio_range[1], n_masked_crops + 1, dtype=torch.float32)
    counts = (n_patches * ratios[1:]).int().tolist()
    return counts + [0] * (n_crops - n_masked_crops)


def collate(
    samples: list[dict],
    *,
    patch_size: int,
    rng: np.random.Generator,
    mask_ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
    max_block_fraction: float = 0.5,
) -> dict:
    """Stack the multi-crop outputs of ``B`` images and draw the iBOT masks.

    Crops are crop-major: ``global_crops[c*B + b]`` is global crop ``c`` of image ``b`` (same for local
    crops). Returns ``global_crops [2B,3,H,W]``, ``local_crops [n_local*B,3,h,w]``, ``masks [2B,N]``
    bool, ``mask_indices`` (flat indices into ``masks``), ``masks_weight`` (per masked token,
    ``1/#masked in its crop``), ``n_masked_patches`` ``[1]`` and ``gram_teacher_crops`` if present.
    """
    n_global = samples[0]["global_crops"].shape[0]
    global_crops = torch.stack([s["global_crops"] for s in samples], dim=1).flatten(0, 1)
    local_crops = torch.stack([s["local_crops"] for s in samples], dim=1).flatten(0, 1)
    grid_h, grid_w = global_crops.shape[-2] // patch_size, global_crops.shape[-1] // patch_size
    n_patches = grid_h * grid_w
    n_crops = n_global * len(samples)
    counts = mask_counts(n_crops, n_patches, mask_ratio_range, mask_sample_probability)
    max_block = n_patches * max_block_fraction
    masks = np.stack(
        [block_mask((grid_h, grid_w), c, rng, max_block_patches=max_block)[0].ravel() for c in counts]
    )
    masks = torch.from_numpy(masks[rng.permutation(n_crops)])
    per_crop = masks.sum(dim=1, keepdim=True).clamp(min=1).float()
    out = {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": masks,
        "mask_indices": masks.flatten().nonzero().flatten(),
        "masks_weight": (1.0 / per_crop).expand_as(masks)[masks],
        "n_masked_patches": torch.tensor([int(masks.sum())], dtype=torch.long),
    }
    if "gram_teacher_crops" in samples[0]:
        out["gram_teacher_crops"] = torch.stack([s["gram_teacher_crops"] for s in samples], dim=1).flatten(0, 1)
    return out
