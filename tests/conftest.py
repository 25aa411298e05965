"""Shared fixtures: quiet Ray on loopback, one small demo pool + catalog per test session, and the
``--device`` option (tests of code that runs on CPU and CUDA take the ``device`` fixture).

Nothing heavy is imported here, so the device-capable test files also run on a machine that has
torch but not Ray, DuckDB or faiss (``pytest --device cuda tests/test_kmeans.py …``).
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("CURATE_PROGRESS", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DEMO_N = 1500


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"],
                     help="where tests that take the `device` fixture compute (default cpu)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--device") == "cpu":
        # Triton kernels (`curation.fused_nearest`) then run on CPU tensors in Triton's interpreter;
        # it must be chosen before Triton is first imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest):
    import torch

    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: CUDA is not available")
    return torch.device(name)


@pytest.fixture(scope="session")
def demo_pool(tmp_path_factory) -> str:
    """A small demo pool (every broken and awkward kind, some duplicate groups)."""
    from pipelines.demo.pool import generate_demo_pool

    out = str(tmp_path_factory.mktemp("demo") / "pool_root")
    generate_demo_pool(out, n=DEMO_N, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_catalog(demo_pool, tmp_path_factory) -> str:
    """The demo pool ingested once into a catalog; tests must not modify it."""
    from pipelines.stage import run_stage
    from pipelines.stages.ingest import IngestConfig

    root = str(tmp_path_factory.mktemp("catalog") / "cat")
    run_stage("ingest", root, IngestConfig(source=os.path.join(demo_pool, "pool"), files_per_unit=100))
    return root


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_at_end():
    yield
    ray = sys.modules.get("ray")  # only a session that imported Ray can have started it
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def concept_of_uri(demo_pool: str) -> dict[str, int]:
    """Ground-truth concept of every pool file, by the URI ingest records (tests only)."""
    import pyarrow.parquet as pq

    truth = pq.read_table(os.path.join(demo_pool, "truth", "pool.parquet")).to_pylist()
    return {os.path.join(demo_pool, "pool", r["relpath"]): r["concept"] for r in truth}


@pytest.fixture(scope="session")
def lvd_catalog(demo_catalog, tmp_path_factory) -> str:
    """A copy of the demo catalog through build-lvd (30% target) with the demo job's settings (the
    shipped demo backbone at 64 px, the default 5 levels)."""
    import shutil

    from catalog.config import load_config
    from pipelines.build_lvd import BuildLVDConfig, build_lvd
    from pipelines.demo.job import DEMO_SETTINGS

    root = str(tmp_path_factory.mktemp("lvd") / "cat")
    shutil.copytree(demo_catalog, root)
    config = load_config(BuildLVDConfig, None, [*DEMO_SETTINGS, f"sample.target_size={int(DEMO_N * 0.3)}"])
    build_lvd(root, config)
    return root


@pytest.fixture(scope="session")
def fsdp_pretrain(tmp_path_factory):
    """A 2-process FSDP2 tiny pretraining (torchrun, gloo): 8 steps, checkpoints every 3, the last 2 kept.

    Returns (catalog, run dir, steps, the overrides that made it). The trainer's resume test compares
    against it; the stage chain starts its Gram stage from it.
    """
    from tests.train_helpers import TINY, make_catalog, run_torchrun, torchrun_command

    root = tmp_path_factory.mktemp("fsdp")
    catalog = make_catalog(root)
    overrides = ("optim.iterations=8", "checkpoint.period=3", "checkpoint.keep_last=2")
    run_torchrun(torchrun_command(TINY, catalog, root / "full", *overrides))
    return catalog, root / "full", 8, overrides


@pytest.fixture(scope="session")
def explore_catalog(lvd_catalog, tmp_path_factory) -> str:
    """A copy of ``lvd_catalog`` for `curate explore`'s tests: other tests add tables to the shared one
    (retrieve), which would change the site between its tests."""
    import shutil

    root = str(tmp_path_factory.mktemp("explore_catalog") / "cat")
    shutil.copytree(lvd_catalog, root, ignore=shutil.ignore_patterns("reports", "_index", "_checkpoints"))
    return root


@pytest.fixture(scope="session")
def explore_site(explore_catalog, tmp_path_factory) -> str:
    """`curate explore` of ``explore_catalog`` with the default settings; tests must not modify it."""
    from pipelines.explore.site import build_site

    out = str(tmp_path_factory.mktemp("explore") / "site")
    build_site(explore_catalog, out)
    return out
