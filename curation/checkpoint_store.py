"""Key → dict-of-arrays stores for resumable algorithms (hierarchical k-means checkpoints).

Any object with ``get(key) -> dict[str, np.ndarray] | None`` and ``put(key, arrays)`` works: the stage
uses ``catalog.array_store.CatalogArrayStore`` (``.npz`` objects under the catalog, on any fsspec
path); ``MemoryStore`` serves tests and in-memory runs.
"""

from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np


class ArrayStore(Protocol):
    def get(self, key: str) -> dict[str, np.ndarray] | None: ...

    def put(self, key: str, arrays: Mapping[str, np.ndarray]) -> None: ...


class MemoryStore:
    """Keeps copies, so later mutation of the caller's arrays cannot alter a checkpoint."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, np.ndarray]] = {}

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        got = self.data.get(key)
        return None if got is None else {k: v.copy() for k, v in got.items()}

    def put(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        self.data[key] = {k: np.array(v, copy=True) for k, v in arrays.items()}
