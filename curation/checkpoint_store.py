"""Key → dict-of-arrays stores for resumable algorithms (hierarchical k-means checkpoints).

Any object with ``get(key) -> dict[str, np.ndarray] | None`` and ``put(key, arrays)`` works; these two
cover tests (memory) and single-machine runs (a directory of ``.npz`` files written atomically).
"""

from __future__ import annotations

import os
from pathlib import Path
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


class NpzDirStore:
    """One ``<root>/<key>.npz`` per key; written to a temp file and renamed, so a kill never leaves
    a half-written checkpoint behind."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        path = self._path(key)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def put(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
