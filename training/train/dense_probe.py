"""A linear per-patch segmentation probe: how well do a backbone's patch tokens separate object from ground?

Images and masks are arrays the caller renders (e.g. the demo pool's shape/digit concepts, whose
object masks are known), so this module opens no files. Each patch is labelled by the majority of
its mask pixels; a logistic regression on the standardised, L2-normalised patch tokens of the training
images predicts the labels of held-out images, scored by per-class IoU (mIoU) and patch accuracy.
Standardising matters: on unit-norm tokens a default-strength L2 penalty leaves a probe that predicts
the majority class everywhere, whatever the backbone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from catalog.decode import IMAGENET_MEAN, IMAGENET_STD


def patch_labels(masks: np.ndarray, patch_size: int) -> np.ndarray:
    """``[n, H, W]`` class masks -> ``[n, h·w]`` majority class per patch (ties: the lower class)."""
    n, h, w = masks.shape
    gh, gw = h // patch_size, w // patch_size
    blocks = masks[:, : gh * patch_size, : gw * patch_size].reshape(n, gh, patch_size, gw, patch_size)
    blocks = blocks.transpose(0, 1, 3, 2, 4).reshape(n, gh * gw, patch_size * patch_size)
    n_classes = int(masks.max()) + 1
    counts = np.stack([(blocks == c).sum(-1) for c in range(n_classes)], axis=-1)
    return counts.argmax(-1)


@torch.no_grad()
def patch_features(backbone: nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """``[n, H, W, 3]`` uint8 images -> ``[n, h·w, D]`` L2-normalised output patch tokens (eval mode)."""
    backbone.eval()
    device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255.0
        out.append(F.normalize(backbone((x - mean) / std)["patches"].float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def segmentation_scores(predicted: np.ndarray, truth: np.ndarray, n_classes: int) -> dict[str, float]:
    """Patch accuracy, mIoU and per-class IoU of flat label arrays."""
    ious = []
    for c in range(n_classes):
        inter = np.sum((predicted == c) & (truth == c))
        union = np.sum((predicted == c) | (truth == c))
        ious.append(float(inter / union) if union else float("nan"))
    return {"accuracy": float(np.mean(predicted == truth)), "miou": float(np.nanmean(ious)),
            **{f"iou_{c}": v for c, v in enumerate(ious)}}


def linear_dense_probe(
    backbone: nn.Module,
    train_images: np.ndarray,
    train_masks: np.ndarray,
    test_images: np.ndarray,
    test_masks: np.ndarray,
    patch_size: int,
    c: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Fit (standardise, logistic regression) patch token -> patch label on the train images; score on the test images."""
    # scikit-learn here, not at import: it adds ~2.4 s to every training process's start, probe or not
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train = patch_features(backbone, train_images)
    x_test = patch_features(backbone, test_images)
    y_train, y_test = patch_labels(train_masks, patch_size), patch_labels(test_masks, patch_size)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    with threadpool_limits(limits=1):  # a few thousand rows: BLAS threads only wait on each other (6-10x slower)
        clf.fit(x_train.reshape(-1, x_train.shape[-1]), y_train.ravel())
        predicted = clf.predict(x_test.reshape(-1, x_test.shape[-1]))
    return segmentation_scores(predicted, y_test.ravel(), n_classes)
