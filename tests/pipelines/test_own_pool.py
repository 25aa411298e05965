"""A new user's own pool (issue 15): no random backbone by accident, thread counts from the CPUs the
process has, no quiet gaps in what ingest and dedup did, and the README's commands work as written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from catalog.config import ConfigError
from catalog.shards import table_exists
from catalog.threads import OVERRIDE_ENV, allotted_threads, cgroup_cpu_limit, machine_cpus
from pipelines.demo.backbone import DEMO_EMBED_SETTINGS
from tests.helpers import cli_env, run_cli


def _folder_of_demo_images(demo_pool: str, out: str, n: int) -> str:
    """``n`` usable images of the demo pool copied into a flat folder (a user's own small pool)."""
    pool = os.path.join(demo_pool, "pool")
    os.makedirs(out)
    for path in sorted(os.path.join(d, f) for d, _, fs in os.walk(pool) for f in fs if f.endswith(".jpg"))[:n]:
        shutil.copy(path, os.path.join(out, os.path.basename(path)))
    return out


def test_build_lvd_without_weights_refuses_before_any_work_and_names_both_ways_out(demo_pool, tmp_path):
    folder = _folder_of_demo_images(demo_pool, str(tmp_path / "mine"), 5)
    root = str(tmp_path / "cat")
    result = run_cli(["build-lvd", "--catalog", root, "--source", folder, "--target-size", "3"])
    assert result.returncode == 2, result.stderr
    message = result.stderr
    assert "embed.weights is not set" in message and "embed.weights=" in message
    assert " ".join(f"embed.{s}" for s in DEMO_EMBED_SETTINGS) in message  # the exact --set lines
    assert "embed.random_init=true" in message
    assert not table_exists(root, "pool")  # refused before ingest


def test_embed_without_weights_refuses_unless_random_init_is_asked_for(demo_catalog, tmp_path):
    root = str(tmp_path / "cat")
    shutil.copytree(demo_catalog, root)
    result = run_cli(["embed", "--catalog", root, "--model", "vit_test", "--set", "image_size=32"])
    assert result.returncode == 2 and "weights is not set" in result.stderr, result.stderr
    assert f"--set {DEMO_EMBED_SETTINGS[0]}" in result.stderr  # `curate embed` keys carry no prefix
    assert not table_exists(root, "embeddings")
    contradiction = run_cli(["embed", "--catalog", root, "--set", DEMO_EMBED_SETTINGS[0], "random_init=true"])
    assert contradiction.returncode == 2 and "contradicts" in contradiction.stderr


_REPORT_THREADS = """
import json, os, sys
{before}
from pipelines.cli import main
assert main(["sql", "SELECT 1", "--catalog", sys.argv[1], *sys.argv[2:]]) == 0
import faiss, torch
from threadpoolctl import threadpool_info
print(json.dumps({{"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads(),
                  "pools": sorted({{p["num_threads"] for p in threadpool_info()}}), "env": os.environ["OMP_NUM_THREADS"]}}))
"""


def _threads_in_child(cpus: set[int], root: str, *args: str, before: str = "") -> dict:
    """Run the CLI in a child pinned to ``cpus`` and report every library's thread count after it."""
    out = subprocess.run([sys.executable, "-c", _REPORT_THREADS.format(before=before), root, *args],
                         env=cli_env(), capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: os.sched_setaffinity(0, cpus), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_thread_counts_follow_the_cpus_the_process_may_use(tmp_path):
    one = {min(os.sched_getaffinity(0))}
    # torch and numpy's BLAS loaded before the CLI starts (their running pools are resized), faiss after
    # (its OpenMP reads the environment at load)
    pinned = _threads_in_child(one, str(tmp_path / "a"), before="import torch, numpy")
    assert pinned == {"torch": 1, "faiss": 1, "pools": [1], "env": "1"}, pinned


def test_curate_threads_overrides_the_count_and_a_bad_value_is_a_user_error(monkeypatch):
    monkeypatch.setenv(OVERRIDE_ENV, "3")
    assert allotted_threads() == 3
    monkeypatch.setenv(OVERRIDE_ENV, "0")
    with pytest.raises(ConfigError, match="CURATE_THREADS"):
        allotted_threads()
    monkeypatch.delenv(OVERRIDE_ENV)
    assert allotted_threads() == machine_cpus()  # the test process is no Ray worker


def test_a_container_quota_caps_the_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert machine_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None and machine_cpus(tmp_path) == len(os.sched_getaffinity(0))
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path / "v1") == 0.5 and machine_cpus(tmp_path / "v1") == 1
