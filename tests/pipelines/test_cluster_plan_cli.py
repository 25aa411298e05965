"""The cluster stage's default levels (cost-shaped level 1) and ``curate cluster --plan``, which prints them
for a pool size without data."""

import re

from curation.cluster_cost import kmeans_cost
from curation.hierarchy import default_levels
from pipelines.stages.cluster import ClusterConfig, level_specs
from tests.helpers import run_cli


def _level_rows(text: str) -> dict[int, list[str]]:
    """The plan's level rows, split in columns (a two-step shape "P × S" kept as one column)."""
    rows = {}
    for line in text.splitlines():
        if re.match(r"^\s+\d+\s+[\d,]+\s", line):
            cols = re.sub(r"(\d[\d,]*) × (\d+)", r"\1×\2", line).split()
            rows[int(cols[0])] = cols
    return rows


def test_stage_levels_are_two_step_where_a_direct_level_1_costs_too_much():
    specs = level_specs(ClusterConfig(n_levels=4), 200_000, 384)
    assert specs == default_levels(200_000, 4, resampling_steps=10, dim=384, n_iter=30)
    assert specs[0].n_splits > 1 and specs[0].clusters >= 11_447
    assert kmeans_cost(200_000, specs[0].clusters, 384, 30).flops > 1e12  # why it is two-step
    small = level_specs(ClusterConfig(), 10_000, 384)
    assert small[0].n_splits == 1  # a direct k-means while cheap
    configured = ClusterConfig(levels=specs[:2])
    assert level_specs(configured, 10_000, 384) == specs[:2]  # explicit levels are kept as given


def test_plan_for_a_billion_rows_fits_80gb_per_worker():
    result = run_cli(["cluster", "--plan", "--rows", "1000000000", "--dim", "1024"])
    assert result.returncode == 0, result.stderr
    rows = _level_rows(result.stdout)
    assert sorted(rows) == [1, 2, 3, 4, 5]
    level1 = rows[1]
    spec = level_specs(ClusterConfig(), 10**9, 1024)[0]
    assert level1[3] == f"{spec.k:,}×{spec.n_splits}"
    workers, gb_per_worker = int(level1[-2]), float(level1[-1])
    assert workers > 1 and gb_per_worker <= 80 * 0.9
    assert workers * gb_per_worker >= 10**9 * 1024 * 2 / 1e9  # every row is held somewhere (bf16)


def test_plan_follows_the_cli_flags_and_settings():
    result = run_cli(["cluster", "--plan", "--rows", "200000", "--dim", "384", "--levels", "4",
                      "--set", "resampling_steps=3"])
    assert result.returncode == 0, result.stderr
    rows = _level_rows(result.stdout)
    specs = level_specs(ClusterConfig(n_levels=4, resampling_steps=3), 200_000, 384)
    assert [int(rows[i][2].replace(",", "")) for i in (1, 2, 3, 4)] == [s.clusters for s in specs]
    assert rows[1][3] == f"{specs[0].k}×{specs[0].n_splits}" and rows[2][3] == "direct"
    assert [int(rows[i][4]) for i in (1, 2, 3, 4)] == [0, 3, 3, 3]


def test_plan_needs_its_sizes_and_a_run_needs_a_catalog():
    missing = run_cli(["cluster", "--plan", "--rows", "1000"])
    assert missing.returncode == 2 and "--plan needs --dim" in missing.stderr
    no_catalog = run_cli(["cluster"])
    assert no_catalog.returncode == 2 and "--catalog is required" in no_catalog.stderr
    helped = run_cli(["cluster", "--help"])
    assert "--plan" in helped.stdout and "80 GB GPU" in helped.stdout and "no catalog" in helped.stdout
