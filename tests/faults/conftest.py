"""Fixtures of the fault suite: small slices of the session's demo pool, so each fault test stays quick."""

from __future__ import annotations

import glob
import os
import shutil

import pytest


def demo_subset(demo_pool: str, dst: str, n: int) -> str:
    """The first ``n`` files of the demo pool (every kind of broken and awkward file among them) in ``dst``."""
    os.makedirs(dst, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(demo_pool, "pool", "**", "*.*"), recursive=True))[:n]:
        shutil.copy(path, os.path.join(dst, os.path.basename(path)))
    return dst


@pytest.fixture(scope="session")
def fault_source(demo_pool, tmp_path_factory) -> str:
    """160 demo files: 8 ingest units of 20."""
    return demo_subset(demo_pool, str(tmp_path_factory.mktemp("fault_pool")), 160)
