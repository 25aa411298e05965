"""The cost model of hierarchical k-means: FLOPs, element-wise work, sequential steps and memory.

The model counts what `curation.kmeans` and `curation.hierarchy` actually do:

* **k-means** on n rows with k centroids: greedy k-means++ on ``min(n, 10k + 1000)`` sampled rows
  (k sequential rounds, each scoring ``2 + ln k`` candidates against the sample), then ``n_iter``
  Lloyd iterations and a final assignment, each one [n, d] × [d, k] GEMM.
* **two-step** (``n_splits > 1``): a k-means with the pre-cluster count, then every group split by the
  batched padded Lloyd of `split_clusters` (groups bucketed by size, so the padded rows are at most
  twice the real ones; ``SPLIT_PADDING`` is the mean measured on long-tailed pools).
* **resampling step**: a fresh k-means on ``k × sample_size`` rows, then all inputs assigned.

Time is FLOPs over a measured GEMM rate, plus element-wise passes over a measured bandwidth, plus one
measured launch latency per sequential step (k-means++ rounds dominate those). Memory is what one
process holds at the level's peak: the inputs in float32, per-row state (label, distance, norm: 16 B),
the score buffer, centroids and their float64 sums. For a level-1 input too large for one device,
``workers`` is the smallest worker count whose share of the rows (in ``storage_bytes`` per value, bf16
on GPUs) plus the fixed working set fits ``device_memory`` at ``device_fill``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from curation.kmeans_assign import CPU_SCORE_BUDGET

#: Padded rows / real rows in `split_clusters` on long-tailed pools (buckets keep it below 2).
SPLIT_PADDING = 1.5
#: Element-wise passes over the [trials, sample] float64 candidate distances per k-means++ round.
KMPP_PASSES = 8
#: Bytes per row of per-row state besides the row itself: label int64, distance and norm float32.
ROW_STATE_BYTES = 16
GB = 1e9


@dataclass(frozen=True)
class MachineRates:
    """What this machine does per second; `measure_rates` fills it from tiny calibration runs."""

    gemm_flops: float  # float32 GEMM, FLOP/s
    elementwise: float  # float64 element-wise ops, elements/s
    step_latency_s: float  # one small op's dispatch + sync, s
    device: str = "cpu"


@dataclass(frozen=True)
class Cost:
    flops: float
    elements: float  # element-wise work (elements touched)
    steps: int  # sequential rounds (each pays a launch latency)

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.elements + other.elements, self.steps + other.steps)

    def seconds(self, rates: MachineRates) -> float:
        return self.flops / rates.gemm_flops + self.elements / rates.elementwise + self.steps * rates.step_latency_s


def kmeans_cost(n: int, k: int, d: int, n_iter: int) -> Cost:
    """k-means++ seeding on a subsample, then ``n_iter`` Lloyd iterations and a final assignment."""
    sample = min(n, 10 * k + 1000)
    trials = 2 + int(math.log(max(k, 1)))
    init = Cost(2.0 * k * trials * sample * d, float(KMPP_PASSES * k * trials * sample), k)
    lloyd = Cost(2.0 * n * k * d * (n_iter + 1), float(4 * n * k * (n_iter + 1)), 4 * (n_iter + 1))
    return init + lloyd


def split_cost(n: int, n_splits: int, d: int, n_iter: int, n_groups: int) -> Cost:
    """Batched Lloyd inside every group: padded rows against ``n_splits`` sub-centroids per iteration."""
    rows = SPLIT_PADDING * n
    buckets = max(1, int(math.log2(max(n / max(n_groups, 1), 2))) + 1)
    return Cost(2.0 * rows * n_splits * d * (n_iter + 1), 4.0 * rows * n_splits * (n_iter + 1),
                buckets * 6 * (n_iter + 1))


def two_step_shape(k: int) -> tuple[int, int]:
    """(pre-clusters, splits) with pre × splits ≥ k at the least cost: per row and iteration the
    two-step scores ``pre + SPLIT_PADDING·splits`` centroids, least at pre = √(SPLIT_PADDING·k)."""
    pre = max(1, round(math.sqrt(SPLIT_PADDING * k)))
    return pre, max(2, math.ceil(k / pre))


def resampling_cost(n: int, k: int, d: int, n_iter: int, sample_size: int) -> Cost:
    """A fresh k-means on ``sample_size`` points per cluster, then every input assigned."""
    sample = min(n, k * sample_size)
    return kmeans_cost(sample, k, d, n_iter) + Cost(2.0 * n * k * d, 4.0 * n * k, 4)


def assign_memory(n: int, k: int, d: int) -> float:
    """Bytes held while assigning n float32 rows to k centroids on CPU (score chunk of CPU_SCORE_BUDGET)."""
    chunk = max(256, min(1 << 16, CPU_SCORE_BUDGET // max(k, 1)))
    return 4.0 * n * d + ROW_STATE_BYTES * n + 4.0 * min(n, chunk) * k + 12.0 * k * d


def measure_rates(device: str = "cpu") -> MachineRates:
    """Calibrate `MachineRates` in well under a second: a GEMM, an element-wise pass and a small-op loop."""
    dev = torch.device(device)

    def best_of(fn, repeats: int = 3) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t)
        return min(times)

    a = torch.randn(2048, 384, device=dev)
    b = torch.randn(384, 1024, device=dev)
    gemm = 2.0 * 2048 * 384 * 1024 / best_of(lambda: torch.mm(a, b))
    u = torch.rand(1 << 21, dtype=torch.float64, device=dev)
    v = torch.rand(1 << 21, dtype=torch.float64, device=dev)
    elementwise = float(1 << 21) / best_of(lambda: torch.minimum(u, v))
    small = torch.rand(64, dtype=torch.float64, device=dev)
    latency = best_of(lambda: [torch.minimum(small, small) for _ in range(200)]) / 200
    return MachineRates(gemm, elementwise, latency, device)


#: A direct level 1 below this many FLOPs takes seconds anywhere (≈7 s at 140 GFLOP/s, 2 cores) and
#: keeps the exact k-means; above it the cheaper of direct and two-step is taken.
DIRECT_MAX_FLOPS = 1e12
#: The 2-core CPU these defaults were measured on (`measure_rates` there, unloaded).
REFERENCE_RATES = MachineRates(gemm_flops=1.4e11, elementwise=4e8, step_latency_s=1e-5)


def level1_shape(n: int, k: int, d: int, n_iter: int, rates: MachineRates | None = None) -> tuple[int, int]:
    """(pre-clusters, splits) for level 1; (k, 1) means a direct k-means. See `default_levels`."""
    direct = kmeans_cost(n, k, d, n_iter)
    if direct.flops <= DIRECT_MAX_FLOPS:
        return k, 1
    pre, splits = two_step_shape(k)
    two = kmeans_cost(n, pre, d, n_iter) + split_cost(n, splits, d, n_iter, pre)
    rates = rates or REFERENCE_RATES
    return (pre, splits) if two.seconds(rates) < direct.seconds(rates) else (k, 1)


def level1_workers(n: int, k: int, d: int, storage_bytes: int, usable: float) -> tuple[int, float]:
    """(workers, bytes per worker) for level 1 on devices of ``usable`` bytes.

    Each worker holds its rows in ``storage_bytes`` per value plus their per-row state, and the same
    fixed set: centroids (storage and float32), float64 partial sums, and a fused-kernel chunk of 2**18
    rows in float32. The split step then works one bucket of groups at a time within the same share.
    """
    fixed = k * d * (storage_bytes + 4 + 8) + (1 << 18) * d * 4.0
    per_row = d * storage_bytes + ROW_STATE_BYTES
    if usable <= fixed:
        raise ValueError(f"level 1 with k={k}, d={d} needs {fixed / GB:.1f} GB per worker before any row")
    workers = max(1, math.ceil(n * per_row / (usable - fixed)))
    return workers, fixed + math.ceil(n / workers) * per_row


