"""The configured evaluations of a frozen backbone, with their sets decoded once.

``EvalSuite(config, image_size)`` reads every set the config names; calling it on a backbone returns
one flat dict of scores (the names in ``EvalSuite.names``). The ablation scores each arm's exported
teacher with one suite, so every arm is measured on exactly the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from training.evals.instance_retrieval import instance_retrieval_eval
from training.evals.knn import knn_split_accuracy
from training.evals.linear_probe import linear_probe_accuracy
from training.evals.sets import load_instance_set, load_labelled_set, read_frequency
from training.train.dense_probe import linear_dense_probe
from training.train.evals import load_dense_probe_set
from training.train.knn_eval import embed_images


@dataclass(frozen=True)
class EvalSuiteConfig:
    """Where the evaluation sets are; an empty path turns its evaluation off.

    ``labelled``: ``<label>/<image>`` folders for k-NN (leave-one-out, k and temperature as in DINO)
    and the linear probe (``probe_folds``-fold cross-validation). ``frequency``: JSON of label -> images
    in the pool, which splits the k-NN score into head and tail labels (``head_share`` of the pool's
    images in the head). ``instances``: ``<group>/<image>`` folders for instance retrieval,
    ``distractors`` a folder of extra database images. ``dense_probe``: the ``.npz`` of images and
    masks of the dense probe (fit on its first half, scored on the second).
    """

    labelled: str = ""
    frequency: str = ""
    head_share: float = 0.5
    k: int = 20
    temperature: float = 0.07
    probe_folds: int = 5
    instances: str = ""
    distractors: str = ""
    dense_probe: str = ""


class EvalSuite:
    """The sets of ``config`` at ``image_size`` px (the dense probe keeps its own size)."""

    def __init__(self, config: EvalSuiteConfig, image_size: int) -> None:
        self.config = config
        frequency = read_frequency(config.frequency) if config.frequency else None
        if frequency is not None and not config.labelled:
            raise ValueError("evals.frequency splits the labelled set: set evals.labelled too")
        self.labelled = load_labelled_set(config.labelled, image_size, frequency, config.head_share) \
            if config.labelled else None
        self.instances = load_instance_set(config.instances, image_size, config.distractors or None) \
            if config.instances else None
        self.dense = load_dense_probe_set(config.dense_probe) if config.dense_probe else None
        if self.labelled is None and self.instances is None and self.dense is None:
            raise ValueError("no evaluation set configured: set evals.labelled, evals.instances or evals.dense_probe")

    @property
    def names(self) -> list[str]:
        """The score names ``__call__`` returns, in table order."""
        names: list[str] = []
        if self.labelled is not None:
            names += ["knn"] + (["knn_head", "knn_tail"] if self.labelled.head is not None else []) + ["linear_probe"]
        if self.instances is not None:
            names += ["instance_recall_at_1", "instance_map"]
        if self.dense is not None:
            names += ["dense_miou"]
        return names

    def __call__(self, backbone: nn.Module, patch_size: int) -> dict[str, float]:
        """Every configured score of ``backbone`` (left in eval mode; its weights are not touched)."""
        backbone.eval()
        c = self.config
        scores: dict[str, float] = {}
        if self.labelled is not None:  # one embedding of the labelled set serves k-NN and the probe
            features = embed_images(backbone, self.labelled.images)
            scores |= knn_split_accuracy(features, self.labelled.labels, self.labelled.head, c.k, c.temperature)
            scores["linear_probe"] = linear_probe_accuracy(features, self.labelled.labels, c.probe_folds)
        if self.instances is not None:
            scores |= instance_retrieval_eval(backbone, self.instances)
        if self.dense is not None:
            images, masks = self.dense
            half = len(images) // 2
            probe = linear_dense_probe(backbone, images[:half], masks[:half], images[half:], masks[half:], patch_size)
            scores["dense_miou"] = probe["miou"]
        return {name: scores[name] for name in self.names}
