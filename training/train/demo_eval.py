"""k-NN accuracy of a backbone on the demo pool's labelled seed set (the concept labels).

Used by the trainer's acceptance test and to document the shipped demo backbone: a short CPU run
should beat the same architecture at random initialisation by a clear margin.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from catalog.images import read_image_bytes
from curation.decode import Preprocess, decode_rgb
from training.models.checkpoints import load_backbone
from training.train.knn_eval import teacher_knn_accuracy


def labelled_images(seed_folder: str, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Every image under ``seed_folder/<label>/`` preprocessed to ``size``, with integer labels."""
    pre = Preprocess(size=size)
    names = sorted(d for d in os.listdir(seed_folder) if os.path.isdir(os.path.join(seed_folder, d)))
    images, labels = [], []
    for label, name in enumerate(names):
        folder = os.path.join(seed_folder, name)
        for file in sorted(os.listdir(folder)):
            images.append(pre(decode_rgb(read_image_bytes(os.path.join(folder, file)))))
            labels.append(label)
    return torch.from_numpy(np.stack(images)), np.asarray(labels)


def knn_on_seed_set(model_name: str, seed_folder: str, size: int = 64) -> float:
    """Leave-one-out k-NN accuracy of ``model_name`` (a registered size, random init, or curate:PATH)."""
    model, _ = load_backbone(model_name, None)
    images, labels = labelled_images(seed_folder, size)
    return teacher_knn_accuracy(model, images, labels)
