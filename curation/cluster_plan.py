"""`curate cluster --plan`: the levels a run will use and what each costs on this machine, without data.

Built on the cost model of `curation.cluster_cost` and the level rule of `curation.hierarchy.default_levels`
(the same specs the cluster stage runs), so the plan describes exactly the run it precedes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from curation.cluster_cost import (
    GB,
    SPLIT_PADDING,
    MachineRates,
    assign_memory,
    kmeans_cost,
    level1_workers,
    measure_rates,
    resampling_cost,
    split_cost,
)
from curation.hierarchy import LevelSpec, default_levels, default_sample_size


@dataclass(frozen=True)
class LevelPlan:
    level: int
    inputs: int
    k: int  # clusters of the level (pre × splits for two-step, an upper bound: empty leaves drop)
    shape: Literal["direct", "two-step"]
    pre_clusters: int
    splits: int
    resampling_steps: int
    flops: float
    seconds: float
    memory_bytes: float
    workers: int = 1
    memory_per_worker_bytes: float = 0.0


@dataclass(frozen=True)
class Plan:
    rows: int
    dim: int
    rates: MachineRates
    levels: list[LevelPlan] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(level.seconds for level in self.levels)


def plan_levels(
    rows: int,
    dim: int,
    n_levels: int = 5,
    *,
    levels: Sequence[LevelSpec] | None = None,
    resampling_steps: int = 10,
    n_iter: int = 30,
    rates: MachineRates | None = None,
    storage_bytes: int = 2,
    device_memory: float = 80 * GB,
    device_fill: float = 0.9,
) -> Plan:
    """Per level: k, shape, FLOPs, time and memory of clustering ``rows`` × ``dim`` (no data needed).

    ``levels`` defaults to `default_levels` (what `curate cluster` runs with no config); ``rates`` to
    `measure_rates` on this machine. Level 1 also gets the smallest worker count whose share of the
    rows (``storage_bytes`` per value: bf16 on GPUs) and fixed working set fit ``device_fill`` of
    ``device_memory`` (an 80 GB GPU by default); its time is then per worker.
    """
    specs = list(levels) if levels is not None else default_levels(
        rows, n_levels, resampling_steps=resampling_steps, dim=dim, n_iter=n_iter)
    rates = rates or measure_rates()
    plan = Plan(rows, dim, rates)
    n = rows
    for level, spec in enumerate(specs, start=1):
        plan.levels.append(_level_plan(level, n, dim, spec, n_iter, rates, storage_bytes, device_memory * device_fill))
        n = plan.levels[-1].k
    return plan


def _level_plan(level: int, n: int, d: int, spec: LevelSpec, n_iter: int, rates: MachineRates,
                storage_bytes: int, usable: float) -> LevelPlan:
    two_step = spec.n_splits > 1
    cost = kmeans_cost(n, spec.k, d, n_iter)
    if two_step:
        cost = cost + split_cost(n, spec.n_splits, d, n_iter, spec.k)
    for _ in range(spec.resampling_steps):
        cost = cost + resampling_cost(n, spec.k, d, n_iter, spec.sample_size or default_sample_size(n, spec.k))
    memory = assign_memory(n, spec.k, d) + (4.0 * n * d * SPLIT_PADDING if two_step else 0.0)
    workers, per_worker = level1_workers(n, spec.k, d, storage_bytes, usable) if level == 1 else (1, memory)
    return LevelPlan(level, n, spec.clusters, "two-step" if two_step else "direct",
                     spec.k if two_step else 0, spec.n_splits if two_step else 0, spec.resampling_steps,
                     cost.flops, cost.seconds(rates) / workers, memory, workers, per_worker)


def format_plan(plan: Plan) -> str:
    """The plan as a text table, one row per level, with the rates it was estimated from."""
    r = plan.rates
    lines = [(f"plan for {plan.rows:,} rows × {plan.dim} on {r.device} "
              f"({r.gemm_flops / 1e9:,.0f} GFLOP/s GEMM, {r.elementwise / 1e9:.2f} G elem/s, "
              f"{r.step_latency_s * 1e6:.0f} µs per step)"),
             (f"{'level':>5} {'inputs':>14} {'k':>12} {'shape':>20} {'resample':>8} {'TFLOP':>10} "
              f"{'time':>10} {'memory':>10} {'workers':>7} {'GB/worker':>9}")]
    for lv in plan.levels:
        shape = f"{lv.pre_clusters:,} × {lv.splits}" if lv.shape == "two-step" else "direct"
        lines.append(f"{lv.level:>5} {lv.inputs:>14,} {lv.k:>12,} {shape:>20} {lv.resampling_steps:>8} "
                     f"{lv.flops / 1e12:>10,.2f} {_duration(lv.seconds):>10} {lv.memory_bytes / GB:>9,.1f}G "
                     f"{lv.workers:>7} {lv.memory_per_worker_bytes / GB:>9,.1f}")
    lines.append(f"total {_duration(plan.seconds)} (level 1 time is per worker, workers in parallel)")
    return "\n".join(lines)


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
