"""k-NN classification accuracy of backbone embeddings (DINO's weighted-vote protocol).

Arrays in, accuracy out: cosine similarity on L2-normalised features, the k nearest training samples
vote for their label with weight exp(similarity / T) (k=20, T=0.07 as in DINO).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from training.train.meta_arch import cls_embeddings


def knn_predict(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    query_features: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    exclude_self: bool = False,
) -> np.ndarray:
    """Predicted labels of the queries; ``exclude_self`` (queries == train set) gives leave-one-out."""
    train = torch.nn.functional.normalize(torch.as_tensor(train_features, dtype=torch.float32), dim=1)
    query = torch.nn.functional.normalize(torch.as_tensor(query_features, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    n_classes = int(labels.max()) + 1
    similarity = query @ train.T
    if exclude_self:
        similarity.fill_diagonal_(float("-inf"))
    k = min(k, train.shape[0] - int(exclude_self))
    top_sim, top_idx = similarity.topk(k, dim=1)
    votes = torch.zeros(query.shape[0], n_classes)
    votes.scatter_add_(1, labels[top_idx], (top_sim / temperature).exp())
    return votes.argmax(dim=1).numpy()


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    query_features: np.ndarray | None = None,
    query_labels: np.ndarray | None = None,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy on the queries, or leave-one-out on the training set when no queries are given."""
    if query_features is None:
        predicted = knn_predict(train_features, train_labels, train_features, k, temperature, exclude_self=True)
        return float((predicted == np.asarray(train_labels)).mean())
    predicted = knn_predict(train_features, train_labels, query_features, k, temperature)
    return float((predicted == np.asarray(query_labels)).mean())


@torch.no_grad()
def embed_images(backbone: nn.Module, images: Tensor, batch_size: int = 64) -> np.ndarray:
    """Normalised cls embeddings of ``images`` [N, 3, H, W] (already normalised like the training crops)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    try:
        chunks = [cls_embeddings(backbone, images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    finally:
        backbone.train(was_training)
    return torch.cat(chunks).numpy()


def teacher_knn_accuracy(
    backbone: nn.Module,
    train_images: Tensor,
    train_labels: np.ndarray,
    query_images: Tensor | None = None,
    query_labels: np.ndarray | None = None,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """k-NN accuracy of a (teacher) backbone on labelled images; leave-one-out without queries."""
    train = embed_images(backbone, train_images)
    query = embed_images(backbone, query_images) if query_images is not None else None
    return knn_accuracy(train, train_labels, query, query_labels, k, temperature)
