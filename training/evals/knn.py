"""k-NN accuracy split by how common each class is in the training pool.

Curation claims to help the *tail*: concepts that are rare in the raw pool. So besides the overall
leave-one-out k-NN accuracy (DINO's weighted vote, ``training.train.knn_eval``), queries are scored
separately for the head and the tail classes of the pool's concept distribution
(``training.evals.sets.head_labels``).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from training.evals.sets import LabelledSet
from training.train.knn_eval import embed_images, knn_predict


def knn_split_accuracy(
    features: np.ndarray,
    labels: np.ndarray,
    is_head: np.ndarray | None = None,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Leave-one-out k-NN accuracy overall (``knn``) and, with ``is_head`` [n_classes], over head and tail queries."""
    labels = np.asarray(labels)
    correct = knn_predict(features, labels, features, k, temperature, exclude_self=True) == labels
    out = {"knn": float(correct.mean())}
    if is_head is not None:
        head_query = np.asarray(is_head, dtype=bool)[labels]
        if head_query.all() or not head_query.any():
            raise ValueError("the labelled set needs images of both head and tail labels for the split")
        out["knn_head"] = float(correct[head_query].mean())
        out["knn_tail"] = float(correct[~head_query].mean())
    return out


def knn_eval(backbone: nn.Module, labelled: LabelledSet, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """k-NN accuracy of ``backbone``'s cls embeddings on ``labelled`` (overall, head and tail)."""
    return knn_split_accuracy(embed_images(backbone, labelled.images), labelled.labels, labelled.head, k, temperature)
