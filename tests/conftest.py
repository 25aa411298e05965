"""Shared fixtures: quiet Ray on loopback, and one small demo pool + catalog per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CURATE_PROGRESS", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DEMO_N = 400


@pytest.fixture(scope="session")
def demo_pool(tmp_path_factory) -> str:
    """A small demo pool (every broken and awkward kind, some duplicate groups)."""
    from pipelines.demo_pool import generate_demo_pool

    out = str(tmp_path_factory.mktemp("demo") / "pool_root")
    generate_demo_pool(out, n=DEMO_N, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_catalog(demo_pool, tmp_path_factory) -> str:
    """The demo pool ingested once into a catalog; tests must not modify it."""
    from pipelines.ingest import IngestConfig, ingest

    root = str(tmp_path_factory.mktemp("catalog") / "cat")
    ingest(os.path.join(demo_pool, "pool"), root, IngestConfig(files_per_unit=100))
    return root


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_at_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
