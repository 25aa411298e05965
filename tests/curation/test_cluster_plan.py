"""The cost model against FLOPs counted on real runs, the level-1 rule, and the plan of a 10^9-row pool."""

import math

import numpy as np
import pytest
from torch.utils.flop_counter import FlopCounterMode

from curation.cluster_cost import (
    DIRECT_MAX_FLOPS,
    MachineRates,
    kmeans_cost,
    level1_shape,
    measure_rates,
    split_cost,
    two_step_shape,
)
from curation.cluster_plan import format_plan, plan_levels
from curation.hierarchy import LevelSpec, default_levels, split_clusters
from curation.kmeans import kmeans

RATES = MachineRates(gemm_flops=1e11, elementwise=1e9, step_latency_s=1e-5)


def test_kmeans_cost_matches_counted_flops():
    x = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    with FlopCounterMode(display=False) as counter:
        kmeans(x, 40, seed=0, n_iter=7, tol=-1.0)  # tol < 0: every iteration runs
    assert counter.get_total_flops() == pytest.approx(kmeans_cost(3000, 40, 32, 7).flops, rel=0.02)


def test_split_cost_bounds_counted_flops():
    x = np.random.default_rng(1).standard_normal((4000, 16)).astype(np.float32)
    groups = np.random.default_rng(2).integers(0, 10, size=4000)
    with FlopCounterMode(display=False) as counter:
        split_clusters(x, groups, 8, seed=0, n_iter=6)
    counted = counter.get_total_flops()
    model = split_cost(4000, 8, 16, 6, 10).flops
    assert counted <= model and counted >= model / (2 * 6)  # early stop can end after one iteration


def test_level1_is_direct_while_cheap_and_two_step_beyond():
    small = default_levels(10_000, 5)
    assert small[0].n_splits == 1 and kmeans_cost(10_000, small[0].k, 384, 30).flops <= DIRECT_MAX_FLOPS
    big = default_levels(200_000, 4)
    pre, splits = big[0].k, big[0].n_splits
    assert splits > 1 and pre * splits >= 11_447  # covers the paper-ratio k of level 1
    assert (pre, splits) == two_step_shape(11_447)
    direct = kmeans_cost(200_000, 11_447, 384, 30)
    two = kmeans_cost(200_000, pre, 384, 30) + split_cost(200_000, splits, 384, 30, pre)
    assert direct.flops > 20 * two.flops
    assert level1_shape(200_000, 11_447, 384, 30) == (pre, splits)
    assert [s.k for s in big[1:]] == [1441, 327, 86]  # upper levels unchanged by the shape of level 1
    assert all(s.n_splits == 1 and s.resampling_steps == 10 for s in big[1:])


def test_two_step_shape_is_the_cheapest_factorisation():
    for k in (2_000, 11_447, 10**7):
        pre, splits = two_step_shape(k)
        cost = pre + 1.5 * splits
        assert pre * splits >= k
        assert all(p + 1.5 * math.ceil(k / p) >= cost - 1.5 for p in range(1, 5 * pre, max(1, pre // 50)))


def test_plan_of_a_billion_rows_fits_80gb_workers():
    plan = plan_levels(1_000_000_000, 1024, rates=RATES)
    l1 = plan.levels[0]
    assert l1.shape == "two-step" and l1.pre_clusters * l1.splits >= default_levels(10**9, 5)[0].k
    assert l1.memory_per_worker_bytes <= 0.9 * 80e9
    per_row = 1024 * 2 + 16  # bf16 rows plus label, distance and norm
    fixed = l1.memory_per_worker_bytes - math.ceil(1e9 / l1.workers) * per_row
    assert 0 < fixed < 2e9  # centroids, sums and one kernel chunk
    assert fixed + math.ceil(1e9 / (l1.workers - 1)) * per_row > 0.9 * 80e9  # one worker fewer would not fit
    assert [lv.inputs for lv in plan.levels[1:]] == [lv.k for lv in plan.levels[:-1]]
    text = format_plan(plan)
    assert "1,000,000,000 rows × 1024" in text and f"{l1.pre_clusters:,} × {l1.splits}" in text
    assert len(text.splitlines()) == 2 + len(plan.levels) + 1


def test_plan_uses_given_levels_and_measured_rates():
    levels = [LevelSpec(k=50, n_splits=4), LevelSpec(k=20, resampling_steps=3)]
    plan = plan_levels(5_000, 64, levels=levels, rates=RATES)
    assert [lv.k for lv in plan.levels] == [200, 20] and plan.levels[1].resampling_steps == 3
    assert plan.levels[0].workers == 1
    assert plan.seconds == pytest.approx(sum(lv.seconds for lv in plan.levels))
    rates = measure_rates()
    assert all(math.isfinite(v) and v > 0 for v in (rates.gemm_flops, rates.elementwise, rates.step_latency_s))
