"""Checkpoints of array-valued algorithm state (k-means levels, resampling steps) under a catalog.

Each key is one ``.npz`` object written atomically, on any fsspec path, so a killed stage resumes at
the last step it saved, on a laptop or against a bucket alike.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np

from catalog.paths import exists, join, read_bytes, resolve, write_bytes_atomic


def checkpoint_path(stage: str, key: str) -> str:
    """The catalog-relative path of one bundle (what a unit's output files name, to commit it with the unit)."""
    return f"_checkpoints/{stage}/{key.replace('/', '__')}.npz"


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """One bundle as ``.npz`` bytes."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


class CatalogArrayStore:
    """``get``/``put`` of named array bundles below ``<root>/_checkpoints/<stage>/``."""

    def __init__(self, root: str, stage: str):
        self.root, self.stage = root, stage
        self.dir = join(root, "_checkpoints", stage)

    def _url(self, key: str) -> str:
        return join(self.root, checkpoint_path(self.stage, key))

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        url = self._url(key)
        if not exists(url):
            return None
        with np.load(io.BytesIO(read_bytes(url)), allow_pickle=False) as data:
            return {name: data[name] for name in data.files}

    def put(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        write_bytes_atomic(self._url(key), npz_bytes(arrays))

    def clear(self) -> None:
        fs, path = resolve(self.dir)
        if fs.exists(path):
            fs.rm(path, recursive=True)
