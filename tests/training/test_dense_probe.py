"""The linear dense probe: patch labels, scores, and that it tells informative patch tokens from blind ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.demo.concepts import dense_probe_set
from pipelines.demo.job import DEMO_BACKBONE
from training.models import load_backbone
from training.train.dense_probe import (
    linear_dense_probe,
    patch_labels,
    segmentation_scores,
)

PATCH = 8


class PatchColour(nn.Module):
    """Tokens = each patch's mean colour and its spread: enough to tell a figure from its ground."""

    def forward(self, x: torch.Tensor) -> dict:
        mean = F.avg_pool2d(x, PATCH)
        spread = F.avg_pool2d(x * x, PATCH) - mean * mean
        return {"patches": torch.cat([mean, spread], 1).flatten(2).transpose(1, 2)}


class Blind(nn.Module):
    """The same token for every patch of every image."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.ones(6))

    def forward(self, x: torch.Tensor) -> dict:
        n, grid = x.shape[0], (x.shape[-2] // PATCH) * (x.shape[-1] // PATCH)
        return {"patches": self.token.expand(n, grid, 6) + 1e-3 * torch.arange(grid)[None, :, None]}


def test_patch_labels_are_the_majority_class_of_each_patch():
    masks = np.zeros((1, 4, 6), np.uint8)
    masks[0, :2, :2] = 1  # patch (0,0): all object
    masks[0, 0, 2:4] = 1  # patch (0,1): 2 of 4 pixels -> tie -> the lower class
    masks[0, 2:, 4:] = 1
    masks[0, 3, 4] = 0  # patch (1,2): 3 of 4 pixels object
    assert patch_labels(masks, 2).tolist() == [[1, 0, 0, 0, 0, 1]]


def test_segmentation_scores_by_hand():
    truth = np.array([0, 0, 1, 1, 1])
    predicted = np.array([0, 1, 1, 1, 0])
    scores = segmentation_scores(predicted, truth, 2)
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["iou_0"] == pytest.approx(1 / 3) and scores["iou_1"] == pytest.approx(2 / 4)
    assert scores["miou"] == pytest.approx((1 / 3 + 2 / 4) / 2)


def _figures(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright rectangles on dark noise, with their masks."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for m in masks:
        x, y = rng.integers(0, size // 2, 2)
        w, h = rng.integers(size // 4, size // 2, 2)
        m[y : y + h, x : x + w] = 1
    images = masks[..., None] * 150.0 + rng.uniform(0, 100, (n, size, size, 3))
    return images.astype(np.uint8), masks


def test_probe_separates_informative_tokens_from_blind_ones():
    images, masks = _figures(40, 64, seed=0)
    split = (images[:20], masks[:20], images[20:], masks[20:])
    informative = linear_dense_probe(PatchColour(), *split, patch_size=PATCH)
    blind = linear_dense_probe(Blind(), *split, patch_size=PATCH)
    object_share = patch_labels(masks[20:], PATCH).mean()
    assert blind["miou"] <= (1 - object_share) / 2 + 0.05  # at best: all background
    assert informative["miou"] > 0.9


def test_trained_demo_backbone_has_better_patch_features_than_random_init():
    images, masks = dense_probe_set(96, 96, seed=0)  # what `curate demo-pool` writes
    split = (images[:48], masks[:48], images[48:], masks[48:])
    trained = linear_dense_probe(load_backbone(f"curate:{DEMO_BACKBONE}", None)[0], *split, patch_size=8)
    random_init = linear_dense_probe(load_backbone("vit_demo", None)[0], *split, patch_size=8)
    assert trained["miou"] > random_init["miou"] + 0.15, (trained, random_init)
