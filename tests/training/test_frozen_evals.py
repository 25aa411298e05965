"""Evaluations of a frozen backbone on cases whose answer is known: a backbone that outputs the label
(or the instance) as a one-hot feature scores 1.0, one that outputs noise scores near chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score
from torch import nn

from training.evals.instance_retrieval import instance_retrieval_eval, retrieval_scores
from training.evals.knn import knn_eval, knn_split_accuracy
from training.evals.linear_probe import linear_probe_accuracy, linear_probe_eval
from training.evals.sets import InstanceSet, LabelledSet, head_labels, load_instance_set, load_labelled_set
from training.evals.suite import EvalSuite, EvalSuiteConfig
from training.models import load_backbone

N_CLASSES, PER_CLASS, SIDE = 10, 20, 8


class OneHotOfPixel(nn.Module):
    """cls = one-hot of the integer written in each image's first pixel: the answer, as a feature."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.unused = nn.Parameter(torch.zeros(1))  # embed_images asks the backbone for its device

    def forward(self, x: torch.Tensor) -> dict:
        return {"cls": nn.functional.one_hot(x[:, 0, 0, 0].round().long(), self.n).float()}


class RandomProjection(nn.Module):
    """cls = a fixed random projection of the pixels, which are noise unrelated to any label."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * SIDE * SIDE, 64)
        nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> dict:
        return {"cls": self.proj(x.flatten(1))}


def _images(ids: np.ndarray, seed: int = 0) -> torch.Tensor:
    """Noise images whose first pixel holds ``ids`` (what OneHotOfPixel reads)."""
    x = torch.randn(len(ids), 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    x[:, 0, 0, 0] = torch.as_tensor(ids, dtype=torch.float32)
    return x


def _labelled(head: np.ndarray | None = None) -> LabelledSet:
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    return LabelledSet(_images(labels), labels, [f"c{i}" for i in range(N_CLASSES)], head)


HALF_HEAD = np.arange(N_CLASSES) < N_CLASSES // 2


def test_head_labels_take_the_most_frequent_until_the_share_is_covered():
    counts = {"a": 50, "b": 30, "c": 15, "d": 5}
    assert head_labels(counts, 0.5) == {"a"}
    assert head_labels(counts, 0.6) == {"a", "b"}
    assert head_labels(counts, 0.9) == {"a", "b", "c"}
    assert head_labels({"x": 3, "y": 3, "z": 1}, 0.4) == {"x"}  # a tie goes to the first name
    with pytest.raises(ValueError, match="head_share"):
        head_labels(counts, 1.0)


def test_knn_of_the_label_itself_is_perfect_on_head_and_tail():
    scores = knn_eval(OneHotOfPixel(N_CLASSES), _labelled(HALF_HEAD))
    assert scores == {"knn": 1.0, "knn_head": 1.0, "knn_tail": 1.0}


def test_knn_of_noise_is_near_chance():
    scores = knn_eval(RandomProjection(), _labelled(HALF_HEAD))
    for name in ("knn", "knn_head", "knn_tail"):
        assert scores[name] < 3 / N_CLASSES, scores


def test_knn_split_scores_head_and_tail_queries_separately():
    """Features that know the head classes only: the head is perfect, the tail at chance."""
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(labels), N_CLASSES))
    head_rows = HALF_HEAD[labels]
    features[head_rows] = 10 * np.eye(N_CLASSES)[labels[head_rows]]
    scores = knn_split_accuracy(features, labels, HALF_HEAD)
    assert scores["knn_head"] == 1.0 and scores["knn_tail"] < 0.5
    assert scores["knn"] == pytest.approx((scores["knn_head"] + scores["knn_tail"]) / 2)
    with pytest.raises(ValueError, match="both head and tail"):
        knn_split_accuracy(features, labels, np.ones(N_CLASSES, bool))


def test_linear_probe_of_the_label_is_perfect_and_of_noise_near_chance():
    assert linear_probe_eval(OneHotOfPixel(N_CLASSES), _labelled()) == {"linear_probe": 1.0}
    assert linear_probe_eval(RandomProjection(), _labelled())["linear_probe"] < 3 / N_CLASSES
    with pytest.raises(ValueError, match="at least 5 images per label"):
        linear_probe_accuracy(np.eye(4), np.array([0, 0, 1, 1]))


def _instances(n_groups: int = 30, per_group: int = 3, n_distractors: int = 100) -> tuple[InstanceSet, np.ndarray]:
    groups = np.concatenate([np.repeat(np.arange(n_groups), per_group), np.full(n_distractors, -1)])
    ids = np.where(groups >= 0, groups, n_groups + np.arange(len(groups)))  # each distractor its own instance
    return InstanceSet(_images(ids, seed=1), groups), ids


def test_instance_retrieval_of_the_instance_itself_is_perfect():
    instances, ids = _instances()
    scores = instance_retrieval_eval(OneHotOfPixel(int(ids.max()) + 1), instances)
    assert scores == {"instance_recall_at_1": 1.0, "instance_map": 1.0}


def test_instance_retrieval_of_noise_is_near_chance():
    instances, _ = _instances()
    scores = instance_retrieval_eval(RandomProjection(), instances)
    assert scores["instance_recall_at_1"] < 0.1 and scores["instance_map"] < 0.1, scores


def test_retrieval_scores_match_sklearn_average_precision():
    rng = np.random.default_rng(3)
    groups = np.array([0, 0, 0, 1, 1, 2, -1, -1, 3])  # group 3 has no positive: a database image only
    features = rng.normal(size=(len(groups), 4))
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    aps, hits = [], []
    for q in np.flatnonzero(groups >= 0):
        if (groups == groups[q]).sum() < 2:
            continue
        others = np.delete(np.arange(len(groups)), q)
        similarity, relevant = x[others] @ x[q], groups[others] == groups[q]
        aps.append(average_precision_score(relevant, similarity))
        hits.append(relevant[np.argmax(similarity)])
    scores = retrieval_scores(features, groups)
    assert scores["instance_map"] == pytest.approx(np.mean(aps))
    assert scores["instance_recall_at_1"] == pytest.approx(np.mean(hits))
    with pytest.raises(ValueError, match="no query has a positive"):
        retrieval_scores(features[:3], np.array([0, 1, -1]))


def _png(path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), colour).save(path)


def test_sets_read_from_folders_and_the_suite_scores_a_real_backbone(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("common", "rare", "rarest"):
        for j in range(5):
            _png(tmp_path / "labelled" / label / f"{j}.png", tuple(int(v) for v in rng.integers(0, 255, 3)))
    (tmp_path / "freq.json").write_text(json.dumps({"common": 90, "rare": 8, "rarest": 2, "absent": 0}))
    for group in ("g0", "g1"):
        for j in range(2):
            _png(tmp_path / "instances" / group / f"{j}.png", (10 * j, 50, 90))
    _png(tmp_path / "instances" / "single" / "0.png", (1, 2, 3))
    for j in range(3):
        _png(tmp_path / "distractors" / "sub" / f"{j}.png", (200, 10 * j, 0))

    labelled = load_labelled_set(str(tmp_path / "labelled"), 16, {"common": 90, "rare": 8, "rarest": 2})
    assert labelled.names == ["common", "rare", "rarest"] and labelled.head.tolist() == [True, False, False]
    assert labelled.images.shape == (15, 3, 16, 16) and labelled.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    with pytest.raises(ValueError, match=r"no count for labels \['rarest'\]"):
        load_labelled_set(str(tmp_path / "labelled"), 16, {"common": 90, "rare": 8})
    instances = load_instance_set(str(tmp_path / "instances"), 16, str(tmp_path / "distractors"))
    assert instances.groups.tolist() == [0, 0, 1, 1, 2, -1, -1, -1]

    config = EvalSuiteConfig(labelled=str(tmp_path / "labelled"), frequency=str(tmp_path / "freq.json"),
                             instances=str(tmp_path / "instances"), distractors=str(tmp_path / "distractors"))
    suite = EvalSuite(config, image_size=16)
    model, _ = load_backbone("vit_test", None)
    scores = suite(model, patch_size=model.config.patch_size)
    assert list(scores) == suite.names == ["knn", "knn_head", "knn_tail", "linear_probe", "instance_recall_at_1",
                                           "instance_map"]
    assert all(0.0 <= v <= 1.0 for v in scores.values()), scores
    with pytest.raises(ValueError, match="no evaluation set configured"):
        EvalSuite(EvalSuiteConfig(), image_size=16)
