"""Linear-probe accuracy: how linearly separable a frozen backbone's cls embeddings make the classes.

A logistic regression on standardised embeddings, scored by stratified k-fold cross-validation over
the labelled set, so every image is predicted once by a probe that never saw it.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

from training.evals.sets import LabelledSet
from training.train.knn_eval import embed_images


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5, c: float = 1.0,
                          seed: int = 0) -> float:
    """Mean held-out accuracy of a logistic regression over ``folds`` stratified folds."""
    counts = np.bincount(np.asarray(labels))
    if counts[counts > 0].min() < folds:
        raise ValueError(f"a linear probe with {folds} folds needs at least {folds} images per label, "
                         f"the smallest label has {counts[counts > 0].min()}")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # One BLAS thread: the probe's matrices are a few hundred rows, and threads only wait on each other
    # (measured on 360 x 128 features, 30 labels: 0.4 s with one thread, 25 s with two on a busy 2-core host).
    with threadpool_limits(limits=1):
        return float(cross_val_score(probe, features, labels, cv=cv).mean())


def linear_probe_eval(backbone: nn.Module, labelled: LabelledSet, folds: int = 5) -> dict[str, float]:
    return {"linear_probe": linear_probe_accuracy(embed_images(backbone, labelled.images), labelled.labels, folds)}
