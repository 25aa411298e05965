"""A new user's own pool (issue 15): no random backbone by accident, thread counts from the CPUs the
process has, no quiet gaps in what ingest and dedup did, and the README's commands work as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from catalog.config import ConfigError
from catalog.shards import table_exists
from catalog.sql import query
from catalog.threads import OVERRIDE_ENV, allotted_threads, cgroup_cpu_limit, ensure_threads, machine_cpus
from pipelines.demo.backbone import DEMO_EMBED_SETTINGS, DEMO_SETTINGS
from pipelines.reports import pick_clusters
from tests.helpers import REPO, cli_env, run_cli


def _folder_of_demo_images(demo_pool: str, out: str, n: int) -> str:
    """``n`` plain images of the demo pool (no broken, awkward or duplicated file) in a flat folder."""
    truth = pq.read_table(os.path.join(demo_pool, "truth", "pool.parquet")).to_pylist()
    plain = sorted(r["relpath"] for r in truth if r["kind"] == "normal" and r["dup_group"] == -1)[:n]
    os.makedirs(out)
    for rel in plain:
        shutil.copy(os.path.join(demo_pool, "pool", rel), os.path.join(out, os.path.basename(rel)))
    return out


@pytest.fixture(scope="module")
def clean_lvd(demo_pool, tmp_path_factory) -> tuple[str, str, subprocess.CompletedProcess]:
    """build-lvd with the demo backbone on 30 plain demo images plus one exact copy: (folder, catalog, result)."""
    work = tmp_path_factory.mktemp("clean")
    folder = _folder_of_demo_images(demo_pool, str(work / "photos"), 30)
    first = sorted(os.listdir(folder))[0]
    shutil.copy(os.path.join(folder, first), os.path.join(folder, "zz_copy_of_" + first))
    root = str(work / "cat")
    result = run_cli(["build-lvd", "--catalog", root, "--source", folder, "--target-size", "10",
                      "--set", *DEMO_SETTINGS])
    assert result.returncode == 0, result.stderr
    return folder, root, result


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


def test_embed_without_weights_refuses_unless_random_init_is_asked_for(demo_pool, tmp_path):
    root = str(tmp_path / "cat")
    assert run_cli(["ingest", _folder_of_demo_images(demo_pool, str(tmp_path / "mine"), 3), "--catalog", root]
                   ).returncode == 0
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
                  "pools": sorted({{p["num_threads"] for p in threadpool_info()}}), "env": os.environ["OMP_NUM_THREADS"],
                  "wait": os.environ["OMP_WAIT_POLICY"]}}))
"""


def _threads_in_child(cpus: set[int], root: str, *args: str, before: str = "") -> dict:
    """Run the CLI in a child pinned to ``cpus`` and report every library's thread count after it."""
    env = {k: v for k, v in cli_env().items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", _REPORT_THREADS.format(before=before), root, *args], env=env, capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: os.sched_setaffinity(0, cpus), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_thread_counts_follow_the_cpus_the_process_may_use(tmp_path):
    one = {min(os.sched_getaffinity(0))}
    # torch and numpy's BLAS loaded before the CLI starts (their running pools are resized), faiss after
    # (its OpenMP reads the environment at load)
    pinned = _threads_in_child(one, str(tmp_path / "a"), before="import torch, numpy")
    assert pinned == {"torch": 1, "faiss": 1, "pools": [1], "env": "1", "wait": "PASSIVE"}, pinned


@pytest.mark.slow  # starts Ray unless the session already has it
def test_a_ray_task_sizes_its_threads_to_its_cpu_allotment():
    import ray

    from catalog.ray_runtime import ensure_ray

    ensure_ray()
    cpus = int(min(machine_cpus(), ray.cluster_resources()["CPU"]))
    for asked in sorted({1, cpus}):
        assert ray.get(ray.remote(num_cpus=asked)(ensure_threads).remote()) == asked


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


def test_non_image_files_are_errors_rows_and_ingest_says_what_it_skipped(demo_pool, tmp_path):
    folder = _folder_of_demo_images(demo_pool, str(tmp_path / "mixed"), 2)
    for i in range(3):
        (tmp_path / "mixed" / f"stamp{i}.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" '
                                                         'height="8"><rect width="8" height="8"/></svg>')
    (tmp_path / "mixed" / "notes.txt").write_text("not a picture\n")
    (tmp_path / "mixed" / "sound.wav").write_bytes(b"RIFF" + (36).to_bytes(4, "little") + b"WAVEfmt " + bytes(28))
    root = str(tmp_path / "cat")
    result = run_cli(["ingest", folder, "--catalog", root])
    assert result.returncode == 0, result.stderr
    assert "skipped 5 (.svg ×3, .txt ×1, .wav ×1)" in result.stdout, result.stdout
    rows = query(root, "SELECT uri, reason, message FROM errors ORDER BY uri").to_pylist()
    reasons = {os.path.basename(r["uri"]): r["reason"] for r in rows}
    assert reasons == {"notes.txt": "text_file", "sound.wav": "not_an_image",
                       **{f"stamp{i}.svg": "not_an_image" for i in range(3)}}
    assert all("SVG" in r["message"] for r in rows if r["uri"].endswith(".svg"))


def test_build_lvd_prints_what_dedup_removed_with_file_names(clean_lvd):
    folder, root, result = clean_lvd
    first = sorted(os.listdir(folder))[0]
    line = next(x for x in result.stdout.splitlines() if x.strip().startswith("exact:"))
    assert line.strip().startswith("exact: 1, e.g.") and first.removeprefix("zz_copy_of_") in line, result.stdout
    assert re.search(r"^dedup: removed \d+ images?$", result.stdout, re.M), result.stdout
    assert "skipped 0" in result.stdout


def test_duplicate_pairs_name_both_images(clean_lvd):
    folder, root, _ = clean_lvd
    pairs = query(root, "SELECT uri, kept_uri, reason FROM duplicate_pairs WHERE reason = 'exact'").to_pylist()
    assert len(pairs) == 1
    removed, kept = (open(u.removeprefix("file://"), "rb").read() for u in (pairs[0]["uri"], pairs[0]["kept_uri"]))
    assert removed == kept and pairs[0]["uri"] != pairs[0]["kept_uri"]


def _readme_queries() -> list[str]:
    """Every ``curate sql "…"`` in README.md's code blocks, as written."""
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"^```[a-z]*\n(.*?)^```", f.read(), re.M | re.S)
    return [q for block in blocks for q in re.findall(r'curate sql "([^"]+)"', block)]


def test_every_readme_query_runs_on_a_catalog_with_no_broken_files(clean_lvd):
    _, root, _ = clean_lvd
    assert query(root, "SELECT count(*) FROM errors").column(0)[0].as_py() == 0
    queries = _readme_queries()
    assert len(queries) >= 4
    for sql in queries:
        result = run_cli(["sql", sql, "--catalog", root])
        assert result.returncode == 0, (sql, result.stderr)


def test_the_readme_trial_run_uses_the_demo_backbone_settings():
    with open(os.path.join(REPO, "README.md")) as f:
        line = next(x for x in f if "embed.model=curate:" in x)
    relative = [s.replace(REPO + os.sep, "") for s in DEMO_SETTINGS]
    assert line.split() == relative, (line, relative)


def test_contact_sheets_pick_the_largest_random_and_smallest_clusters(clean_lvd):
    sizes = {c: n for c, n in enumerate([50, 3, 9, 1, 20, 7, 5, 12])}
    picked = pick_clusters(sizes, 2, seed=0)
    roles = [r for _, r in picked]
    assert roles == ["largest", "largest", "random", "random", "smallest", "smallest"]
    assert [c for c, _ in picked][:2] == [0, 4] and [c for c, _ in picked][-2:] == [1, 3]
    assert len({c for c, _ in picked}) == 6
    assert sorted(c for c, _ in pick_clusters({1: 4, 2: 2, 3: 1}, 2, seed=0)) == [1, 2, 3]  # each once
    _, root, _ = clean_lvd
    for name in ("contact_sheet_pool", "contact_sheet_curated"):
        assert os.path.getsize(os.path.join(root, "reports", "lvd", f"{name}.png")) > 1000
