"""Shared fixtures: quiet Ray on loopback, one small demo pool + catalog per test session, and the
``--device`` option (tests of code that runs on CPU and CUDA take the ``device`` fixture).

Nothing heavy is imported here, so the device-capable test files also run on a machine that has
torch but not Ray, DuckDB or faiss (``pytest --device cuda tests/test_kmeans.py …``).

The suite runs in two pytest-xdist workers (``./run.sh test``), each in its own order; the expensive
fixtures are built once per run and shared (``built_once``), and every test module gets its own fresh
copy of the demo and LVD catalogs (tests add tables to them), so no module sees another's changes.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

os.environ.setdefault("CURATE_PROGRESS", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it (catalog.threads): two workers share the cores

DEMO_N = 1500
# Filter thresholds for the demo pool (its images are 48..256 px, so DataComp's 200 px would remove most):
# they remove exactly the planted low-quality images (tests/pipelines/test_quality.py, docs/benchmarks.md).
DEMO_FILTER = ("drop_constant=true", "min_side=24", "max_aspect=3", "min_sharpness=6")


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name``, filled by ``build`` once per test run. Under pytest-xdist every worker has its
    own base folder inside the run's: the first worker to ask builds it there, the others wait on its lock."""
    base = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder, done = base / name, base / f"{name}.done"
    with FileLock(str(base / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def fresh_copy(factory: pytest.TempPathFactory, built: Path, name: str) -> str:
    """A copy of the catalog ``built`` of one test module's own."""
    copy = factory.mktemp(name) / built.name
    shutil.copytree(built, copy)
    return str(copy)


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

    folder = built_once(tmp_path_factory, "demo", lambda f: generate_demo_pool(str(f / "pool_root"), n=DEMO_N, seed=0))
    return str(folder / "pool_root")


@pytest.fixture(scope="session")
def built_demo_catalog(demo_pool, tmp_path_factory) -> Path:
    """The demo pool ingested once per run (no test touches this one: they get `demo_catalog`)."""
    from pipelines.stage import run_stage
    from pipelines.stages.ingest import IngestConfig

    def ingest(folder: Path) -> None:
        run_stage("ingest", str(folder / "cat"), IngestConfig(source=os.path.join(demo_pool, "pool"), files_per_unit=100))

    return built_once(tmp_path_factory, "catalog", ingest) / "cat"


@pytest.fixture(scope="module")
def demo_catalog(built_demo_catalog, tmp_path_factory) -> str:
    """The ingested demo pool, this module's own copy."""
    return fresh_copy(tmp_path_factory, built_demo_catalog, "catalog")


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
def built_lvd_catalog(built_demo_catalog, tmp_path_factory) -> Path:
    """The demo catalog through build-lvd (30% target) once per run, with the demo job's settings (the
    shipped demo backbone at 64 px, the default 5 levels) and the quality filter at the demo pool's
    thresholds (`DEMO_FILTER`), which removes none of its images (only planted ones). Tests get `lvd_catalog`."""
    from catalog.config import load_config
    from pipelines.build_lvd import BuildLVDConfig, build_lvd
    from pipelines.demo.job import DEMO_SETTINGS

    def build(folder: Path) -> None:
        shutil.copytree(built_demo_catalog, folder / "cat")
        config = load_config(BuildLVDConfig, None, [*DEMO_SETTINGS, *(f"filter.{s}" for s in DEMO_FILTER),
                                                    f"sample.target_size={int(DEMO_N * 0.3)}"])
        build_lvd(str(folder / "cat"), config)

    return built_once(tmp_path_factory, "lvd", build) / "cat"


@pytest.fixture(scope="module")
def lvd_catalog(built_lvd_catalog, tmp_path_factory) -> str:
    """The demo pool's LVD catalog (`built_lvd_catalog`), this module's own copy."""
    return fresh_copy(tmp_path_factory, built_lvd_catalog, "lvd")


@pytest.fixture(scope="session")
def fsdp_pretrain(tmp_path_factory):
    """A 2-process FSDP2 tiny pretraining (torchrun, gloo): 8 steps, checkpoints every 3, the last 2 kept.

    Returns (catalog, run dir, steps); the stage chain starts its Gram stage from it.
    """
    from tests.train_helpers import TINY, make_catalog, run_torchrun, torchrun_command

    def pretrain(folder: Path) -> None:
        run_torchrun(torchrun_command(TINY, make_catalog(folder), folder / "full", "optim.iterations=8",
                                      "checkpoint.period=3", "checkpoint.keep_last=2"))

    root = built_once(tmp_path_factory, "fsdp", pretrain)  # read only: no test writes into it
    return str(root / "catalog"), root / "full", 8


@pytest.fixture(scope="session")
def explore_catalog(built_lvd_catalog, tmp_path_factory) -> str:
    """The LVD catalog as `curate explore`'s tests see it, once per run; tests must not modify it."""
    ignore = shutil.ignore_patterns("reports", "_index", "_checkpoints")
    return str(built_once(tmp_path_factory, "explore_catalog",
                          lambda f: shutil.copytree(built_lvd_catalog, f / "cat", ignore=ignore)) / "cat")


@pytest.fixture(scope="session")
def explore_site(explore_catalog, tmp_path_factory) -> str:
    """`curate explore` of ``explore_catalog`` with the default settings, once per run; tests must not modify it."""
    from pipelines.explore.site import build_site

    return str(built_once(tmp_path_factory, "explore", lambda f: build_site(explore_catalog, str(f / "site"))) / "site")
