"""The training mix of a catalog: ``<catalog>/_mix.json``, written by ``curate mix``, read by the trainer.

It records which curated parts a training run draws from (``curated/<part>``, with the number of
images each had when the mix was built), the heterogeneous weight of each part, and the part whose
images fill the homogeneous batches (ImageNet-1k in the DINOv3 recipe) with the probability of such a
step. The file lives in the catalog room so that the stage that writes it and the trainer that reads
it share one definition without importing each other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from catalog.errors import UserError
from catalog.paths import exists, join, read_bytes, write_bytes_atomic
from catalog.schemas import MIX_FILE


class MixFileError(UserError, ValueError):
    """``_mix.json`` exists but does not describe a usable mix."""


@dataclass(frozen=True)
class TrainingMix:
    """What ``_mix.json`` holds.

    ``weights`` covers any subset of ``parts`` (any positive scale; the trainer normalises over the
    heterogeneous parts, so a weight recorded for the homogeneous part is not used for mixing).
    ``homogeneous_part`` None: every step is heterogeneous.
    """

    parts: Mapping[str, int]
    weights: Mapping[str, float] = field(default_factory=dict)
    homogeneous_part: str | None = None
    p_homogeneous: float = 0.0

    def __post_init__(self) -> None:
        if not self.parts:
            raise MixFileError("a training mix needs at least one part")
        bad_sizes = {p: n for p, n in self.parts.items() if not isinstance(n, int) or isinstance(n, bool) or n < 0}
        if bad_sizes:
            raise MixFileError(f"part sizes must be non-negative integers, got {bad_sizes}")
        unknown = sorted(set(self.weights) - set(self.parts))
        if unknown:
            raise MixFileError(f"weights name parts that are not in the mix: {unknown} (parts: {sorted(self.parts)})")
        bad_weights = {p: w for p, w in self.weights.items() if not math.isfinite(w) or w < 0}
        if bad_weights:
            raise MixFileError(f"weights must be finite and non-negative, got {bad_weights}")
        if self.homogeneous_part is not None and self.homogeneous_part not in self.parts:
            raise MixFileError(f"homogeneous part {self.homogeneous_part!r} is not among the parts "
                               f"{sorted(self.parts)}")
        if not 0.0 <= self.p_homogeneous <= 1.0:
            raise MixFileError(f"p_homogeneous must be in [0, 1], got {self.p_homogeneous}")

    def to_json(self) -> dict[str, Any]:
        """The file's form (``homogeneous_part`` "" for none, as the file has always had it)."""
        return {"parts": dict(self.parts), "weights": dict(self.weights),
                "homogeneous_part": self.homogeneous_part or "", "p_homogeneous": self.p_homogeneous}

    @classmethod
    def from_json(cls, doc: Any, where: str = MIX_FILE) -> TrainingMix:
        if not isinstance(doc, Mapping) or not isinstance(doc.get("parts"), Mapping):
            raise MixFileError(f"{where}: expected an object with 'parts', got {str(doc)[:200]!r}")
        try:
            return cls(
                parts={str(k): v for k, v in doc["parts"].items()},
                weights={str(k): float(v) for k, v in (doc.get("weights") or {}).items()},
                homogeneous_part=doc.get("homogeneous_part") or None,
                p_homogeneous=float(doc.get("p_homogeneous") or 0.0),
            )
        except (TypeError, ValueError) as e:
            raise MixFileError(f"{where}: {e}") from e


def write_mix(root: str, mix: TrainingMix) -> str:
    """Write (atomically replace) the catalog's mix; returns the file's URL."""
    url = join(root, MIX_FILE)
    write_bytes_atomic(url, json.dumps(mix.to_json(), indent=2).encode())
    return url


def read_mix(root: str) -> TrainingMix | None:
    """The catalog's mix, or None when ``curate mix`` never ran on it."""
    url = join(root, MIX_FILE)
    if not exists(url):
        return None
    try:
        doc = json.loads(read_bytes(url))
    except json.JSONDecodeError as e:
        raise MixFileError(f"{url}: not JSON ({e})") from e
    return TrainingMix.from_json(doc, url)
