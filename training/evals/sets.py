"""Evaluation sets read from folders on any fsspec store, decoded once and reused for every backbone.

- a labelled set: ``<folder>/<label>/<image>``, optionally with a frequency table (JSON object
  ``{label: images of that label in the training pool}``) that splits its labels into head and tail;
- an instance set: ``<folder>/<group>/<image>``, each group the views of one instance (every image of
  a group with two or more is a query whose positives are the rest of its group), plus an optional
  folder of distractors, images that are no query's positive.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from catalog.decode import DecodeError, Preprocess, decode_rgb
from catalog.images import read_image_bytes
from catalog.paths import read_bytes, resolve, retry, with_protocol
from training.train.evals import labelled_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledSet:
    images: Tensor  # [n, 3, H, W], normalised like the evaluation crops
    labels: np.ndarray  # [n] class index into ``names``
    names: list[str]
    head: np.ndarray | None  # [n_classes] True for a head label of the pool; None without a frequency table


@dataclass(frozen=True)
class InstanceSet:
    images: Tensor  # [n, 3, H, W]
    groups: np.ndarray  # [n] instance group, -1 for a distractor


def _decode(urls: list[str], size: int) -> Tensor:
    pre = Preprocess(size=size)
    out = []
    for url in urls:
        try:
            out.append(pre(decode_rgb(read_image_bytes(url))))
        except DecodeError as e:
            raise ValueError(f"evaluation image {url} cannot be decoded: {e}") from e
    return torch.from_numpy(np.stack(out))


def read_frequency(path: str) -> dict[str, int]:
    """A frequency table: a JSON object of label -> non-negative image count."""
    doc = json.loads(read_bytes(path))
    if not isinstance(doc, dict) or not all(isinstance(v, int) and v >= 0 for v in doc.values()):
        raise ValueError(f"{path}: a frequency table is a JSON object of label -> image count")
    return {str(k): v for k, v in doc.items()}


def head_labels(frequency: Mapping[str, int], head_share: float = 0.5) -> set[str]:
    """The head of the pool's distribution: the most frequent labels holding ``head_share`` of its images.

    Labels are taken by decreasing count until they cover at least ``head_share`` of the total. Ties in frequency are broken by label name, so the split is a pure function of the table.
    """
    if not 0.0 < head_share < 1.0:
        raise ValueError(f"head_share must be in (0, 1), got {head_share}")
    total = sum(frequency.values())
    if total <= 0:
        raise ValueError("the frequency table counts no images")
    head: set[str] = set()
    covered = 0
    for label, count in sorted(frequency.items(), key=lambda kv: (-kv[1], kv[0])):
        if covered >= head_share * total:
            break
        head.add(label)
        covered += count
    return head


def load_labelled_set(folder: str, size: int, frequency: dict[str, int] | None = None,
                      head_share: float = 0.5) -> LabelledSet:
    """Every image under ``folder/<label>/`` at ``size`` px; head/tail labels from ``frequency`` when given."""
    files = labelled_files(folder)
    if len(files) < 2:
        raise ValueError(f"{folder!r} needs at least two <label>/<image> folders, found {len(files)}")
    names = list(files)
    labels = np.concatenate([np.full(len(urls), i) for i, urls in enumerate(files.values())])
    head = None
    if frequency is not None:
        missing = sorted(set(names) - set(frequency))
        if missing:
            raise ValueError(f"the frequency table has no count for labels {missing[:10]} of {folder!r}")
        head_set = head_labels(frequency, head_share)
        head = np.array([name in head_set for name in names])
        log.info("%s: %d head and %d tail labels", folder, int(head.sum()), int((~head).sum()))
    return LabelledSet(_decode([u for urls in files.values() for u in urls], size), labels, names, head)


def _all_files(folder: str) -> list[str]:
    fs, root = resolve(folder, fresh=True)
    return [with_protocol(fs, p) for p in sorted(retry(lambda: fs.find(root.rstrip("/"))))]


def load_instance_set(folder: str, size: int, distractors: str | None = None) -> InstanceSet:
    """The groups under ``folder/<group>/`` and every file under ``distractors`` (group -1), at ``size`` px."""
    groups = labelled_files(folder)
    if not any(len(urls) >= 2 for urls in groups.values()):
        raise ValueError(f"{folder!r} has no <group>/ folder with two or more images: nothing to query")
    urls = [u for members in groups.values() for u in members]
    ids = [g for g, members in enumerate(groups.values()) for _ in members]
    extra = _all_files(distractors) if distractors else []
    return InstanceSet(_decode(urls + extra, size), np.asarray(ids + [-1] * len(extra)))
