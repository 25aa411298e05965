"""Checks of a backbone's features: k-NN accuracy on labelled images and a linear dense probe.

``CheckpointEvals`` runs them on the EMA teacher at every checkpoint of a run (``eval`` in the config,
results in ``<output_dir>/evals.jsonl``). Every rank calls it with the same images, because the
forward of an FSDP-sharded backbone is collective; each rank then holds the same numbers and one logs
them. On the demo pool: ``eval.knn_folder=<pool>/seed`` (15 labelled concepts) and
``eval.dense_probe=<pool>/truth/dense_probe.npz`` (shape/digit images with object masks).
"""

from __future__ import annotations

import io
import json
import posixpath

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from catalog.decode import Preprocess, decode_rgb
from catalog.images import read_image_bytes
from catalog.paths import exists, read_bytes, resolve, retry, with_protocol
from training.models.checkpoints import load_backbone
from training.train.config import EvalConfig
from training.train.dense_probe import linear_dense_probe
from training.train.knn_eval import teacher_knn_accuracy


def labelled_files(folder: str) -> dict[str, list[str]]:
    """``<folder>/<label>/<file>`` on any fsspec store -> {label: sorted file URLs}, labels sorted."""
    fs, root = resolve(folder, fresh=True)
    root = root.rstrip("/")
    by_label: dict[str, list[str]] = {}
    for path in sorted(retry(lambda: fs.find(root))):
        parts = posixpath.relpath(path, root).split("/")
        if len(parts) == 2:
            by_label.setdefault(parts[0], []).append(with_protocol(fs, path))
    return dict(sorted(by_label.items()))


def labelled_images(seed_folder: str, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Every image under ``seed_folder/<label>/`` preprocessed to ``size``, with integer labels."""
    pre = Preprocess(size=size)
    images, labels = [], []
    for label, files in enumerate(labelled_files(seed_folder).values()):
        for url in files:
            images.append(pre(decode_rgb(read_image_bytes(url))))
            labels.append(label)
    if not images:
        raise ValueError(f"no labelled images under {seed_folder!r} (expected <label>/<image> folders)")
    return torch.from_numpy(np.stack(images)), np.asarray(labels)


def knn_on_seed_set(model_name: str, seed_folder: str, size: int = 64) -> float:
    """Leave-one-out k-NN accuracy of ``model_name`` (a registered size, random init, or curate:PATH)."""
    model, _ = load_backbone(model_name, None)
    images, labels = labelled_images(seed_folder, size)
    return teacher_knn_accuracy(model, images, labels)


def load_dense_probe_set(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``images`` [n, H, W, 3] uint8 and ``masks`` [n, H, W] class maps from an ``.npz`` file."""
    with np.load(io.BytesIO(read_bytes(path))) as data:
        missing = {"images", "masks"} - set(data.files)
        if missing:
            raise ValueError(f"dense probe set {path!r} lacks {sorted(missing)} (has {data.files})")
        images, masks = data["images"], data["masks"]
    if images.ndim != 4 or images.shape[-1] != 3 or masks.shape != images.shape[:3] or len(images) < 2:
        raise ValueError(f"dense probe set {path!r}: need images [n,H,W,3] and masks [n,H,W] with n >= 2, "
                         f"got {images.shape} and {masks.shape}")
    return images, masks


class CheckpointEvals:
    """The configured checks, with their images loaded once."""

    def __init__(self, config: EvalConfig, image_size: int, patch_size: int) -> None:
        self.patch_size = patch_size
        self.knn = labelled_images(config.knn_folder, config.image_size or image_size) if config.knn_folder else None
        self.dense = load_dense_probe_set(config.dense_probe) if config.dense_probe else None

    @property
    def names(self) -> list[str]:
        """The metric names ``__call__`` returns, in order (the same on every rank)."""
        return (["knn_accuracy"] if self.knn else []) + (["dense_miou", "dense_accuracy"] if self.dense else [])

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        """Collective over the ranks that shard ``backbone``; restores its train/eval mode."""
        was_training = backbone.training
        out: dict[str, float] = {}
        try:
            if self.knn is not None:
                out["knn_accuracy"] = teacher_knn_accuracy(backbone, *self.knn)
            if self.dense is not None:
                images, masks = self.dense
                half = len(images) // 2
                scores = linear_dense_probe(backbone, images[:half], masks[:half], images[half:], masks[half:],
                                            self.patch_size)
                out.update(dense_miou=scores["miou"], dense_accuracy=scores["accuracy"])
        finally:
            backbone.train(was_training)
        return out


def scores_missing(url: str, step: int, is_main: bool) -> bool:
    """True on every rank when checkpoint ``step`` has no row in the log at ``url`` (the run died while scoring it).

    Rank 0 reads the file and broadcasts the answer, so all ranks enter the collective scoring together.
    """
    missing = [False]
    if is_main:
        lines = read_bytes(url).decode().splitlines() if exists(url) else []
        missing[0] = not any(json.loads(line)["step"] == step for line in lines if line)
    if dist.is_initialized():
        dist.broadcast_object_list(missing, src=0)
    return bool(missing[0])
