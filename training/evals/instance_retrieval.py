"""Instance retrieval: does a backbone rank the other views of an instance above everything else?

The analogue of the Oxford/Paris retrieval columns of the DINOv3 ablations: every image of a group
with a positive queries all other images of the set (cosine similarity of cls embeddings);
recall@1 is the share of queries whose nearest image is a positive, mAP the mean over queries of the
average precision of their ranking.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.evals.sets import InstanceSet
from training.train.knn_eval import embed_images


def retrieval_scores(features: np.ndarray, groups: np.ndarray, chunk: int = 1024) -> dict[str, float]:
    """Recall@1 and mAP of each image against all others; ``groups`` -1 marks distractors."""
    groups = np.asarray(groups)
    x = torch.nn.functional.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    g = torch.as_tensor(groups)
    member = groups >= 0
    has_positive = np.zeros(len(groups), bool)
    if member.any():
        has_positive[member] = np.bincount(groups[member])[groups[member]] >= 2
    queries = np.flatnonzero(has_positive)
    if len(queries) == 0:
        raise ValueError("no query has a positive: every group needs two or more images")
    hits, aps = [], []
    for start in range(0, len(queries), chunk):
        q = torch.as_tensor(queries[start : start + chunk])
        similarity = x[q] @ x.T
        similarity[torch.arange(len(q)), q] = float("-inf")
        order = similarity.argsort(dim=1, descending=True)[:, :-1]  # the query itself sorts last
        relevant = (g[order] == g[q][:, None]).float()
        ranks = torch.arange(1, relevant.shape[1] + 1, dtype=torch.float32)
        precision = relevant.cumsum(dim=1) / ranks
        aps.append(((precision * relevant).sum(dim=1) / relevant.sum(dim=1)).numpy())
        hits.append(relevant[:, 0].numpy())
    return {"instance_recall_at_1": float(np.concatenate(hits).mean()), "instance_map": float(np.concatenate(aps).mean())}


def instance_retrieval_eval(backbone: nn.Module, instances: InstanceSet) -> dict[str, float]:
    return retrieval_scores(embed_images(backbone, instances.images), instances.groups)
